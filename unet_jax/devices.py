"""Where training runs: the processes of a run, their devices, and the data-parallel mesh.

One code path from one CPU to many hosts. ``start_processes`` joins a multi-process run
through ``jax.distributed`` (explicit coordinator flags, or detection on SLURM, Open MPI and
TPU VMs); ``training_mesh`` lays the global batch over every device of every process.

On a single CPU host, splitting the batch over one single-core XLA device per core
measured faster than XLA's intra-op threading for this model (see benchmarks/), so
``use_all_cpu_cores`` asks for that before JAX creates its backends. A device count already
in ``XLA_FLAGS`` is respected.
"""

import dataclasses
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How this process joins a run: alone, by explicit coordinator flags, or by detection."""

    coordinator: str | None = None  # HOST:PORT of process 0
    num_processes: int | None = None
    process_id: int | None = None
    detect: bool = False  # let jax.distributed.initialize() read SLURM, Open MPI or the TPU VM
    heartbeat_timeout_s: int = 60  # a process silent this long counts as dead, and the run stops

    @property
    def multi_process(self) -> bool:
        return self.coordinator is not None or self.detect


def start_processes(cluster: Cluster) -> None:
    """Join the run's other processes (a no-op for a single-process run). Call before any JAX work.

    CPU collectives between processes go over gloo (TCP); GPUs and TPUs use their own.
    """
    if not cluster.multi_process:
        tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
        if "SLURM_PROCID" in os.environ and tasks > 1:
            raise SystemExit(f"error: launched as one of {tasks} SLURM tasks without --distributed; each task would "
                             "train its own copy into the same workdir. Add --distributed.")
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeouts = dict(heartbeat_timeout_seconds=cluster.heartbeat_timeout_s, shutdown_timeout_seconds=60)
    if cluster.coordinator is not None:
        jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id, **timeouts)
    else:
        jax.distributed.initialize(**timeouts)


def is_primary() -> bool:
    """Process 0 logs, plots and writes samples; every process takes part in compute and checkpoints."""
    return jax.process_index() == 0


def use_all_cpu_cores(batch_size: int | None = None) -> None:
    """Ask XLA for one host device per core (or per core that splits ``batch_size`` evenly).

    Does nothing when XLA_FLAGS already names a count: the user's choice stands.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if DEVICE_COUNT_FLAG in flags:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    count = cores if batch_size is None else max(k for k in range(1, cores + 1) if batch_size % k == 0)
    os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={count}".strip()


class BatchSplitError(ValueError):
    """The global batch does not divide over the run's devices."""


def training_mesh(batch_size: int) -> Mesh:
    """A 1-D mesh named 'data' over every device of every process; the global batch must split evenly."""
    all_devices = jax.devices()
    count = len(all_devices)
    if batch_size % count:
        below, above = batch_size // count * count, (batch_size // count + 1) * count
        options = f"{below} or {above}" if below else f"{above}"
        raise BatchSplitError(f"--batch-size {batch_size} does not split evenly over the run's {count} devices "
                         f"({jax.process_count()} process(es)); use a multiple of {count}, such as {options}.")
    return Mesh(np.array(all_devices), ("data",))


def data_mesh(batch_size: int) -> Mesh:
    """A 1-D mesh named 'data' over as many local devices as split ``batch_size`` evenly (all, usually).

    For single-process tools (sampling, evaluation) that may be handed any number of images.
    """
    local = jax.local_devices()
    count = max(k for k in range(1, len(local) + 1) if batch_size % k == 0)
    return Mesh(local[:count], ("data",))


def needs_one_dispatch_in_flight(mesh: Mesh) -> bool:
    """Whether a training loop must wait for each dispatch: collectives over several CPU devices."""
    return mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split axis 0 over the mesh."""
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def fetch(tree):
    """Numpy copies of replicated arrays, read from this process's own first shard (no collective)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def gather(array) -> np.ndarray:
    """The whole of a batch-sharded array on every process (a collective: every process must call it)."""
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
