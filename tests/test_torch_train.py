"""The eager torch reference trainer end to end, and its learning-rate schedule against optax."""

import json
import os
import resource
import signal

import numpy as np
import optax
import pytest
import torch

from ddpm_recipe import digits
from ddpm_recipe.run_folder import WorkdirLock
from unet_jax.step import learning_rate
from unet_jax.train import Config
from unet_torch import Unet
from unet_torch.train import learning_rate_factor, main


def test_tiny_torch_run(tmp_path):
    workdir = str(tmp_path / "torch")
    main(["--workdir", workdir, "--steps", "3", "--batch-size", "8", "--n-T", "20", "--sample-steps", "3",
          "--num-samples", "4", "--log-every", "1"])
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    Unet().load_state_dict(torch.load(os.path.join(workdir, "model.pt"), weights_only=True), strict=True)
    assert os.path.isfile(os.path.join(workdir, "samples", "step_3.png"))
    main(["--workdir", workdir, "--steps", "4", "--batch-size", "8", "--n-T", "20", "--sample-steps", "3",
          "--num-samples", "4", "--log-every", "1"])
    assert torch.load(os.path.join(workdir, "checkpoint.pt"), weights_only=True)["step"] == 4


def _optax_reference(lr, warmup, decay):
    """The same schedule from optax's own library functions, the independent reference for both trainers."""
    if decay:
        return optax.schedules.warmup_cosine_decay_schedule(0.0, lr, warmup, warmup + decay, end_value=0.0)
    if warmup:
        return optax.schedules.linear_schedule(0.0, lr, warmup)
    return optax.schedules.constant_schedule(lr)


@pytest.mark.parametrize("warmup,decay", [(0, 0), (10, 0), (10, 50)])
def test_both_trainers_lr_schedules_are_optax_schedules(warmup, decay):
    reference = _optax_reference(2e-3, warmup, decay)
    jax_schedule = learning_rate(Config(lr=2e-3, warmup_steps=warmup, decay_steps=decay))
    for step in (0, 1, 5, 10, 11, 30, 60, 100):
        expected = float(reference(step))
        assert 2e-3 * learning_rate_factor(step, warmup, decay) == pytest.approx(expected, rel=1e-6, abs=1e-12)
        assert float(jax_schedule(step)) == pytest.approx(expected, rel=1e-6, abs=1e-12)


TORCH_TINY = ["--batch-size", "8", "--n-T", "20", "--sample-steps", "3", "--num-samples", "4", "--log-every", "1"]


def test_torch_trainer_refuses_another_runs_workdir(tmp_path):
    workdir = str(tmp_path / "torch")
    main(["--workdir", workdir, "--steps", "1", *TORCH_TINY])
    with pytest.raises(SystemExit) as info:
        main(["--workdir", workdir, "--steps", "2", "--lr", "1e-3", *TORCH_TINY])
    assert info.value.code.startswith("error: ") and "lr: the workdir has 0.002, this run asks for 0.001" in info.value.code
    assert torch.load(os.path.join(workdir, "checkpoint.pt"), weights_only=True)["step"] == 1


def test_torch_trainer_starts_afresh_where_a_record_has_no_checkpoint(tmp_path):
    # A start killed before its first checkpoint leaves config.json alone; as the JAX trainer,
    # a new run there with other settings is not refused, and its own settings are recorded.
    workdir = str(tmp_path / "torch")
    main(["--workdir", workdir, "--steps", "1", *TORCH_TINY])
    os.remove(os.path.join(workdir, "checkpoint.pt"))
    # The run's EMA weights alone still make it a run, refused to other settings.
    with pytest.raises(SystemExit, match=r"^error: .*lr: the workdir has 0.002, this run asks for 0.001"):
        main(["--workdir", workdir, "--steps", "1", "--lr", "1e-3", *TORCH_TINY])
    os.remove(os.path.join(workdir, "model.pt"))  # now as a start killed before its first checkpoint
    main(["--workdir", workdir, "--steps", "1", "--lr", "1e-3", *TORCH_TINY])
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["lr"] == 1e-3
    assert torch.load(os.path.join(workdir, "checkpoint.pt"), weights_only=True)["step"] == 1


def test_torch_trainer_trims_metrics_and_samples_every(tmp_path):
    workdir = str(tmp_path / "torch")
    main(["--workdir", workdir, "--steps", "2", "--ckpt-every", "2", "--sample-every", "1", *TORCH_TINY])
    assert sorted(os.listdir(os.path.join(workdir, "samples"))) == ["step_1.png", "step_2.png"]
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:  # rows a killed run wrote past its checkpoint
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    main(["--workdir", workdir, "--steps", "3", "--ckpt-every", "2", "--sample-every", "0", *TORCH_TINY])
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] != 1.0


def test_torch_trainer_stops_on_non_finite_gradients_with_a_finite_loss(tmp_path, monkeypatch):
    import unet_torch.train as torch_train

    def finite_loss_nan_gradients(model, schedule, x0, t_B, noise):
        return torch.sqrt(0.0 * model(x0, t_B / schedule.n_T).sum())  # 0, and d sqrt(u)/du at 0 is infinite

    workdir = str(tmp_path / "torch")
    main(["--workdir", workdir, "--steps", "1", *TORCH_TINY])
    real_loss = torch_train.noise_prediction_loss
    monkeypatch.setattr(torch_train, "noise_prediction_loss", finite_loss_nan_gradients)
    with pytest.raises(SystemExit) as info:
        main(["--workdir", workdir, "--steps", "3", *TORCH_TINY])
    assert info.value.code.startswith("error: non-finite gradients and parameters at step 1 (loss ")
    assert info.value.code.endswith("checkpoint.pt keeps the last good checkpoint, of step 1")
    assert "non-finite loss" not in info.value.code
    assert torch.load(os.path.join(workdir, "checkpoint.pt"), weights_only=True)["step"] == 1
    fresh = str(tmp_path / "fresh")  # a run that fails before its first checkpoint names none
    with pytest.raises(SystemExit, match=rf"^error: non-finite gradients and parameters at step 0 .*; stopping. "
                                         rf"No checkpoint of the run in {fresh} was saved before it$"):
        main(["--workdir", fresh, "--steps", "3", *TORCH_TINY])
    assert not os.path.exists(os.path.join(fresh, "checkpoint.pt"))
    monkeypatch.setattr(torch_train, "noise_prediction_loss", real_loss)
    # A learning rate whose Adam step overflows float32 itself: torch raises rather than produce an
    # infinity, which the trainer tells as what it is, in one line.
    huge = str(tmp_path / "huge")
    with pytest.raises(SystemExit, match=r"^error: non-finite parameters at step 0: Adam's update overflowed "
                                         r"float32 \(.*; is --lr 1e\+38 meant\?\); stopping. No checkpoint"):
        main(["--workdir", huge, "--steps", "2", "--lr", "1e38", "--warmup-steps", "0", *TORCH_TINY])


def test_torch_trainer_stopped_while_drawing_its_last_grid_draws_it_on_resume(tmp_path, stop_in):
    import unet_torch.train as torch_train

    workdir = tmp_path / "torch"
    flags = ["--workdir", str(workdir), "--steps", "2", "--ckpt-every", "1", *TORCH_TINY]
    stop_in(torch_train, "_sample", lambda: main(flags))  # while the grid of step 2 is drawn
    assert torch.load(workdir / "checkpoint.pt", weights_only=True)["step"] == 1  # the grid comes first
    main(flags)
    assert (workdir / "samples" / "step_2.png").is_file()
    assert torch.load(workdir / "checkpoint.pt", weights_only=True)["step"] == 2


def test_torch_trainer_refuses_a_workdir_in_use_and_says_when_it_has_nothing_to_do(tmp_path, capsys):
    workdir = str(tmp_path / "torch")
    main(["--workdir", workdir, "--steps", "1", *TORCH_TINY])
    with WorkdirLock(workdir):  # as a second trainer running there holds it
        with pytest.raises(SystemExit, match=rf"^error: {workdir} is in use by another trainer \(pid {os.getpid()} "):
            main(["--workdir", workdir, "--steps", "2", *TORCH_TINY])
    assert torch.load(os.path.join(workdir, "checkpoint.pt"), weights_only=True)["step"] == 1
    capsys.readouterr()
    main(["--workdir", workdir, "--steps", "1", *TORCH_TINY])
    assert f"{workdir} is already at step 1 (--steps 1); nothing to do" in capsys.readouterr().out


def test_torch_trainer_leaves_a_jax_run_alone_and_adopts_its_own_older_runs(tmp_path, capsys):
    jax_run = tmp_path / "jax"
    (jax_run / "checkpoints").mkdir(parents=True)
    (jax_run / "config.json").write_text('{"lr": 0.002}')
    with pytest.raises(SystemExit) as info:
        main(["--workdir", str(jax_run), "--steps", "1", *TORCH_TINY])
    assert "holds a JAX training run" in info.value.code and (jax_run / "config.json").read_text() == '{"lr": 0.002}'

    workdir = str(tmp_path / "torch")
    main(["--workdir", workdir, "--steps", "1", *TORCH_TINY])
    os.remove(os.path.join(workdir, "config.json"))  # as a run from before the trainer recorded its settings
    main(["--workdir", workdir, "--steps", "2", *TORCH_TINY])
    assert "recording these flags as its settings" in capsys.readouterr().out
    assert torch.load(os.path.join(workdir, "checkpoint.pt"), weights_only=True)["step"] == 2


def test_torch_trainer_says_in_one_line_what_it_cannot_use(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --batch-size 5000 exceeds the 4500 training images$"):
        main(["--workdir", str(tmp_path / "big"), "--steps", "1", *TORCH_TINY, "--batch-size", "5000"])
    assert not (tmp_path / "big" / "config.json").exists()  # so the corrected command is not refused
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=r"^error: cannot write to '.*a-file/run' \(of --workdir .*a-file/run\): "):
        main(["--workdir", str(blocker / "run"), "--steps", "1", *TORCH_TINY])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"lr": 0.0')
    with pytest.raises(SystemExit, match=r"^error: .*broken/config.json is not a readable record of the run's "):
        main(["--workdir", str(broken), "--steps", "1", *TORCH_TINY])
    assert (broken / "config.json").read_text() == '{"lr": 0.0'
    (broken / "config.json").write_text("[]")
    with pytest.raises(SystemExit, match=r"^error: .*broken/config.json is not a record of the run's settings \(it holds a "
                                         r"list, not an object\); restore it, or use another --workdir$"):
        main(["--workdir", str(broken), "--steps", "1", *TORCH_TINY])


def test_torch_trainer_refuses_a_checkpoint_not_its_own_and_stops_on_a_failed_save(tmp_path):
    workdir = tmp_path / "torch"
    workdir.mkdir()
    torch.save(Unet().state_dict(), workdir / "checkpoint.pt")  # a plain state_dict under the trainer's name
    with pytest.raises(SystemExit, match=r"^error: .*checkpoint.pt is not this trainer's checkpoint \(it has no model, "
                                         r"ema, optimizer, scheduler, step, generator\); move it away"):
        main(["--workdir", str(workdir), "--steps", "1", *TORCH_TINY])
    assert not (workdir / "config.json").exists()  # so the command is not refused once the file is moved away
    (workdir / "checkpoint.pt").unlink()
    main(["--workdir", str(workdir), "--steps", "1", *TORCH_TINY])
    saved = torch.load(workdir / "checkpoint.pt", weights_only=True)
    torch.save(saved | {"model": {"weight": torch.zeros(1)}}, workdir / "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"^error: .*checkpoint.pt does not fit this trainer's model and optimiser "):
        main(["--workdir", str(workdir), "--steps", "2", *TORCH_TINY])
    torch.save(saved, workdir / "checkpoint.pt")
    model_before = (workdir / "model.pt").read_bytes()
    # A real failed write: files over 64 KiB cannot be written (the weights are 3.5 MB), as on a full disk.
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG, not a signal ending pytest
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
    try:
        with pytest.raises(SystemExit, match=r"^error: saving step 2 to .*model.pt failed \(File too large\); "
                                             r"stopping. The run resumes from its last saved checkpoint$"):
            main(["--workdir", str(workdir), "--steps", "2", *TORCH_TINY])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert torch.load(workdir / "checkpoint.pt", weights_only=True)["step"] == 1
    assert (workdir / "model.pt").read_bytes() == model_before and not list(workdir.glob("*.tmp"))  # whole, or none


def test_torch_trainer_starts_from_a_ddp_state_dict_as_the_jax_trainer_does(tmp_path):
    # DistributedDataParallel prefixes every key with 'module.'; both trainers and the port strip it.
    torch.manual_seed(1)  # not the run's --seed 0, whose own initial weights would pass the check below too
    weights = {"module." + k: v for k, v in Unet().state_dict().items()}
    torch.save(weights, tmp_path / "ddp.pt")
    main(["--workdir", str(tmp_path / "torch"), "--steps", "1", "--warmup-steps", "2",
          "--init-from", str(tmp_path / "ddp.pt"), *TORCH_TINY])
    trained = torch.load(tmp_path / "torch" / "model.pt", weights_only=True)
    # Step 0 of the warm-up has lr 0: the weights it started from (the EMA of equal weights, up to its rounding).
    for k in trained:
        torch.testing.assert_close(trained[k], weights["module." + k], rtol=1e-6, atol=1e-7)


def test_torch_trainer_resumes_from_moved_init_weights_and_after_they_are_gone(tmp_path):
    weights = tmp_path / "start.pt"
    torch.manual_seed(0)
    torch.save(Unet().state_dict(), weights)
    workdir = str(tmp_path / "torch")
    record = lambda: json.loads(open(os.path.join(workdir, "config.json")).read())  # noqa: E731
    main(["--workdir", workdir, "--steps", "1", "--init-from", str(weights), *TORCH_TINY])
    began_with = record()["init_from_fingerprint"]
    moved = weights.rename(tmp_path / "moved.pt")  # the same weights, elsewhere: the same run
    main(["--workdir", workdir, "--steps", "2", "--init-from", str(moved), *TORCH_TINY])
    assert record()["init_from"] == str(moved)
    torch.manual_seed(1)
    torch.save(Unet().state_dict(), tmp_path / "other.pt")  # other weights
    with pytest.raises(SystemExit, match=r"^error: .* holds a different run, .*: init_from: the workdir has "
                                         r"'.*moved\.pt', this run asks for '.*other\.pt'\. Use another"):
        main(["--workdir", workdir, "--steps", "3", "--init-from", str(tmp_path / "other.pt"), *TORCH_TINY])
    moved.unlink()  # the run's own checkpoint holds its weights now
    main(["--workdir", workdir, "--steps", "3", "--init-from", str(moved), *TORCH_TINY])
    assert torch.load(os.path.join(workdir, "checkpoint.pt"), weights_only=True)["step"] == 3
    assert record()["init_from_fingerprint"] == began_with


def test_the_largest_seed_trains_and_samples(tmp_path):
    workdir = tmp_path / "torch"
    main(["--workdir", str(workdir), "--steps", "1", "--seed", str(2**63 - 1), *TORCH_TINY])
    assert (workdir / "samples" / "step_1.png").is_file()


def test_torch_trainer_resumes_from_a_moved_data_folder_and_refuses_other_digits(tmp_path, write_mnist_root,
                                                                                 write_idx):
    old = write_mnist_root(tmp_path / "old")
    workdir = tmp_path / "torch"
    main(["--workdir", str(workdir), "--steps", "1", "--data", str(old), *TORCH_TINY])
    new = tmp_path / "new"
    old.rename(new)  # the same digits, elsewhere
    main(["--workdir", str(workdir), "--steps", "2", "--data", str(new), *TORCH_TINY])
    assert torch.load(workdir / "checkpoint.pt", weights_only=True)["step"] == 2
    assert json.loads((workdir / "config.json").read_text())["data"] == str(new)
    images = new / "MNIST" / "raw" / "train-images-idx3-ubyte"  # other digits in the same folder
    write_idx(str(images), 255 - np.frombuffer(images.read_bytes()[16:], np.uint8).reshape(-1, 28, 28), 2051, False)
    with pytest.raises(SystemExit, match=r"^error: .* holds a different run, .*data_fingerprint: the workdir has "
                                         r"'[0-9a-f]{16}', this run asks for '[0-9a-f]{16}'"):
        main(["--workdir", str(workdir), "--steps", "3", "--data", str(new), *TORCH_TINY])


def test_torch_trainer_reads_a_root_of_gzipped_training_files_alone(tmp_path, write_idx):
    # What digits.py's own message tells a user to copy in by hand: torchvision's MNIST class
    # would want all four files, uncompressed.
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train = digits.load_bundled("train")
    write_idx(str(raw / "train-images-idx3-ubyte"), train.images[..., 0], 2051, compress=True)
    write_idx(str(raw / "train-labels-idx1-ubyte"), train.labels, 2049, compress=True)
    workdir = tmp_path / "torch"
    main(["--workdir", str(workdir), "--steps", "1", "--data", str(tmp_path / "mnist"), *TORCH_TINY])
    assert torch.load(workdir / "checkpoint.pt", weights_only=True)["step"] == 1
    assert json.loads((workdir / "config.json").read_text())["data_fingerprint"] == digits.fingerprint(train)
