"""Use every CPU core: one XLA host device per core, and a data-parallel mesh over the devices.

On a 2-core CPU, splitting the batch over two single-core devices measured faster than
XLA's intra-op threading for this model (see benchmarks/). ``use_all_cpu_cores`` must run
before JAX creates its backends; a device count already in ``XLA_FLAGS`` is respected.
"""

import os

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def use_all_cpu_cores() -> None:
    """Ask XLA for one host device per core, unless XLA_FLAGS already names a count."""
    flags = os.environ.get("XLA_FLAGS", "")
    if DEVICE_COUNT_FLAG in flags:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={cores}".strip()


def data_mesh(batch_size: int) -> Mesh:
    """A 1-D mesh named 'data' over as many devices as split ``batch_size`` evenly (all, usually)."""
    devices = jax.devices()
    count = max(k for k in range(1, len(devices) + 1) if batch_size % k == 0)
    return Mesh(devices[:count], ("data",))


def needs_one_step_in_flight(mesh: Mesh) -> bool:
    """Whether a training loop must wait for each step: collectives over several CPU devices."""
    return mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split axis 0 over the mesh."""
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
