"""The JAX trainer end to end: outputs, resume, kill-and-resume, guards and bad input."""

import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.jax_bench import train_program
from ddpm_recipe.run_folder import identity_differences, recorded_identity
from ddpm_recipe.schedule import linear_schedule
from ddpm_recipe.settings import IDENTITY, SettingsError
from unet_jax import autotune, checkpoints, data
from unet_jax import step as step_module
from unet_jax import train as train_module
from unet_jax.flags import build_parser, parse_config
from unet_jax.layers import ConvPlan
from unet_jax.model import Unet, conv_layers, init_variables
from unet_jax.train import Config, main, train

# An explicit 3x3 conv lowering keeps these runs from timing the lowerings first (tests/test_autotune.py
# covers that); tapgrad is the one with a custom gradient.
TINY = dict(batch_size=8, n_T=20, sample_steps=3, num_samples=4, log_every=2, sample_every=0, warmup_steps=2,
            conv="tapgrad")
TINY_FLAGS = ["--batch-size", "8", "--n-T", "20", "--sample-steps", "3", "--num-samples", "4", "--log-every", "2",
              "--sample-every", "0", "--warmup-steps", "2", "--conv", "tapgrad"]


def _params(workdir):
    return checkpoints.restore_latest_params(str(workdir))[1]


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A TINY run of 2 steps, checkpointed at step 2, trained once for the tests that start from one."""
    workdir = tmp_path_factory.mktemp("two_steps") / "run"
    train(Config(workdir=str(workdir), steps=2, ckpt_every=2, **TINY))
    return workdir


@pytest.fixture
def at_step_2(two_steps, tmp_path):
    """A copy of ``two_steps``'s workdir (``tmp_path/run``) for one test to go on from, or to harm."""
    return shutil.copytree(two_steps, tmp_path / "run")


TEN_SINGLE_STEPS = dict(steps=10, ckpt_every=0, steps_per_dispatch=1, **(TINY | {"log_every": 4}))


@pytest.fixture(scope="module")
def ten_single_steps(tmp_path_factory):
    """(final state, workdir) of a TINY run of 10 steps, one per dispatch, logged every 4."""
    workdir = tmp_path_factory.mktemp("ten_single_steps") / "run"
    return train(Config(workdir=str(workdir), **TEN_SINGLE_STEPS)), workdir


def test_tiny_run_writes_everything_and_resumes(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    state = train(Config(workdir=workdir, steps=4, ckpt_every=2, **TINY))
    assert int(state.step) == 4
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in rows)
    assert os.path.isfile(os.path.join(workdir, "samples", "step_4.png"))
    assert os.path.isfile(os.path.join(workdir, "loss.png"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[:2] == ["2", "4"]
    assert json.load(open(os.path.join(workdir, "config.json")))["batch_size"] == 8

    capsys.readouterr()
    state = train(Config(workdir=workdir, steps=6, ckpt_every=2, **TINY))  # continues to the new total
    assert int(state.step) == 6 and _params(workdir)["step"] == 6
    assert "other device programs" not in capsys.readouterr().out  # the same programs: nothing to warn of
    assert len(open(os.path.join(workdir, "metrics.jsonl")).readlines()) == 3


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train(Config(workdir=straight, steps=6, ckpt_every=0, **TINY))
    train(Config(workdir=split, steps=3, ckpt_every=0, **TINY))
    train(Config(workdir=split, steps=6, ckpt_every=0, **TINY))
    a, b = _params(straight), _params(split)
    for key in ("params", "ema_params"):
        for x, y in zip(jax.tree.leaves(a[key]), jax.tree.leaves(b[key])):
            np.testing.assert_array_equal(x, y)


def test_steps_per_dispatch_equals_one_step_per_dispatch(ten_single_steps, tmp_path, capsys):
    # Chunks of 3 around log boundaries every 4 steps: 3+1, 3+1, 1+1 steps per dispatch.
    one, one_workdir = ten_single_steps
    chunked = train(Config(workdir=str(tmp_path / "chunked"), **(TEN_SINGLE_STEPS | {"steps_per_dispatch": 3})))
    assert int(chunked.step) == 10
    assert "note: --log-every 4 not a multiple of --steps-per-dispatch 3" in capsys.readouterr().out
    # The 3-step program fuses differently, so float32 sums round differently (~1e-7). Adam turns
    # that into a visible share of an lr-sized step where a gradient is ~0 (conv biases before a
    # GroupNorm), as across device counts (tests/test_scaling.py); measured here: 2e-5 of the norm.
    for key in ("params", "ema_params"):
        a, b = jax.tree.leaves(getattr(one, key)), jax.tree.leaves(getattr(chunked, key))
        diff = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b)))
        norm = np.sqrt(sum(np.sum(x**2) for x in a))
        assert diff <= 1e-4 * norm, (key, diff, norm)
    rows = {name: [json.loads(line) for line in open(folder / "metrics.jsonl")]
            for name, folder in (("one", one_workdir), ("chunked", tmp_path / "chunked"))}
    assert [r["step"] for r in rows["chunked"]] == [r["step"] for r in rows["one"]] == [4, 8, 10]
    np.testing.assert_allclose([r["loss"] for r in rows["chunked"]], [r["loss"] for r in rows["one"]], rtol=1e-6)


def test_the_trainer_trains_on_the_batches_timesteps_and_noise_its_docstring_promises(ten_single_steps):
    # The trainer's own program against a plain loop of apply_update (which tests/test_train_parity.py
    # holds to torch), fed as unet_jax/train.py documents, written here with jax.random and NumPy alone:
    # epoch e's order is permutation(fold_in(data_key, e)); step s's t ~ U{1..n_T} and noise come from
    # fold_in(noise_key, s); pixels go through the tutorial's ToTensor and Normalize((0.5,), (0.5,)).
    trained, workdir = ten_single_steps
    config = Config(workdir=str(workdir), **TEN_SINGLE_STEPS)
    init_key, data_key, noise_key, _ = step_module.run_keys(config.seed)
    tx = step_module.make_optimizer(config)
    state = step_module.create_state(init_variables(init_key)["params"], tx)
    update = jax.jit(functools.partial(step_module.apply_update, model=Unet(conv=config.conv), tx=tx,
                                       schedule=linear_schedule(config.n_T), ema_decay=config.ema_decay))
    images = data.load(config.data, "train").images
    per_epoch, b = len(images) // config.batch_size, config.batch_size
    losses = []
    for s in range(config.steps):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(data_key, s // per_epoch), len(images)))
        x0 = (images[order[(s % per_epoch) * b:(s % per_epoch + 1) * b]].astype(np.float32) / 255 - 0.5) / 0.5
        t_key, eps_key = jax.random.split(jax.random.fold_in(noise_key, s))
        t = jax.random.randint(t_key, (b,), 1, config.n_T + 1)
        state, metrics = update(state, x0, t, jax.random.normal(eps_key, x0.shape))
        losses.append(float(metrics["loss"]))
    logged = [json.loads(line)["loss"] for line in open(workdir / "metrics.jsonl")]
    # The trainer's program (shard_map over the run's devices, the metrics folded in) rounds float32
    # sums in another order, which Adam turns into a visible share of an lr-sized step where a gradient
    # is ~0 (as across device counts, tests/test_scaling.py): measured 2.7 % of the update after 10
    # steps, the window losses 2e-5 apart (5e-5 on one core). The same noise at every step (fold_in of
    # the step dropped) measured 88 % of the update and losses 0.4 to 2.5 % apart. Bounds: 10 % of
    # the update, 1e-3 of the loss (as tests/test_scaling.py's).
    np.testing.assert_allclose(logged, [np.mean(losses[:4]), np.mean(losses[4:8]), np.mean(losses[8:])], rtol=1e-3)
    initial = jax.tree.leaves(init_variables(init_key)["params"])
    for key in ("params", "ema_params"):
        ours, reference = jax.tree.leaves(getattr(trained, key)), jax.tree.leaves(getattr(state, key))
        diff = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(ours, reference)))
        update_norm = np.sqrt(sum(np.sum((y - start) ** 2) for y, start in zip(reference, initial)))
        assert diff <= 0.1 * update_norm, (key, diff, update_norm)


def test_the_steps_run_as_a_loop_unless_a_layer_keeps_xlas_convolution():
    # Inside a while loop XLA:CPU runs lax.conv's weight gradients many times slower (jax-ml/jax#12868):
    # a plan with XLA's convolution in any layer, or the plain transposed convolutions, must stay unrolled.
    mixed = ConvPlan("tapgrad", (("28x28 1->64", "xla"),))
    assert step_module.loops_at_full_speed(Unet(conv="tapgrad"))
    assert step_module.loops_at_full_speed(Unet(conv=ConvPlan("xla", tuple((k, "im2col") for k in conv_layers()))))
    assert not step_module.loops_at_full_speed(Unet(conv="xla"))
    assert not step_module.loops_at_full_speed(Unet(conv=mixed))
    assert not step_module.loops_at_full_speed(Unet(conv="tapgrad", fast=False))
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    for conv, loops in (("tapgrad", True), (mixed, False)):
        program, args = train_program(np.zeros((4, 28, 28, 1), np.uint8), 2, "float32", mesh, 3, conv)
        (steps,) = [e for e in program.trace(*args).jaxpr.eqns if e.primitive.name == "scan"]
        assert steps.params["length"] == 3 and steps.params["unroll"] == (1 if loops else 3), conv


def test_dispatches_stop_at_every_log_checkpoint_and_sample():
    config = Config(steps=23, log_every=10, ckpt_every=15, sample_every=0, steps_per_dispatch=5)
    sizes, step = [], 0
    while step < config.steps:
        sizes.append(step_module.steps_in_dispatch(config, step))
        step += sizes[-1]
    # 0-10 in fives, 10-15 (checkpoint), 15-20 (log), then single steps to the end at 23.
    assert sizes == [5, 5, 5, 5, 1, 1, 1]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, warm_autotune_cache):
    # The program `make train` runs: a device per core, 5 steps per dispatch (logs and checkpoints
    # at multiples of 5), the 3x3 conv lowerings chosen by --conv auto, here from a warm cache
    # that mixes lowerings as a measured plan does.
    flags = TINY_FLAGS[:-4] + ["--log-every", "5", "--steps", "25", "--ckpt-every", "5"]
    assert "--conv" not in flags and Config().steps_per_dispatch == 5
    plan = ConvPlan("tapgrad", (("28x28 1->64", "im2col"),))
    env = warm_autotune_cache(tmp_path / "autotune", train=plan, sample="xla") | {"PYTHONUNBUFFERED": "1"}
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    subprocess.run([sys.executable, "-m", "unet_jax.train", "--workdir", straight, *flags], check=True, env=env,
                   capture_output=True, timeout=300)

    proc = subprocess.Popen([sys.executable, "-m", "unet_jax.train", "--workdir", killed, *flags], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not os.path.isdir(os.path.join(killed, "checkpoints", "10")) and time.time() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        assert os.path.isdir(os.path.join(killed, "checkpoints", "10")), "no checkpoint of step 10 was written"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    interrupted_at = _params(killed)["step"]
    assert 10 <= interrupted_at < 25, interrupted_at

    subprocess.run([sys.executable, "-m", "unet_jax.train", "--workdir", killed, *flags], check=True, env=env,
                   capture_output=True, timeout=300)
    a, b = _params(straight), _params(killed)
    assert a["step"] == b["step"] == 25
    assert checkpoints.read_conv_plan(straight) == checkpoints.read_conv_plan(killed) == plan  # auto read the cache
    for key in ("params", "ema_params"):
        for x, y in zip(jax.tree.leaves(a[key]), jax.tree.leaves(b[key])):
            np.testing.assert_array_equal(x, y)


def test_resume_reuses_the_recorded_conv_lowerings(at_step_2, monkeypatch, capsys):
    # Any recorded plan other than what auto would measure serves: TINY's tapgrad.
    workdir = str(at_step_2)
    assert checkpoints.read_conv_plan(workdir) == ConvPlan("tapgrad")

    def no_measuring(*args, **kwargs):
        raise AssertionError("a resumed run must not measure the lowerings again")

    monkeypatch.setattr(autotune, "measure", no_measuring)
    state = train(Config(workdir=workdir, steps=4, ckpt_every=0, **(TINY | {"conv": "auto"})))
    assert int(state.step) == 4 and checkpoints.read_conv_plan(workdir) == ConvPlan("tapgrad")
    assert f"3x3 conv lowerings (as recorded in {workdir}): tapgrad" in capsys.readouterr().out
    # An explicit --conv overrides the record, and becomes the record. The program settings are recorded.
    train(Config(workdir=workdir, steps=6, ckpt_every=0, **(TINY | {"conv": "xla", "log_every": 1})))
    out = capsys.readouterr().out
    assert "3x3 conv lowerings (--conv): xla" in out
    assert ("note: --conv xla replaces the 3x3 conv lowerings the run recorded (tapgrad), so from here the numbers "
            "differ") in out
    assert checkpoints.read_conv_plan(workdir) == ConvPlan("xla")
    assert json.load(open(os.path.join(workdir, "config.json")))["program"]["log_every"] == 1


def test_only_process_0_measures_the_lowerings_and_every_process_takes_its_plan(tmp_path, monkeypatch, capsys):
    # Processes on one host timing side by side would skew process 0's timings, which are the ones kept.
    monkeypatch.setattr(train_module.devices, "is_primary", lambda: False)
    monkeypatch.setattr(autotune, "resolve", lambda *args, **kwargs: pytest.fail("a process other than 0 measured"))
    monkeypatch.setattr(autotune, "agree_across_processes", lambda plan: ConvPlan("tapgrad"))  # process 0's, broadcast
    config = Config(workdir=str(tmp_path), **(TINY | {"conv": "auto"}))
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    assert train_module._conv_plan(config, mesh, resuming=False) == ConvPlan("tapgrad")


def test_the_lowerings_are_chosen_for_the_runs_compute_dtype(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(autotune, "resolve", lambda conv, batch, mode, **kwargs: asked.append(kwargs["dtype"])
                        or ConvPlan("tapgrad"))
    config = Config(workdir=str(tmp_path), **(TINY | {"conv": "auto", "dtype": "bfloat16"}))
    train_module._conv_plan(config, jax.sharding.Mesh(jax.devices()[:1], ("data",)), resuming=False)
    assert asked == ["bfloat16"]


def test_a_resume_says_when_its_programs_differ_from_the_runs():
    def program(**changes):
        return {"log_every": 50, "ckpt_every": 500, "sample_every": 1000, "steps_per_dispatch": 5, "devices": 2,
                "jax": "0.10.2"} | changes

    changes = step_module.program_changes
    assert changes(program(), program(), 500, 4000) == []
    assert changes(program(), program(log_every=100), 500, 4000) == []  # still 5 steps in every dispatch
    assert changes(program(log_every=2), program(log_every=1), 0, 10) == []  # single steps either way
    assert changes(program(), program(log_every=7), 500, 4000) == ["log-every 50 -> 7"]
    assert changes(program(), program(steps_per_dispatch=1), 500, 4000) == ["steps-per-dispatch 5 -> 1"]
    assert changes(program(), program(devices=1), 500, 4000) == ["devices 2 -> 1"]
    assert changes(None, program(), 500, 4000) == []  # a run from before the record: nothing to compare
    # A record edited by hand (0 steps per dispatch would never advance) is named, not looped over.
    assert changes(program(steps_per_dispatch=0), program(), 500, 4000) == [
        "the record of the run's device programs in its config.json is unreadable"]


def test_a_corrupt_conv_record_is_refused_in_one_line(at_step_2):
    workdir = at_step_2
    (workdir / checkpoints.CONV_PLAN_FILE).write_text("{half a file")
    with pytest.raises(SystemExit, match=r"error: .*conv_plan.json is not a record of 3x3 conv lowerings .*--conv"):
        main(["--workdir", str(workdir), "--steps", "4", *TINY_FLAGS[:-2]])  # --conv auto resumes by the record


def test_a_new_run_measures_its_lowerings_whatever_an_earlier_start_recorded(tmp_path, monkeypatch, capsys):
    # A start killed before its first checkpoint, or one whose checkpoints were moved away, leaves a
    # record that no run needs to match: auto measures for this machine and batch, as for any new run.
    workdir = tmp_path / "run"
    workdir.mkdir()
    checkpoints.write_conv_plan(str(workdir), ConvPlan("xla"))
    monkeypatch.setattr(autotune, "resolve", lambda conv, *args, **kwargs: ConvPlan("tapgrad") if conv == "auto"
                        else pytest.fail(f"--conv {conv}"))
    train(Config(workdir=str(workdir), steps=2, ckpt_every=0, **(TINY | {"conv": "auto"})))
    assert "3x3 conv lowerings (autotuned for this machine): tapgrad" in capsys.readouterr().out
    assert checkpoints.read_conv_plan(str(workdir)) == ConvPlan("tapgrad")


def test_an_explicit_conv_resumes_past_a_damaged_record_of_the_lowerings(at_step_2, capsys):
    workdir = at_step_2
    (workdir / checkpoints.CONV_PLAN_FILE).write_text("{half a file")
    state = train(Config(workdir=str(workdir), steps=4, ckpt_every=2, **TINY))  # --conv tapgrad
    assert int(state.step) == 4 and checkpoints.read_conv_plan(str(workdir)) == ConvPlan("tapgrad")
    assert "replaces the 3x3 conv lowerings" not in capsys.readouterr().out  # nothing readable was replaced


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(at_step_2, monkeypatch):
    workdir = str(at_step_2)
    monkeypatch.setattr(data, "to_model_range", lambda u8: u8.astype(jnp.float32) * jnp.nan)
    with pytest.raises(FloatingPointError, match=r"non-finite loss, gradients and parameters at step 2 \(loss nan\); "
                                                 r"stopping. The last complete checkpoint in .* is step 2, and it is kept"):
        train(Config(workdir=workdir, steps=6, ckpt_every=2, **TINY))
    restored = _params(workdir)
    assert restored["step"] == 2
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(restored["params"]))


def test_a_non_finite_step_stops_the_run_before_it_draws_samples(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(train_module, "_sample_and_plot", lambda *args: drawn.append(args[-1]))
    monkeypatch.setattr(data, "to_model_range", lambda u8: u8.astype(jnp.float32) * jnp.nan)
    # A sample is due at step 2, inside the log window of steps 1 to 4, with no checkpoint due.
    with pytest.raises(FloatingPointError, match=r"^non-finite loss, gradients and parameters at step 0 \(loss nan\); "
                                                 r"stopping. No checkpoint of the run in .* was completed before it.$"):
        train(Config(workdir=str(tmp_path / "run"), steps=4, ckpt_every=0,
                     **(TINY | {"sample_every": 2, "log_every": 4})))
    assert drawn == []


def test_a_run_stopped_while_drawing_its_last_grid_draws_it_on_resume(tmp_path, stop_in):
    workdir = tmp_path / "run"
    config = Config(workdir=str(workdir), steps=4, ckpt_every=2, **(TINY | {"sample_every": 4}))
    stop_in(train_module, "_sample_and_plot", lambda: train(config))  # while the grid of step 4 is drawn
    assert checkpoints.committed_steps(str(workdir)) == [2]  # the last step's checkpoint comes after its grid
    train(config)  # resumes from step 2, and so draws the grid of step 4
    assert (workdir / "samples" / "step_4.png").is_file() and checkpoints.committed_steps(str(workdir))[-1] == 4


def test_non_finite_gradients_with_a_finite_loss_stop_the_run_too(at_step_2, monkeypatch):
    def finite_loss_infinite_gradients(model_fn, schedule, x0, t_B, noise):
        return jnp.sqrt(0.0 * jnp.sum(model_fn(x0, t_B / schedule.n_T)))  # 0, and d sqrt(u)/du at 0 is infinite

    workdir = str(at_step_2)
    monkeypatch.setattr(step_module, "noise_prediction_loss", finite_loss_infinite_gradients)
    with pytest.raises(FloatingPointError, match=r"^non-finite gradients and parameters at step 2 \(loss -?0\); "):
        train(Config(workdir=workdir, steps=6, ckpt_every=2, **TINY))
    assert _params(workdir)["step"] == 2


def test_incompatible_workdir_is_refused_and_untouched(at_step_2):
    workdir = str(at_step_2)
    before = open(os.path.join(workdir, "config.json")).read()
    with pytest.raises(checkpoints.IncompatibleWorkdirError, match=r"batch_size: the workdir has 8, this run asks for 4"):
        train(Config(workdir=workdir, steps=4, ckpt_every=0, **(TINY | {"batch_size": 4})))
    assert open(os.path.join(workdir, "config.json")).read() == before
    assert _params(workdir)["step"] == 2


def test_the_same_digits_from_a_moved_data_folder_are_the_same_run(tmp_path, write_mnist_root, write_idx):
    old = write_mnist_root(tmp_path / "old")  # the bundled digits as a torchvision root: TINY's program again
    workdir, record = str(tmp_path / "run"), lambda: json.load(open(os.path.join(tmp_path, "run", "config.json")))
    train(Config(workdir=workdir, steps=2, ckpt_every=2, data=str(old), **TINY))
    new = old.rename(tmp_path / "new")  # the same digits, elsewhere
    train(Config(workdir=workdir, steps=4, ckpt_every=2, data=str(new), **TINY))
    assert _params(workdir)["step"] == 4 and record()["data"] == str(new)
    images = new / "MNIST" / "raw" / "train-images-idx3-ubyte"  # other digits in the same folder
    write_idx(str(images), 255 - np.frombuffer(images.read_bytes()[16:], np.uint8).reshape(-1, 28, 28), 2051, False)
    with pytest.raises(checkpoints.IncompatibleWorkdirError, match=r"data_fingerprint: the workdir has '[0-9a-f]{16}', "
                                                                  r"this run asks for '[0-9a-f]{16}'"):
        train(Config(workdir=workdir, steps=6, ckpt_every=2, data=str(new), **TINY))


def test_the_same_weights_from_a_moved_file_are_the_same_run_and_other_weights_are_refused(tmp_path):
    import torch

    from parity import flax_to_torch

    def save_weights(path, seed):
        torch.save(flax_to_torch(init_variables(jax.random.key(seed))), path)
        return path

    workdir, record = str(tmp_path / "run"), lambda: json.load(open(os.path.join(workdir, "config.json")))
    start = save_weights(tmp_path / "start.pt", 0)
    train(Config(workdir=workdir, steps=2, ckpt_every=2, init_from=str(start), **TINY))
    began_with = record()["init_from_fingerprint"]
    moved = start.rename(tmp_path / "moved.pt")  # the same weights, elsewhere
    train(Config(workdir=workdir, steps=4, ckpt_every=2, init_from=str(moved), **TINY))
    assert _params(workdir)["step"] == 4 and record()["init_from"] == str(moved)
    other = save_weights(tmp_path / "other.pt", 1)
    with pytest.raises(checkpoints.IncompatibleWorkdirError,
                       match=r"\n  init_from: the workdir has '.*moved\.pt', this run asks for '.*other\.pt'\nUse another"):
        train(Config(workdir=workdir, steps=6, ckpt_every=2, init_from=str(other), **TINY))
    moved.unlink()  # gone from its path: the run's weights are its checkpoint's now
    train(Config(workdir=workdir, steps=6, ckpt_every=2, init_from=str(moved), **TINY))
    assert _params(workdir)["step"] == 6 and record()["init_from_fingerprint"] == began_with


def test_init_weights_compare_by_path_and_where_moved_by_content_and_a_new_run_records_its_own():
    began = {"init_from": "/a.pt", "init_from_fingerprint": "0123456789abcdef"}
    other_weights, gone = {"init_from_fingerprint": "fedcba9876543210"}, {"init_from_fingerprint": None}
    # The same path resumes whatever the file holds now: a resumed run's weights are its checkpoint's.
    assert identity_differences(began, {"init_from": "/a.pt"} | other_weights) == []
    assert identity_differences(began, {"init_from": "/a.pt"} | gone) == []
    # Another path resumes only with the weights the run began with.
    assert identity_differences(began, began | {"init_from": "/b.pt"}) == []
    for now in (other_weights, gone):
        assert identity_differences(began, {"init_from": "/b.pt"} | now) == [
            "  init_from: the workdir has '/a.pt', this run asks for '/b.pt'"]
    # A resume keeps the fingerprint the run began with; a new run in a folder with no checkpoint
    # (an earlier start killed before its first) records its own weights, or none.
    assert recorded_identity(began, {"init_from": "/a.pt"} | gone, resuming=True) == began
    fresh = {"init_from": None, "init_from_fingerprint": None}
    assert recorded_identity(began, fresh, resuming=False) == fresh
    # A run recorded before fingerprints were kept goes on comparing its path alone.
    assert recorded_identity({"init_from": "/a.pt"}, {"init_from": "/a.pt"} | other_weights, resuming=True) == {
        "init_from": "/a.pt", "init_from_fingerprint": None}


def test_a_torch_runs_workdir_is_refused_and_untouched(tmp_path):
    workdir = tmp_path / "torch-run"  # as unet_torch.train leaves it
    workdir.mkdir()
    files = {"checkpoint.pt": "weights", "config.json": '{"lr": 0.002}', "metrics.jsonl": '{"step": 50}\n'}
    for name, text in files.items():
        (workdir / name).write_text(text)
    with pytest.raises(SystemExit, match=r"^error: .*torch-run holds a torch training run \(its checkpoint.pt\); "
                                         r"give the JAX trainer a --workdir of its own$"):
        main(["--workdir", str(workdir), "--steps", "1", *TINY_FLAGS])
    assert {p.name: p.read_text() for p in workdir.iterdir()} == files  # no folder made, nothing rewritten


def test_a_workdir_whose_record_is_cut_short_is_refused_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"batch_size": 8, "lr"')
    with pytest.raises(SystemExit, match=r"^error: .*run/config.json is not a readable record of the run's settings "
                                         r"\(.*\); restore it, or use another --workdir$"):
        main(["--workdir", str(workdir), "--steps", "1", *TINY_FLAGS])
    assert (workdir / "config.json").read_text() == '{"batch_size": 8, "lr"'


def test_cli_errors_are_clear(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="cannot write to .*of --workdir"):
        main(["--workdir", str(blocker / "run"), "--steps", "1"])
    with pytest.raises(SystemExit, match=r"no MNIST at .*--download"):
        main(["--workdir", str(tmp_path / "w"), "--data", str(tmp_path / "missing"), "--steps", "1"])
    assert not (tmp_path / "w").exists()  # the data is read before the workdir is made
    for bad in (["--steps", "0"], ["--ema-decay", "1.5"], ["--steps-per-dispatch", "0"], ["--batch-size", "-3"], ["--sampler", "euler"],
                ["--sample-steps", "30", "--n-T", "20"]):
        with pytest.raises(SystemExit) as info:
            main(["--workdir", str(tmp_path / "w"), *bad])
        assert info.value.code == 2, bad
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"^error: --batch-size 5000 exceeds the 4500 training images$"):
        main(["--workdir", str(tmp_path / "w"), "--steps", "1", *TINY_FLAGS, "--batch-size", "5000"])
    assert not os.path.exists(tmp_path / "w" / "config.json")  # refused before the run was recorded


def test_a_config_built_in_python_is_checked_as_the_flags_are():
    for bad in ({"steps_per_dispatch": 0}, {"log_every": 0}, {"steps": 0}, {"batch_size": -3}, {"n_T": 0},
                {"ckpt_every": -1}, {"steps": 2.5}, {"ema_decay": 1.0}, {"lr": 0.0}, {"sampler": "euler"},
                {"dtype": "float16"}, {"sample_steps": 30, "n_T": 20}):
        with pytest.raises(SettingsError, match=rf"^Config\.{next(iter(bad))} "):
            Config(**bad)
    # DDPM draws with all n_T steps: its --sample-steps is unused, so a short --n-T alone is a valid run.
    assert Config(sampler="ddpm", n_T=50).sample_steps > 50
    assert parse_config(build_parser(), ["--sampler", "ddpm", "--n-T", "50"])[0].n_T == 50


def test_bfloat16_on_a_cpu_is_noted_for_what_xla_does_with_it():
    assert train_module._dtype_note("float32", "cpu") is None
    assert train_module._dtype_note("bfloat16", "gpu") is None
    assert "slower than --dtype float32" in train_module._dtype_note("bfloat16", "cpu")
    if jax.default_backend() == "cpu":  # the note's reason: the compiled bfloat16 matmul and convolution are float32 ones
        a = jnp.ones((64, 64), jnp.bfloat16)
        x, k = jnp.ones((2, 8, 8, 16), jnp.bfloat16), jnp.ones((3, 3, 16, 16), jnp.bfloat16)
        conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1), padding="SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
        assert re.search(r"= f32\[64,64\]\S* dot\(", jax.jit(jnp.dot).lower(a, a).compile().as_text())
        assert re.search(r"= f32\[2,8,8,16\]\S* convolution\(", jax.jit(conv).lower(x, k).compile().as_text())


def test_ema_warms_up():
    assert float(step_module.ema_decay_at(0, 0.999)) == pytest.approx(0.1)
    assert float(step_module.ema_decay_at(10_000, 0.999)) == pytest.approx(0.999)


def test_config_identity_names_real_fields():
    names = {f.name for f in dataclasses.fields(Config)}
    assert set(IDENTITY) <= names


def test_two_devices_average_their_gradients_into_the_whole_batchs():
    # Adam is blind to a gradient's scale, so the runs on 1, 2 and 8 devices in tests/test_scaling.py
    # would agree even if the devices summed their gradients; plain SGD (lr 1) shows the gradient itself.
    code = """
import jax, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
from ddpm_recipe.schedule import linear_schedule
from unet_jax.model import Unet, init_variables
from unet_jax.step import apply_update, create_state
keys = jax.random.split(jax.random.key(0), 4)
x0, noise = jax.random.uniform(keys[0], (4, 28, 28, 1), minval=-1, maxval=1), jax.random.normal(keys[1], (4, 28, 28, 1))
t = jax.random.randint(keys[2], (4,), 1, 1001)
tx = optax.sgd(1.0)
state = create_state(init_variables(keys[3])["params"], tx)
sharding = NamedSharding(jax.sharding.Mesh(jax.devices(), ("data",)), P("data"))
whole, split = (jax.jit(lambda s, x, t, n, sharding=sharding: apply_update(s, x, t, n, model=Unet(conv="tapgrad"), tx=tx,
                schedule=linear_schedule(), ema_decay=0.999, sharding=sharding))(state, x0, t, noise)
                for sharding in (None, sharding))
assert abs(float(split[1]["loss"]) / float(whole[1]["loss"]) - 1) < 1e-5, (split[1]["loss"], whole[1]["loss"])
grads = [jax.tree.leaves(jax.tree.map(lambda a, b: np.asarray(a - b, np.float64), state.params, s.params))
         for s in (whole[0], split[0])]
norm = np.sqrt(sum(np.sum(g ** 2) for g in grads[0]))
diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(*grads)))
assert diff <= 1e-5 * norm, (diff, norm)  # float32 rounding: ~1e-7; summed over 2 devices: 1
print("ok")
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_pmean_flat_equals_lax_pmean_on_two_devices_bit_for_bit():
    code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from unet_jax.step import pmean_flat
mesh = jax.sharding.Mesh(jax.devices(), ("data",))
keys = jax.random.split(jax.random.key(0), 4)
tree = {"a": jax.random.normal(keys[0], (2, 3, 5)), "b": [jax.random.normal(keys[1], (2,)),
        jax.random.normal(keys[2], (2, 7)).astype(jnp.bfloat16)], "loss": jax.random.normal(keys[3], (2, 1))}
def both(tree):
    tree = jax.tree.map(lambda a: a[0] * 1e3, tree)  # each device its own values, far from round
    return pmean_flat(tree, "data"), jax.lax.pmean(tree, "data")
flat, plain = jax.jit(jax.shard_map(both, mesh=mesh, in_specs=P("data"), out_specs=P(), check_vma=False))(tree)
assert jax.tree.structure(flat) == jax.tree.structure(plain)
for f, p in zip(jax.tree.leaves(flat), jax.tree.leaves(plain)):
    assert f.dtype == p.dtype and f.shape == p.shape
    np.testing.assert_array_equal(np.asarray(f, np.float64), np.asarray(p, np.float64))
assert not np.array_equal(np.asarray(plain["a"]), np.asarray(tree["a"][0] * 1e3))  # the devices did differ
print("ok")
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
