"""Data parallelism over per-core host devices: same numbers as one device; user flags respected."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from unet_jax import checkpoints, devices

TINY = ["--batch-size", "8", "--n-T", "20", "--sample-steps", "3", "--num-samples", "4", "--log-every", "1",
        "--sample-every", "0", "--warmup-steps", "2", "--steps", "5", "--ckpt-every", "0"]


def test_use_all_cpu_cores_respects_a_user_count(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3 --xla_cpu_foo=1")
    devices.use_all_cpu_cores()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3 --xla_cpu_foo=1"
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
    devices.use_all_cpu_cores()
    assert os.environ["XLA_FLAGS"].startswith("--xla_cpu_foo=1 --xla_force_host_platform_device_count=")


def test_mesh_uses_the_devices_that_split_the_batch():
    count = len(jax.devices())
    assert devices.data_mesh(8 * count).devices.size == count
    assert devices.data_mesh(7).devices.size in {d for d in range(1, count + 1) if 7 % d == 0}


@pytest.mark.slow
def test_two_devices_train_like_one(tmp_path):
    results = {}
    for count in (1, 2):
        workdir = str(tmp_path / f"dev{count}")
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
        run = subprocess.run([sys.executable, "-m", "unet_jax.train", "--workdir", workdir, *TINY], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert f"training on {count} cpu device(s)" in run.stdout
        losses = [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
        results[count] = losses, checkpoints.restore_latest_params(workdir)[1]["params"]
    (losses_1, params_1), (losses_2, params_2) = results[1], results[2]
    assert len(losses_1) == 5
    np.testing.assert_allclose(losses_2, losses_1, rtol=1e-3)  # same batches and noise; see below for the 1e-3
    # Summation order differs across devices (~1e-7 relative in the gradients). Adam divides by
    # sqrt(v), so for parameters whose gradient is almost zero (conv biases right before a
    # GroupNorm) that becomes a visible share of one lr-sized step. Over the whole tree the
    # two runs agree to 1e-3 of the parameters' norm.
    diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_2))))
    norm = np.sqrt(sum(np.sum(a**2) for a in jax.tree.leaves(params_1)))
    assert diff <= 1e-3 * norm, (diff, norm)
