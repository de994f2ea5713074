"""Per-core host devices and meshes: user flags respected, batches split evenly (see test_scaling)."""

import inspect
import os
import subprocess
import sys

import jax
import pytest

from unet_jax import devices
from unet_jax.flags import build_parser, parse_config
from unet_jax.train import main as train_main


def test_use_all_cpu_cores_respects_a_user_count(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3 --xla_cpu_foo=1")
    devices.use_all_cpu_cores()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3 --xla_cpu_foo=1"
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
    devices.use_all_cpu_cores()
    assert os.environ["XLA_FLAGS"].startswith("--xla_cpu_foo=1 --xla_force_host_platform_device_count=")


def test_meshes_on_two_devices():
    # pytest's own process has one device, so the meshes are checked where there are two: data_mesh takes
    # the devices that split the batch, training_mesh every device or a refusal.
    code = """
import jax, pytest
from unet_jax import devices
assert len(jax.devices()) == 2
assert devices.data_mesh(8).devices.size == 2 and devices.data_mesh(7).devices.size == 1
assert devices.training_mesh(8).devices.size == 2
with pytest.raises(devices.BatchSplitError, match=r"--batch-size 7 does not split evenly .* use a multiple of 2, such as 6 or 8"):
    devices.training_mesh(7)
print("ok")
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_automatic_device_count_splits_the_batch(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    for batch, expected in ((32, 4), (30, 3), (7, 1)):
        monkeypatch.setenv("XLA_FLAGS", "")
        devices.use_all_cpu_cores(batch)
        assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count={expected}"


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1:1234"], "go together: give all three"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "must be below --num-processes 2"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "0", "--distributed"], "drop it"),
    *((["--coordinator", bad, "--num-processes", "2", "--process-id", "0"],
       f"expected HOST:PORT with a port from 1 to 65535, got {bad}")
      for bad in ("node0", "node0:http", ":1234", "node0:70000", "node0:0")),
])
def test_process_flags_are_checked(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(build_parser(), flags)
    assert message in capsys.readouterr().err


def test_slurm_tasks_without_distributed_are_refused(monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "1")
    with pytest.raises(devices.ClusterError, match="Add --distributed"):
        devices.start_processes(devices.Cluster())
    with pytest.raises(SystemExit, match="^error: launched as one of 4 SLURM tasks without --distributed"):
        train_main(["--steps", "1"])


def test_distributed_outside_a_cluster_says_so_in_one_line(tmp_path):
    # jax.distributed.initialize() finds no SLURM, Open MPI or TPU VM here, and raises a bare
    # ValueError. In a process of its own: joining a cluster must come before any JAX work.
    cluster = ("SLURM_", "OMPI_", "TPU_", "KUBERNETES_SERVICE_HOST", "JAX_COORDINATOR_ADDRESS")
    env = {name: value for name, value in os.environ.items() if not name.startswith(cluster)}
    command = [sys.executable, "-m", "unet_jax.train", "--distributed", "--workdir", str(tmp_path / "run"),
               "--steps", "1", "--init-timeout", "10"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: --distributed found no SLURM, Open MPI or TPU VM environment that names the run's processes")
    assert not (tmp_path / "run").exists()


JAX_HEARTBEAT_DEFAULT_S = inspect.signature(jax.distributed.initialize).parameters[
    "heartbeat_timeout_seconds"].default


@pytest.mark.parametrize("flags, heartbeat_s, init_s", [
    ([], JAX_HEARTBEAT_DEFAULT_S, 120),
    (["--heartbeat-timeout", "7", "--init-timeout", "9"], 7, 9),
])
def test_the_timeout_flags_reach_jax_distributed(monkeypatch, flags, heartbeat_s, init_s):
    # By default JAX's own heartbeat timeout: a healthy process can go unheard for over 30 s on a busy machine.
    _, cluster, _ = parse_config(build_parser(), ["--distributed", *flags])
    called = {}
    monkeypatch.setattr(devices.jax.config, "update", lambda *args: None)  # no gloo switch in this process
    monkeypatch.setattr(devices.jax.distributed, "initialize", lambda **kwargs: called.update(kwargs))
    devices.start_processes(cluster)
    assert called == {"heartbeat_timeout_seconds": heartbeat_s, "initialization_timeout": init_s,
                      "shutdown_timeout_seconds": 60}
