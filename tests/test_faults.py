"""The fault matrix: every bad input and fault a user can meet, and what it must end in.

One test per row. A CLI ends a user's mistake or a fault with one line ("error: ...", the file,
what is wrong, what to do) and a non-zero exit, never a traceback, and leaves no run lost or
poisoned. Runs here are in-process on one device, except where a process boundary is the point.
"""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ddpm_recipe.run_folder import LOCK_FILE, WorkdirBusyError, WorkdirLock, trim_metrics, write_atomically
from parity import CheckpointMismatchError, WeightsFileError, flax_to_torch, torch_to_flax
from unet_jax import checkpoints, data, devices, evaluate, export, sample
from unet_jax import train as train_module
from unet_jax.flags import build_parser, parse_config
from unet_jax.model import Unet, init_variables
from unet_jax.train import Config, main, train

TINY = dict(batch_size=8, n_T=20, sample_steps=3, num_samples=4, log_every=2, sample_every=0, warmup_steps=2,
            conv="tapgrad", steps_per_dispatch=1)
TINY_FLAGS = ["--batch-size", "8", "--n-T", "20", "--sample-steps", "3", "--num-samples", "4", "--log-every", "2",
              "--sample-every", "0", "--warmup-steps", "2", "--conv", "tapgrad", "--steps-per-dispatch", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained 4 steps, with checkpoints at steps 2 and 4. Tests copy it before harming it."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    train(Config(workdir=workdir, steps=4, ckpt_every=2, **TINY))
    return workdir


@pytest.fixture
def run_copy(trained, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(trained, copy)
    return copy


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A valid .pt state_dict and the same weights damaged in every way a file can be."""
    folder = tmp_path_factory.mktemp("weights")
    state_dict = flax_to_torch(init_variables(jax.random.key(0)))
    torch.save(state_dict, folder / "good.pt")
    save_file(dict(state_dict), str(folder / "good.safetensors"))
    blob = (folder / "good.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    (folder / "empty.pt").write_bytes(b"")
    st = (folder / "good.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(st[: len(st) - 100])
    torch.save({k + "_renamed": v for k, v in state_dict.items()}, folder / "wrong_keys.pt")
    torch.save({"payload": _Exploit(str(folder / "pwned"))}, folder / "pickle.pt")
    torch.save({k: v.to(torch.int8) for k, v in state_dict.items()}, folder / "int8.pt")
    (folder / "a_directory").mkdir()
    (folder / "html.pt").write_text("<html><body>404 Not Found</body></html>")  # a failed download, saved
    (folder / "lfs.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 3\n")
    return {name: str(folder / name) for name in ("good.pt", "truncated.pt", "empty.pt", "truncated.safetensors",
                                                  "wrong_keys.pt", "pickle.pt", "int8.pt", "a_directory", "missing.pt",
                                                  "html.pt", "lfs.safetensors")}


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_line_exit(run, *args) -> str:
    """Run a CLI main; it must end in SystemExit carrying one line that starts 'error: '."""
    with pytest.raises(SystemExit) as info:
        run(list(args))
    message = info.value.code
    assert isinstance(message, str), f"exit {message!r}: expected a one-line message"
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# ------------------------------------------------------------------------- poisoned or lost runs

@pytest.mark.parametrize("flag", ["--lr", "--eta"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_numbers_are_refused_by_the_flags(flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(build_parser(), [flag, value])
    assert info.value.code == 2 and "finite" in capsys.readouterr().err


def test_a_negative_ddim_eta_is_refused_by_the_flags_and_the_config(capsys):
    # eta scales the noise DDIM adds; below 0 the two samplers would not even agree on what it means.
    with pytest.raises(SystemExit) as info:
        parse_config(build_parser(), ["--eta", "-0.5"])
    assert info.value.code == 2 and "0 or more" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"^Config\.eta must be 0 or more"):
        Config(eta=-0.5)


def test_non_finite_numbers_are_refused_by_the_config():
    for field in ("lr", "eta", "ema_decay"):
        with pytest.raises(ValueError, match=f"{field}"):
            Config(**{field: float("nan")})


def test_a_diverging_run_names_what_was_not_finite_and_keeps_only_finite_checkpoints(tmp_path):
    # lr 1e10: the first update leaves finite parameters (saved), and the next step overflows. (At
    # 1e6 the loss grows to ~1e29 and stays finite: GroupNorm renormalises what the huge weights make.)
    workdir = str(tmp_path / "run")
    with pytest.raises(FloatingPointError) as info:
        train(Config(workdir=workdir, steps=20, lr=1e10, warmup_steps=0, ckpt_every=1, log_every=1,
                     **{k: v for k, v in TINY.items() if k not in ("log_every", "warmup_steps")}))
    message = str(info.value)
    what, loss = message.split(" at step ")[0], float(message.split("(loss ")[1].split(")")[0])
    assert what.startswith("non-finite "), message
    assert ("loss" in what) == (not np.isfinite(loss)), f"the loss is blamed only when it is not finite: {message}"
    steps = checkpoints.committed_steps(workdir)
    assert steps, "the first steps were finite and saved"
    restored = checkpoints.restore_latest_params(workdir)[1]
    assert all(np.isfinite(leaf).all() for key in ("params", "ema_params") for leaf in jax.tree.leaves(restored[key]))
    assert f"The last complete checkpoint in {workdir} is step {steps[-1]}, and it is kept" in message


def test_a_non_finite_step_ends_the_cli_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "to_model_range", lambda u8: u8.astype(jnp.float32) * jnp.nan)
    message = one_line_exit(main, "--workdir", str(tmp_path / "run"), "--steps", "2", "--ckpt-every", "2", *TINY_FLAGS)
    assert message.startswith("error: non-finite loss, gradients and parameters at step 0 (loss nan); stopping. "
                              "No checkpoint of the run in "), message


def test_a_second_trainer_on_a_workdir_is_refused_naming_the_first(run_copy):
    with WorkdirLock(run_copy):
        message = one_line_exit(main, "--workdir", run_copy, "--steps", "6", "--ckpt-every", "2", *TINY_FLAGS)
    assert f"in use by another trainer (pid {os.getpid()} on {socket.gethostname()})" in message
    assert checkpoints.committed_steps(run_copy) == [2, 4]


def test_a_lock_file_that_cannot_be_opened_is_one_line_for_both_trainers(tmp_path):
    from unet_torch.train import main as torch_main

    for cli, flags in ((main, TINY_FLAGS), (torch_main, ["--batch-size", "8", "--n-T", "20", "--sample-steps", "3"])):
        workdir = tmp_path / cli.__module__
        (workdir / LOCK_FILE).mkdir(parents=True)  # a folder where the lock file goes
        message = one_line_exit(cli, "--workdir", str(workdir), "--steps", "1", *flags)
        assert message == f"error: cannot open the workdir's lock file {workdir / LOCK_FILE}: Is a directory"


def test_the_lock_of_a_killed_trainer_does_not_block_its_resume(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ddpm_recipe.run_folder import WorkdirLock; "
                               "lock = WorkdirLock(sys.argv[1]); print('locked', flush=True); time.sleep(600)", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirBusyError, match=f"pid {holder.pid}"):
            WorkdirLock(str(tmp_path))
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    WorkdirLock(str(tmp_path)).release()  # the kernel dropped the dead holder's lock


# Orbax's reads still in flight after the failed one used to print "Event loop is closed"
# tracebacks amid the one-line warning; pytest reports such prints as this warning.
def _truncate_its_data(step_dir):
    data_files = [os.path.join(root, name) for root, _, names in os.walk(step_dir)
                  for name in names if "/d/" in os.path.join(root, name)]
    assert data_files, f"expected OCDBT data files under {step_dir}"
    for path in data_files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def _remove_its_metadata(step_dir):  # as a copy or a sync that stopped short of the last file
    os.remove(os.path.join(step_dir, "default", "_METADATA"))


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [_truncate_its_data, _remove_its_metadata], ids=["truncated", "incomplete"])
def test_a_truncated_latest_checkpoint_falls_back_to_the_one_before_and_is_set_aside(damage, run_copy, capsys):
    damage(os.path.join(run_copy, "checkpoints", "4"))
    state = train(Config(workdir=run_copy, steps=6, ckpt_every=2, **TINY))
    out = capsys.readouterr().out
    assert int(state.step) == 6
    assert "checkpoint step 4 in" in out and "cannot be restored" in out and f"resumed {run_copy} from step 2" in out
    aside = os.path.join(run_copy, checkpoints.SET_ASIDE_DIR)
    assert [name.split("-")[0] for name in os.listdir(aside)] == ["4"], "the bad checkpoint is kept, never deleted"
    assert checkpoints.committed_steps(run_copy)[-1] == 6


def test_only_callbacks_into_a_closed_event_loop_are_kept_quiet(monkeypatch):
    passed_on = []
    monkeypatch.setattr(sys, "unraisablehook", passed_on.append)
    checkpoints._quiet_reads_left_by_a_failed_restore()
    checkpoints._quiet_reads_left_by_a_failed_restore()  # installed once, however many restores
    loop = asyncio.new_event_loop()
    loop.close()
    for cause in (lambda: loop.call_soon_threadsafe(print), lambda: loop.call_soon(print), lambda: 1 / 0):
        try:
            cause()
        except Exception as error:
            sys.unraisablehook(types.SimpleNamespace(exc_type=type(error), exc_value=error, object=None,
                                                     exc_traceback=error.__traceback__, err_msg=None))
    # The same message from another caller, and any other error, still reach the hook that was there.
    assert [type(u.exc_value) for u in passed_on] == [RuntimeError, ZeroDivisionError]
    assert str(passed_on[0].exc_value) == "Event loop is closed"


def test_a_checkpoint_missing_its_metadata_is_skipped_by_the_readers(run_copy, tmp_path):
    os.remove(os.path.join(run_copy, "checkpoints", "4", "default", "_METADATA"))
    out = str(tmp_path / "out.pt")
    assert export.export(run_copy, out) == 2
    assert os.path.isdir(os.path.join(run_copy, "checkpoints", "4")), "readers leave the workdir as it is"


def test_no_readable_checkpoint_is_one_line(run_copy):
    for step in ("2", "4"):
        os.remove(os.path.join(run_copy, "checkpoints", step, "default", "_METADATA"))
    message = one_line_exit(main, "--workdir", run_copy, "--steps", "6", "--ckpt-every", "2", *TINY_FLAGS)
    assert "no checkpoint in" in message and "can be restored" in message
    message = one_line_exit(export.main, "--workdir", run_copy, "--out", os.path.join(run_copy, "m.pt"))
    assert "can be restored" in message


def test_an_unwritable_checkpoint_folder_is_refused_before_training(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("x")
    message = one_line_exit(main, "--workdir", str(workdir), "--steps", "2", "--ckpt-every", "2", *TINY_FLAGS)
    assert "cannot write to" in message and "checkpoints" in message
    assert "compiled the train step" not in capsys.readouterr().out


def _raise_no_space(self, step, *args, **kwargs):
    raise OSError(28, "No space left on device")


def _write_nothing(self, step, *args, **kwargs):
    return True  # as when Orbax's background write fails: it logs the error and carries on


@pytest.mark.parametrize("save,reason", [(_raise_no_space, "No space left on device"),
                                         (_write_nothing, "it never reached the disk")], ids=["raises", "silent"])
def test_a_failed_save_stops_the_run_at_once_in_one_line(save, reason, tmp_path, monkeypatch, capsys):
    real_save = train_module.ocp.CheckpointManager.save
    exits = []
    flags = ["--workdir", str(tmp_path / "run"), "--steps", "6", "--ckpt-every", "2", *TINY_FLAGS]
    with monkeypatch.context() as patch:  # not undo(): that would drop conftest's XLA_FLAGS guard too
        patch.setattr(train_module.ocp.CheckpointManager, "save",  # step 2 saves, step 4's save fails
                      lambda self, step, *args, **kwargs: (save if step == 4 else real_save)(self, step, *args, **kwargs))
        patch.setattr(train_module.os, "_exit", lambda code: exits.append(code) or sys.exit(code))
        with pytest.raises(SystemExit):
            main(flags)
    err = capsys.readouterr().err
    assert exits == [1]
    assert err.count("\n") == 1 and "saving the checkpoint of step 4" in err and reason in err, err
    assert checkpoints.committed_steps(str(tmp_path / "run")) == [2]  # the last complete checkpoint is kept
    main(flags)  # and the same command resumes from it
    assert f"resumed {tmp_path / 'run'} from step 2" in capsys.readouterr().out
    assert checkpoints.committed_steps(str(tmp_path / "run"))[-1] == 6


def test_a_torn_last_metrics_line_is_dropped_on_resume(run_copy, capsys):
    path = os.path.join(run_copy, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # a crash in the middle of a write
    trim_metrics(path, 4)
    assert "dropped 1 unreadable line(s)" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(path)] == [2, 4]


# ----------------------------------------------------------------------------------------- hangs

def _launch_alone(process_id: int, port: int):
    return subprocess.run(
        [sys.executable, "-m", "unet_jax.train", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(process_id), "--init-timeout", "3", "--workdir", "unused", *TINY_FLAGS],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_coordinator_whose_peers_never_start_names_them_and_exits():
    port = _free_port()
    result = _launch_alone(0, port)
    assert result.returncode == 1
    assert f"waiting for 2 processes at 127.0.0.1:{port}" in result.stdout
    assert result.stderr.strip() == (f"error: process id(s) 1 of 2 never connected to 127.0.0.1:{port} within "
                                     "--init-timeout 3 s; start them with the same --coordinator and --num-processes")


def _roll_call_in_threads(timeouts: dict[int, float], n: int, start_delays: dict[int, float] | None = None,
                          starts_after: dict[int, int] | None = None) -> dict:
    """Run devices._roll_call for the given process ids in threads; returns {id: None or the error}.
    A process in ``starts_after`` starts once the named one's roll call has ended."""
    port, results = _free_port(), {}
    start_delays, starts_after = start_delays or {}, starts_after or {}

    def one(pid):
        if pid in starts_after:
            threads[starts_after[pid]].join()
        time.sleep(start_delays.get(pid, 0))
        cluster = devices.Cluster(coordinator=f"127.0.0.1:{port}", num_processes=n, process_id=pid,
                                  init_timeout_s=timeouts[pid])
        try:
            devices._roll_call(cluster, log=lambda *a, **k: None)
            results[pid] = None
        except devices.RollCallError as error:
            results[pid] = str(error)

    threads = {pid: threading.Thread(target=one, args=(pid,)) for pid in timeouts}
    for thread in threads.values():
        thread.start()
    for thread in threads.values():
        thread.join(timeout=60)
    return results


def test_a_process_whose_coordinator_never_starts_says_so():
    results = _roll_call_in_threads({1: 2}, n=2)
    assert results[1].startswith("process 0 (the coordinator at 127.0.0.1:")


def test_a_roll_call_gathers_everyone_and_forgets_those_who_gave_up():
    assert _roll_call_in_threads({0: 20, 1: 20, 2: 20}, n=3, start_delays={2: 1}) == {0: None, 1: None, 2: None}
    # Process 1 comes early and gives up after 1 s; process 2 comes only then: process 0 must not
    # count process 1 as present, or jax.distributed would start one process short.
    results = _roll_call_in_threads({0: 5, 1: 1, 2: 5}, n=3, starts_after={2: 1})
    assert results[0].startswith("process id(s) 1 of 3 never connected"), results


# ---------------------------------------------------------------------- wrong inputs accepted silently

@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.complex64])
def test_non_float_weights_are_refused_naming_the_keys(dtype, tmp_path):
    state_dict = flax_to_torch(init_variables(jax.random.key(0)))
    state_dict["decoder.out.bias"] = state_dict["decoder.out.bias"].to(dtype)
    for path in (tmp_path / "w.pt", tmp_path / "w.safetensors"):
        if path.suffix == ".pt":
            torch.save(state_dict, path)
        elif dtype != torch.complex64:  # safetensors cannot hold complex tensors at all
            save_file(dict(state_dict), str(path))
        else:
            continue
        with pytest.raises(CheckpointMismatchError, match=r"non-float tensor.*\n  not float: decoder\.out\.bias"):
            torch_to_flax(path)


def test_the_trainer_refuses_integer_init_weights_and_writes_nothing(weights, tmp_path):
    workdir = tmp_path / "run"
    message = one_line_exit(main, "--workdir", str(workdir), "--init-from", weights["int8.pt"], *TINY_FLAGS)
    assert "non-float tensor" in message and weights["int8.pt"] in message
    assert not workdir.exists()


def test_the_model_refuses_integer_images_and_timesteps_outside_0_1():
    variables = init_variables(jax.random.key(0))
    x, t = jnp.zeros((2, 28, 28, 1)), jnp.array([0.5, 0.5])
    with pytest.raises(ValueError, match=r"expected x as floats in \[-1, 1\].*got uint8"):
        Unet().apply(variables, jnp.zeros((2, 28, 28, 1), jnp.uint8), t)
    with pytest.raises(ValueError, match=r"expected t as floats holding timestep / n_T in \[0, 1\], got int32"):
        Unet().apply(variables, x, jnp.array([500, 500]))
    for bad in ([500.0, 500.0], [0.5, -0.1], [np.nan, 0.5]):
        with pytest.raises(ValueError, match=r"expected t = timestep / n_T in \[0, 1\]"):
            Unet().apply(variables, x, jnp.array(bad))
    # Under jit the values are not known: the checks that need them step aside, the dtype checks stay.
    assert jax.jit(lambda t: Unet().apply(variables, x, t))(t).shape == (2, 28, 28, 1)
    with pytest.raises(ValueError, match="expected x as floats"):
        jax.jit(lambda x: Unet().apply(variables, x, t))(jnp.zeros((2, 28, 28, 1), jnp.uint8))


# ------------------------------------------------------------------- tracebacks where one line is due

BAD_FILES = {"missing.pt": "no weights file at", "a_directory": "is a directory, not a weights file",
             "empty.pt": "is empty (0 bytes)", "truncated.pt": "may be truncated",
             "wrong_keys.pt": "does not match the tutorial's Unet", "pickle.pt": "refusing to load",
             # Not pickled code: neither torch's advice to load it with weights_only=False nor "refusing".
             "html.pt": "as a torch checkpoint: it is not a torch.save file",
             "lfs.safetensors": "is a Git LFS pointer, not the weights: fetch them with `git lfs pull`"}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_train_init_from_a_bad_file_is_one_line_and_writes_nothing(name, weights, tmp_path):
    workdir = tmp_path / "run"
    message = one_line_exit(main, "--workdir", str(workdir), "--init-from", weights[name], *TINY_FLAGS)
    assert BAD_FILES[name] in message and weights[name] in message
    assert not workdir.exists(), "a failed --init-from leaves no workdir behind"
    assert not os.path.exists(weights["pickle.pt"].replace("pickle.pt", "pwned"))


@pytest.mark.parametrize("name", ["pickle.pt", "truncated.safetensors", "wrong_keys.pt"])
def test_evaluate_a_bad_torch_checkpoint_is_one_line(name, weights, tmp_path):
    message = one_line_exit(evaluate.main, "--workdir", str(tmp_path / "w"), "--torch-checkpoint", weights[name])
    assert weights[name] in message and "--torch-checkpoint" in message


@pytest.mark.parametrize("name", ["missing.pt", "pickle.pt", "int8.pt"])
def test_parity_bad_weights_is_one_line(name, weights):
    from parity.__main__ import main as parity_main

    message = one_line_exit(parity_main, "--weights", weights[name])
    assert weights[name] in message and "--weights" in message


@pytest.mark.parametrize("name", ["missing.pt", "empty.pt", "truncated.pt", "wrong_keys.pt", "pickle.pt", "int8.pt",
                                  "html.pt", "lfs.safetensors"])
def test_torch_trainer_init_from_a_bad_file_is_one_line(name, weights, tmp_path):
    from unet_torch.train import main as torch_main

    message = one_line_exit(torch_main, "--workdir", str(tmp_path / "t"), "--init-from", weights[name], "--steps", "1")
    expected = BAD_FILES | {"int8.pt": "holds 43 non-float tensor(s), expected float weights"}
    assert weights[name] in message and expected[name] in message and "weights_only=False" not in message


def test_torch_trainer_with_a_damaged_own_checkpoint_is_one_line(weights, tmp_path):
    from unet_torch.train import main as torch_main

    workdir = tmp_path / "t"
    flags = ["--workdir", str(workdir), "--batch-size", "8", "--n-T", "20", "--sample-steps", "3", "--num-samples", "4"]
    torch_main([*flags, "--steps", "1"])
    blob = (workdir / "checkpoint.pt").read_bytes()
    (workdir / "checkpoint.pt").write_bytes(blob[: len(blob) // 2])
    message = one_line_exit(torch_main, *flags, "--steps", "2")
    assert "the run's own checkpoint" in message and "Move it away" in message


def test_sample_from_a_missing_workdir_and_too_many_steps_is_one_line(run_copy, tmp_path):
    message = one_line_exit(sample.main, "--workdir", str(tmp_path / "nope"))
    assert "no workdir at" in message
    message = one_line_exit(sample.main, "--workdir", run_copy, "--sample-steps", "2000")
    assert message == "error: --sample-steps 2000 exceeds the run's n_T 20"


def test_export_makes_the_folder_of_its_output(run_copy, tmp_path):
    out = tmp_path / "new" / "folder" / "model.pt"
    export.main(["--workdir", run_copy, "--out", str(out)])
    assert out.is_file()


def test_download_without_network_says_where_to_put_the_files(monkeypatch, tmp_path):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    root = str(tmp_path / "mnist")
    message = one_line_exit(main, "--workdir", str(tmp_path / "w"), "--data", root, "--download", *TINY_FLAGS)
    assert "could not download MNIST" in message and os.path.join(root, "MNIST", "raw") in message
    assert "train-images-idx3-ubyte.gz" in message


def test_download_without_torchvision_names_the_extra(monkeypatch, tmp_path):
    # As a JAX-only install: `import torchvision` raises ImportError.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    message = one_line_exit(main, "--workdir", str(tmp_path / "w"), "--data", str(tmp_path / "mnist"), "--download",
                            *TINY_FLAGS)
    assert "fetches MNIST with torchvision, which is not installed" in message
    assert "pip install 'unet-jax[torch]'" in message and not os.path.exists(tmp_path / "w")


def test_a_lost_config_json_says_how_to_recover_and_adopt_does(run_copy):
    os.remove(os.path.join(run_copy, "config.json"))
    flags = ["--workdir", run_copy, "--steps", "4", "--ckpt-every", "2", *TINY_FLAGS]
    message = one_line_exit(main, *flags)
    assert "holds checkpoints but no config.json" in message and "--adopt" in message
    assert "None" not in message
    main([*flags, "--adopt"])  # already at step 4: nothing to train
    assert json.load(open(os.path.join(run_copy, "config.json")))["batch_size"] == 8
    assert export.export(run_copy, os.path.join(run_copy, "m.pt")) == 4


def test_readers_of_checkpoints_without_config_json_say_so(run_copy):
    os.remove(os.path.join(run_copy, "config.json"))
    for run, extra in ((export.main, ["--out", os.path.join(run_copy, "m.pt")]), (sample.main, [])):
        message = one_line_exit(run, "--workdir", run_copy, *extra)
        assert "has checkpoints but no config.json" in message and "--adopt" in message


# ------------------------------------------------------------------------------ found by reading

def test_only_lost_peer_errors_become_process_stopped():
    assert train_module._is_lost_peer(jax.errors.JaxRuntimeError("UNAVAILABLE: Connection closed by peer"))
    assert not train_module._is_lost_peer(ValueError("Incompatible shapes for broadcasting: (8, 28) and (4, 28)"))


def test_committed_steps_are_only_finished_checkpoints(tmp_path):
    for name in ("2", "4", "6.orbax-checkpoint-tmp-1732950000"):
        os.makedirs(tmp_path / "checkpoints" / name)
    assert checkpoints.committed_steps(str(tmp_path)) == [2, 4]


def test_only_process_0_downloads(monkeypatch):
    calls = []
    monkeypatch.setattr(data, "download", lambda root: calls.append(root))
    parse_config(build_parser(), ["--data", "/r", "--download", "--distributed"])
    assert calls == [], "parsing downloads nothing: the process id is not known before jax.distributed starts"
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    train_module.download_once("/r")
    assert calls == []
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    train_module.download_once("/r")
    assert calls == ["/r"]


def test_the_other_processes_learn_that_process_0_failed_its_own_check(monkeypatch, tmp_path):
    """Process 0 alone downloads and takes the workdir's lock; the others stop with its outcome, in one line."""
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(devices, "is_primary", lambda: False)
    monkeypatch.setattr(devices, "agree", lambda ok: False)  # process 0 reports that its check failed
    monkeypatch.setattr(data, "download", lambda root: pytest.fail("only process 0 downloads"))
    with pytest.raises(data.MnistError, match=r"^process 0 could not download MNIST into /r; see its error$"):
        train_module.download_once("/r")
    workdir = str(tmp_path / "run")
    with pytest.raises(WorkdirBusyError, match=rf"^process 0 found {workdir} in use by another trainer$"):
        train(Config(workdir=workdir, steps=1, **TINY))
    assert not os.path.exists(os.path.join(workdir, LOCK_FILE))  # the others never take the lock


def test_a_refusal_by_another_process_stops_this_one_too(monkeypatch, tmp_path):
    """Each process compares its own data and weights files with the workdir's record; where
    another process's differ, this one stops with it, in one line, rather than wait at a barrier."""
    workdir = str(tmp_path / "run")
    train(Config(workdir=workdir, steps=2, ckpt_every=2, **TINY))
    checks, answers = [], iter([True, False])  # every process read its files; another refused the workdir
    monkeypatch.setattr(devices, "everywhere", lambda ok: checks.append(ok) or next(answers))
    with pytest.raises(checkpoints.IncompatibleWorkdirError, match=rf"^another process of the run found that {workdir} "
                                                                  r"holds checkpoints of a different run; see its error$"):
        train(Config(workdir=workdir, steps=4, ckpt_every=2, **TINY))
    assert checks == [True, True]  # this process's own reads and check passed
    assert checkpoints.restore_latest_params(workdir)[1]["step"] == 2


def test_data_or_weights_that_another_process_cannot_read_stop_this_one_too(monkeypatch, tmp_path):
    """Each process reads its own copies of the data and --init-from weights; where another
    process cannot, this one stops with it, in one line and before writing anything, rather than
    wait at the next collective for a process that has left."""
    workdir = tmp_path / "run"
    checks = []
    monkeypatch.setattr(devices, "everywhere", lambda ok: checks.append(ok) or False)
    with pytest.raises(SystemExit) as info:
        main(["--workdir", str(workdir), "--steps", "2", *TINY_FLAGS])
    assert info.value.code == ("error: another process of the run could not use its --data or --init-from; "
                               "see its error")
    assert checks == [True] and not workdir.exists()


@pytest.mark.parametrize("bad", ["data", "init_from", "batch"])
def test_a_process_that_cannot_read_its_data_or_weights_tells_the_others(monkeypatch, tmp_path, bad):
    """The process whose own read fails still takes part in the collective (with False), so the
    others stop too, then raises its own error."""
    workdir, flags = tmp_path / "run", {"data": ["--data", str(tmp_path / "missing")],
                                        "init_from": ["--init-from", str(tmp_path / "missing.pt")],
                                        "batch": ["--batch-size", "6000"]}[bad]
    checks = []
    monkeypatch.setattr(devices, "everywhere", lambda ok: checks.append(ok) or ok)
    with pytest.raises(SystemExit) as info:
        main(["--workdir", str(workdir), "--steps", "2", *TINY_FLAGS, *flags])
    assert info.value.code.startswith("error: ") and "another process" not in info.value.code
    assert checks == [False] and not workdir.exists()


def test_no_sched_getaffinity_as_on_macos(monkeypatch):
    from benchmarks.machine import machine

    monkeypatch.delattr(os, "sched_getaffinity")
    assert devices.usable_cores() == os.cpu_count()
    assert machine()["cores"] == os.cpu_count()


def test_the_classifier_data_order_key_is_no_step_key():
    init_key, order_key, jitter_key = evaluate.classifier_keys(0)
    step_keys = [jax.random.fold_in(jitter_key, step) for step in range(100)]
    assert not any(np.array_equal(jax.random.key_data(order_key), jax.random.key_data(k))
                   for k in [init_key, jitter_key, *step_keys])


def test_the_classifier_cache_key_follows_the_architecture(monkeypatch):
    before = evaluate._recipe_fingerprint()

    class Linear(evaluate.LeNet):
        @evaluate.nn.compact
        def __call__(self, x, *, features=False):
            return evaluate.nn.Dense(10)(x.reshape(x.shape[0], -1))

    monkeypatch.setattr(evaluate, "LeNet", Linear)
    assert evaluate._recipe_fingerprint() != before


def test_a_classifier_cache_without_its_record_is_retrained_not_a_crash(tmp_path, monkeypatch):
    # What is under test is the cache, not the training: each "training" returns fresh weights at once.
    trained = []
    untrained = evaluate.LeNet().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    monkeypatch.setattr(evaluate, "train_classifier", lambda *a, **k: trained.append(1) or untrained)
    evaluate.load_or_train_classifier(data.BUNDLED, str(tmp_path), epochs=1)
    for name in os.listdir(tmp_path):
        if name.endswith(".json"):
            os.remove(tmp_path / name)  # as a crash between the two writes would leave it
    params, acc, _ = evaluate.load_or_train_classifier(data.BUNDLED, str(tmp_path), epochs=1)
    assert len(trained) == 2 and 0 <= acc <= 1


def test_a_refused_pickle_never_runs(weights):
    with pytest.raises(WeightsFileError, match="refusing to load"):
        torch_to_flax(weights["pickle.pt"])
    assert not os.path.exists(os.path.join(os.path.dirname(weights["pickle.pt"]), "pwned"))


def test_a_run_that_lost_a_process_does_not_wait_for_its_save_in_flight(tmp_path):
    # Orbax finishes a save at a barrier with every process; with one gone the barrier only fails after the
    # heartbeat timeout, and JAX then aborts the survivor: so the trainer abandons the save instead.
    class BarrierWithALostProcess:
        def wait_until_finished(self):
            raise jax.errors.JaxRuntimeError("Barrier failed because: Task 1 heartbeat timeout")

        def close(self):
            self.wait_until_finished()

    saves = checkpoints.ConfirmedSaves(BarrierWithALostProcess(), str(tmp_path), primary=True)
    saves.in_flight = 10
    with pytest.raises(jax.errors.JaxRuntimeError):
        saves.close()
    saves.abandon()
    saves.close()  # returns at once


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path):
    path = tmp_path / "config.json"
    write_atomically(str(path), "old")
    (tmp_path / "blocked").mkdir()  # a folder where the file would be: the rename fails
    with pytest.raises(OSError):
        write_atomically(str(tmp_path / "blocked"), "new")
    write_atomically(str(path), "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["blocked", "config.json"]
