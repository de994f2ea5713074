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
import select
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddpm_recipe.settings import usable_cores

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How this process joins a run: alone, by explicit coordinator flags, or by detection."""

    coordinator: str | None = None  # HOST:PORT of process 0
    num_processes: int | None = None
    process_id: int | None = None
    detect: bool = False  # let jax.distributed.initialize() read SLURM, Open MPI or the TPU VM
    # A process silent this long counts as dead, and JAX aborts the run. JAX's own default: on a busy
    # machine a healthy process can go unheard for over 30 s (benchmarks/README.md, Scaling out).
    heartbeat_timeout_s: int = 100
    init_timeout_s: int = 120  # how long the processes wait for each other to start

    @property
    def multi_process(self) -> bool:
        return self.coordinator is not None or self.detect


class ClusterError(RuntimeError):
    """The processes of a run cannot be told apart or found: SLURM tasks without --distributed, or
    --distributed where no cluster says what the processes are."""


def start_processes(cluster: Cluster) -> None:
    """Join the run's other processes (a no-op for a single-process run). Call before any JAX work.

    CPU collectives between processes go over gloo (TCP); GPUs and TPUs use their own.
    """
    if not cluster.multi_process:
        tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
        if "SLURM_PROCID" in os.environ and tasks > 1:
            raise ClusterError(f"launched as one of {tasks} SLURM tasks without --distributed; each task would "
                               "train its own copy into the same workdir. Add --distributed.")
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeouts = dict(heartbeat_timeout_seconds=cluster.heartbeat_timeout_s, shutdown_timeout_seconds=60,
                    initialization_timeout=cluster.init_timeout_s)
    if cluster.coordinator is not None:
        _roll_call(cluster)
        jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id, **timeouts)
    else:
        try:
            jax.distributed.initialize(**timeouts)
        except ValueError as error:  # JAX's word for a cluster environment it cannot read, or none at all
            if "coordinator_address" in str(error):
                raise ClusterError("--distributed found no SLURM, Open MPI or TPU VM environment that names the "
                                   "run's processes; outside one, give --coordinator, --num-processes and "
                                   "--process-id") from None
            raise ClusterError(f"--distributed could not start from the cluster's environment: {error}") from None


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
    cores = usable_cores()
    count = cores if batch_size is None else max(k for k in range(1, cores + 1) if batch_size % k == 0)
    os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={count}".strip()


class RollCallError(RuntimeError):
    """The processes of a multi-process run could not gather: one never came, or the port is taken."""


def _roll_call(cluster: Cluster, log=print) -> None:
    """Gather every process at the coordinator's address before jax.distributed does.

    jax.distributed waits silently, then aborts the process with a C++ fatal that blames a
    task that died, and cannot say which processes never came. So process 0 first listens on
    HOST:PORT itself and takes a roll call: each process sends its id, and when all have come,
    process 0 answers them, closes the port, and jax.distributed starts on it. Raises
    RollCallError naming the absent process ids after ``init_timeout_s``.
    """
    host, _, port = cluster.coordinator.rpartition(":")
    host, port, n, me = host.strip("[]"), int(port), cluster.num_processes, cluster.process_id
    deadline = time.monotonic() + cluster.init_timeout_s
    if me != 0:
        log(f"process {me}: waiting for process 0 at {cluster.coordinator} (--init-timeout {cluster.init_timeout_s} s)",
            flush=True)
        while True:
            try:
                with socket.create_connection((host, port), timeout=max(1.0, deadline - time.monotonic())) as conn:
                    conn.sendall(f"{me}\n".encode())
                    conn.settimeout(max(1.0, deadline - time.monotonic()))
                    if conn.recv(16).startswith(b"go"):
                        return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise RollCallError(
                    f"process 0 (the coordinator at {cluster.coordinator}) did not gather all {n} processes within "
                    f"--init-timeout {cluster.init_timeout_s} s; start every process with the same --coordinator")
            time.sleep(0.5)
    log(f"waiting for {n} processes at {cluster.coordinator} (--init-timeout {cluster.init_timeout_s} s)", flush=True)
    waiting: dict[int, socket.socket] = {}
    try:  # every interface, as jax.distributed's service listens
        server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True) \
            if socket.has_dualstack_ipv6() else socket.create_server(("", port))
    except OSError as error:
        raise RollCallError(f"process 0 cannot listen on port {port} of --coordinator {cluster.coordinator} "
                            f"({error.strerror or error}); choose a free port") from None
    with server:
        server.settimeout(0.5)
        try:
            while len(waiting) < n - 1:
                if time.monotonic() >= deadline:
                    missing = sorted(set(range(1, n)) - set(waiting))
                    raise RollCallError(
                        f"process id(s) {', '.join(map(str, missing))} of {n} never connected to {cluster.coordinator} "
                        f"within --init-timeout {cluster.init_timeout_s} s; start them with the same --coordinator "
                        "and --num-processes")
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                conn.settimeout(5)
                try:
                    pid = int(conn.recv(16).decode().strip())
                except (OSError, ValueError):
                    conn.close()
                    continue
                if 0 < pid < n:
                    if pid in waiting:
                        waiting[pid].close()  # the process retried; keep its newest connection
                    waiting[pid] = conn
                else:
                    conn.close()
                if len(waiting) == n - 1:
                    for pid in [p for p, c in waiting.items() if _closed(c)]:  # gave up waiting for the others
                        waiting.pop(pid).close()
            for conn in waiting.values():
                conn.sendall(b"go\n")
            for conn in waiting.values():  # let each process close first, leaving the port free to bind again
                try:
                    conn.recv(16)
                except OSError:
                    pass
        finally:
            for conn in waiting.values():
                conn.close()


def _closed(conn: socket.socket) -> bool:
    """Whether the peer closed ``conn`` (it sends nothing more before 'go', so readable means closed)."""
    readable, _, _ = select.select([conn], [], [], 0)
    if not readable:
        return False
    try:
        return conn.recv(16, socket.MSG_PEEK) == b""
    except OSError:
        return True


def agree(ok: bool) -> bool:
    """Process 0's ``ok``, on every process (itself alone in a single-process run).

    For a check that process 0 alone makes (the workdir lock, a download): the others learn
    its outcome and can stop too, rather than wait at the next barrier for a process that left.
    """
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def everywhere(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (itself alone in a single-process run).

    For a check that each process makes on its own files (the data and weights that a resumed
    run is compared by): one process's refusal stops them all, rather than leaving the others
    waiting at the next barrier for it.
    """
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


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
