"""Scale-out: 8 simulated devices and two processes train like one device; a lost process stops the run.

The multi-device and multi-process runs are subprocesses, because the device count and
jax.distributed are fixed when JAX starts; the one-device runs train in this process.
The multi-process commands are those of "Scaling out" in benchmarks/README.md, with 127.0.0.1 as the host.
"""

import contextlib
import io
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from unet_jax import checkpoints
from unet_jax.flags import build_parser, parse_config
from unet_jax.model import init_variables
from unet_jax.step import run_keys
from unet_jax.train import train

pytestmark = pytest.mark.slow

# The trainer's default program (5 steps per dispatch, the default learning rate): logs and
# checkpoints at multiples of 5, so every dispatch runs the 5-step program that `make train` runs;
# but for --conv, fixed to tapgrad (one of the lowerings auto picks on the machines measured)
# so that no process spends the run measuring, and all of them run one plan.
TINY = ["--batch-size", "8", "--n-T", "20", "--sample-steps", "3", "--num-samples", "4", "--log-every", "5",
        "--sample-every", "0", "--warmup-steps", "2", "--steps", "10", "--ckpt-every", "0", "--conv", "tapgrad"]
TIMEOUT_S = 300
# A process silent this long counts as dead, and JAX aborts every process of the run. The killed
# processes below are found by their closed connections within a second, whatever this is; it only
# decides how long a stall may last before a healthy run is taken for dead, and a full `make test`
# on a busy shared machine has left healthy processes unheard for over 30 s (benchmarks/README.md,
# Scaling out).
HEARTBEAT_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_with(device_count: int) -> dict:
    # Unbuffered: a process killed by a signal has still written everything it printed.
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count}", PYTHONUNBUFFERED="1")


def launch(workdir, flags, *, processes: int = 1, device_count: int = 1, port: int | None = None):
    """Start one run: ``processes`` copies of the trainer, joined through a coordinator on 127.0.0.1.

    Each process prints into files of a folder beside the workdir, kept for a failure's post-mortem,
    rather than into a pipe: a pipe that nothing reads while a test waits for a checkpoint would
    block a process that printed more than it holds, and with it the run."""
    workdir = pathlib.Path(workdir)
    logs = pathlib.Path(tempfile.mkdtemp(prefix=f"{workdir.name}-logs-", dir=workdir.parent))
    command = [sys.executable, "-m", "unet_jax.train", "--workdir", str(workdir), *flags]
    if processes > 1:
        port = port or free_port()
        command += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                    "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S)]
    procs = []
    for i in range(processes):
        ids = ["--process-id", str(i)] if processes > 1 else []
        with open(logs / f"process{i}.out", "w") as out, open(logs / f"process{i}.err", "w") as err:
            procs.append(subprocess.Popen([*command, *ids], env=env_with(device_count), stdout=out, stderr=err))
        procs[-1].logs = logs / f"process{i}"
    return procs


def outputs(procs) -> list[tuple[int | None, str, str]]:
    """[(exit code, stdout, stderr)] of each process, as printed so far."""
    return [(p.returncode, p.logs.with_suffix(".out").read_text(errors="replace"),
             p.logs.with_suffix(".err").read_text(errors="replace")) for p in procs]


def stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def finish(procs, timeout=TIMEOUT_S):
    """Wait for every process and return their outputs; if any outlives the timeout, kill them all and fail."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        stop(procs)
        pytest.fail(f"still running after {timeout} s, so killed:\n{describe(outputs(procs))}")
    finally:
        stop(procs)  # on any other error too: no trainer outlives its test
    return outputs(procs)


def describe(results) -> str:
    """Each process's exit code, its first error and fatal log lines (JAX's E and F lines), then the
    last lines of its stderr and stdout, each cut at 2000 characters: the cause, then the ending."""
    lines = []
    for i, (rc, out, err) in enumerate(results):
        logged = [line for line in err.splitlines() if line[:1] in "EF" and line[1:5].isdigit()]
        lines += [f"process {i} exited {rc}", *logged[:10], *err.splitlines()[-15:], *out.splitlines()[-5:]]
    return "\n".join(line[:2000] for line in lines)


def run_ok(workdir, flags=TINY, **kwargs):
    results = finish(launch(workdir, flags, **kwargs))
    assert all(rc == 0 for rc, _, _ in results), describe(results)
    return results


def train_here(workdir, flags) -> str:
    """The trainer's flags run in this process, whose JAX has one device: for the one-device runs,
    which need no process boundary. Returns what the run printed."""
    config, _, _ = parse_config(build_parser(), ["--workdir", str(workdir), *flags])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(config)
    return printed.getvalue()


def logged_losses(workdir):
    return [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


def weights(restored: dict) -> dict:
    """A restored checkpoint's raw and EMA weights."""
    return {key: restored[key] for key in ("params", "ema_params")}


def losses_and_params(workdir):
    """The logged losses and the last checkpoint's raw and EMA weights."""
    return logged_losses(workdir), weights(checkpoints.restore_latest_params(str(workdir))[1])


def _norm(leaves):
    return np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in leaves))


def assert_same_training(reference, other):
    """Same batches and noise, so the same run, up to float32 summation order over the devices.

    The scale is the run's own update, ||params - initial params||: splitting the batch
    differently reorders float32 sums (~1e-7 relative in the gradients), and Adam, dividing
    each gradient by its running RMS, turns that into a visible share of an lr-sized step
    where a gradient is almost zero (conv biases before a GroupNorm); but a real difference
    (a device's slice dropped or counted twice) moves the parameters by a share of their update
    of order one. (Gradients summed where they should be averaged are not one: Adam divides out a
    gradient's scale. tests/test_train.py checks the average itself, under plain SGD.) Measured on 10
    steps: 8 devices end 3 % of the update away from one device, 2 processes 5e-7; losses
    agree to 2e-5. Bounds: 10 % of the update, 1e-3 of the loss; the EMA weights (what sample,
    export and evaluate use) are held to their own update alike.
    """
    (losses_ref, trained_ref), (losses, trained) = reference, other
    assert len(losses) == len(losses_ref) == 2  # two log windows of 5 steps
    np.testing.assert_allclose(losses, losses_ref, rtol=1e-3)
    initial = jax.tree.leaves(init_variables(run_keys(0)[0])["params"])
    for key in ("params", "ema_params"):
        leaves_ref, leaves = jax.tree.leaves(trained_ref[key]), jax.tree.leaves(trained[key])
        update = _norm([a - b for a, b in zip(leaves_ref, initial)])
        diff = _norm([a - b for a, b in zip(leaves_ref, leaves)])
        assert diff <= 0.1 * update, (key, diff, update)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device")
    assert "training on 1 cpu device(s) in 1 process(es)" in train_here(workdir, TINY)
    return losses_and_params(workdir)


def test_eight_simulated_devices_train_like_one(one_device, tmp_path):
    (_, out, _), = run_ok(tmp_path, device_count=8)
    assert "training on 8 cpu device(s) in 1 process(es)" in out
    assert_same_training(one_device, losses_and_params(tmp_path))


def test_a_batch_that_does_not_split_over_the_devices_is_refused(tmp_path):
    (rc, out, err), = finish(launch(tmp_path, [*TINY[2:], "--batch-size", "6"], device_count=4))
    assert rc != 0
    assert "--batch-size 6 does not split evenly over the run's 4 devices" in err
    assert "use a multiple of 4, such as 4 or 8" in err


def _kill_after_a_checkpoint(workdir, flags, killed: int, past: int):
    """Launch the 2-process run, SIGKILL process ``killed`` once a checkpoint past step ``past`` is on
    disk, and return the survivor's (exit code, stdout, stderr); it must stop within ``finish``'s timeout,
    not hang."""
    procs = launch(workdir, flags, processes=2, port=free_port())
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while max(checkpoints.committed_steps(str(workdir)), default=0) <= past:
            if not all(p.poll() is None for p in procs):
                for p in procs:  # a peer may stop on its own and say why, or wait in a collective for good
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(timeout=5)
                stop(procs)
                pytest.fail(f"the run ended before a checkpoint past step {past}:\n{describe(outputs(procs))}")
            assert time.monotonic() < deadline, f"no checkpoint past step {past} was written"
            time.sleep(0.1)
        procs[killed].kill()
        # The survivor learns of it from gloo's reset connection, well before a heartbeat timeout.
        (rc, out, err), = finish([procs[1 - killed]], timeout=90)
        return rc, out, err
    finally:
        stop(procs)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One 2-process run, the checks below share it (each launch compiles in full: a second process
    never finds the compilation cache, which JAX writes from process 0 alone). It trains to step 40,
    checkpointing every 10; its coordinator is killed past the first checkpoint, the run resumed,
    its worker killed past the next one, the run resumed to the end; then one process continues it.
    Step 10's checkpoint is kept aside to compare with one device's 10 steps (TINY's run)."""
    workdir = tmp_path_factory.mktemp("two_processes")
    flags = [*TINY, "--steps", "40", "--ckpt-every", "10"]  # --steps: the last one wins
    kills, saved_step = [], 0
    for killed in (0, 1):
        rc, out, err = _kill_after_a_checkpoint(workdir, flags, killed, past=saved_step)
        if killed == 0:
            step_10 = tmp_path_factory.mktemp("step_10")
            shutil.copytree(workdir / "checkpoints" / "10", step_10 / "checkpoints" / "10")
            shutil.copy(workdir / "config.json", step_10)
        resumed_from, saved_step = saved_step, checkpoints.restore_latest_params(str(workdir))[1]["step"]
        kills.append({"killed": killed, "rc": rc, "out": out, "err": err,
                      "resumed_from": resumed_from, "saved_step": saved_step})
    finished = run_ok(workdir, flags, processes=2)
    one_process_out = train_here(workdir, [*flags, "--steps", "45"])
    return {"workdir": workdir, "kills": kills, "finished": finished, "one_process_out": one_process_out,
            "step_10": step_10}


def test_two_processes_train_like_one(one_device, two_processes):
    losses = logged_losses(two_processes["workdir"])[:2]  # the windows ending at steps 5 and 10
    params = checkpoints.restore_latest_params(str(two_processes["step_10"]))[1]
    assert params["step"] == 10
    assert_same_training(one_device, (losses, weights(params)))


def test_only_process_0_logs_and_writes_samples(two_processes):
    (_, out0, _), (_, out1, _) = two_processes["finished"]
    assert "training on 2 cpu device(s) in 2 process(es)" in out0
    assert "training on" not in out1
    assert sorted(os.listdir(two_processes["workdir"] / "samples")) == ["step_40.png", "step_45.png"]


# Process 0 hosts JAX's coordination service. When it dies, JAX's own error poller in the other
# processes may abort them (a C++ fatal error, SIGABRT) before their failed collective reaches
# the trainer; which comes first is a race that no option of jax.distributed removes.
JAX_ABORT = "Terminating process because the JAX distributed service detected fatal errors"


@pytest.mark.parametrize("killed", [0, 1], ids=["coordinator", "worker"])
def test_a_killed_process_stops_the_other_in_one_line(two_processes, killed):
    kill = two_processes["kills"][killed]
    assert kill["resumed_from"] < kill["saved_step"] < 40
    if killed == 0 and kill["rc"] == -signal.SIGABRT:
        assert JAX_ABORT in kill["err"], kill["err"][-3000:]
        return
    assert kill["rc"] == 1, kill["err"][-3000:]
    (line,) = [line for line in kill["err"].splitlines() if line.startswith("error: ")]  # one line, amid JAX's logs
    assert line.startswith(f"error: process {1 - killed} of 2 stopped at step"), line
    assert f"The last complete checkpoint in {two_processes['workdir']} is step {kill['saved_step']}" in line, line
    assert line.endswith("run the same command on every process again to resume from it."), line


def test_a_run_that_lost_a_process_resumes_from_its_last_checkpoint(two_processes):
    first, second = two_processes["kills"]
    assert f"resumed {two_processes['workdir']} from step {first['saved_step']}" in second["out"]
    (_, out0, _), (_, out1, _) = two_processes["finished"]
    assert f"resumed {two_processes['workdir']} from step {second['saved_step']}" in out0
    assert "resumed" not in out1  # process 0 alone says what the run does
    rows = [json.loads(line) for line in open(two_processes["workdir"] / "metrics.jsonl")]
    assert [row["step"] for row in rows] == list(range(5, 46, 5))  # every window once, none lost or repeated


def test_one_process_resumes_a_two_process_checkpoint(two_processes):
    # The checkpoint layout does not depend on the device count.
    out = two_processes["one_process_out"]
    assert f"resumed {two_processes['workdir']} from step 40" in out and "training on 1 cpu device(s)" in out
    assert "replaces the 3x3 conv lowerings" not in out  # the same plan, however many processes agreed on it
