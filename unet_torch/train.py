"""The eager PyTorch reference trainer: ``python -m unet_torch.train``.

The tutorial's way of training, with the JAX trainer's flags, schedule and data (``ddpm_recipe``):
a ``DataLoader`` over the same digits with ``ToTensor`` + ``Normalize((0.5,), (0.5,))``,
Adam, a warm-up EMA, one Python step at a time. It is the baseline the benchmarks measure
the JAX trainer against. Writes ``WORKDIR/metrics.jsonl``, ``WORKDIR/checkpoint.pt``
(model, EMA, optimiser, step and random state: running again resumes, though the
DataLoader restarts its epoch) and ``WORKDIR/model.pt``, the EMA state_dict.
"""

import io
import itertools
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import Compose, Normalize, ToTensor
from tqdm import tqdm

from ddpm_recipe import digits
from ddpm_recipe.errors import first_line
from ddpm_recipe.run_folder import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    TORCH_CHECKPOINT_FILE,
    TORCH_MODEL_FILE,
    RecordError,
    WorkdirBusyError,
    WorkdirError,
    WorkdirLock,
    identity_differences,
    make_writable_folders,
    read_record,
    recorded_identity,
    run_identity,
    save_grid,
    trim_metrics,
    write_atomically,
    write_json,
)
from ddpm_recipe.schedule import Schedule, linear_schedule
from ddpm_recipe.settings import Config, SettingsError, build_parser, check_batch_fits, due, parse_flags, usable_cores
from ddpm_recipe.weights import CheckpointMismatchError, WeightsFileError, check_floating, strip_wrapper_prefix
from unet_torch.diffusion import ddim_sample, ddpm_sample, noise_prediction_loss
from unet_torch.model import Unet
from unet_torch.weights import load_state_dict

TRANSFORM = Compose([ToTensor(), Normalize((0.5,), (0.5,))])


class DigitsDataset(Dataset):
    """(N, 28, 28, 1) uint8 images through the tutorial's transform."""

    def __init__(self, images_u8: np.ndarray):
        self.images = images_u8

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return TRANSFORM(self.images[i]), 0


def learning_rate_factor(step: int, warmup_steps: int, decay_steps: int) -> float:
    """The learning rate's factor at update ``step``: a linear warm-up from 0, then constant or a cosine
    decay to 0, as optax's schedules compute it (tests/test_torch_train.py holds both trainers to them)."""
    if warmup_steps and step < warmup_steps:
        return step / warmup_steps
    if decay_steps:
        progress = min(step - warmup_steps, decay_steps) / decay_steps
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def ema_decay_at(step: int, max_decay: float) -> float:
    return min(max_decay, (1.0 + step) / (10.0 + step))


def make_optimizer(model, lr: float, warmup_steps: int, decay_steps: int):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, warmup_steps, decay_steps))
    return optimizer, scheduler


def apply_update(model, ema, optimizer, scheduler, schedule: Schedule, x0, t_B, noise, step: int, ema_decay: float):
    """One Adam step on the noise-prediction loss, then the EMA; returns the loss tensor."""
    optimizer.zero_grad(set_to_none=True)
    loss = noise_prediction_loss(model, schedule, x0, t_B, noise)
    loss.backward()
    optimizer.step()
    scheduler.step()
    decay = ema_decay_at(step, ema_decay)
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(decay).add_(p, alpha=1 - decay)
    return loss


def _loader(config, generator) -> tuple[DataLoader, str]:
    """The shuffled batches of the training digits, and the digits' fingerprint (as the JAX trainer records it).

    A torchvision root is read by our own reader, as the JAX trainer reads it, rather than by
    torchvision's MNIST: the same bytes are fingerprinted and trained on, and a root that holds
    only the gzipped files, or only the training split, works here as it does there."""
    if config.data == digits.BUNDLED:
        train = digits.load_bundled("train")
    else:
        train = digits.load_torchvision_root(config.data, "train")
    dataset = DigitsDataset(train.images)
    check_batch_fits(config.batch_size, len(dataset))
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True, generator=generator)
    return loader, digits.fingerprint(train)


class TorchRunError(RuntimeError):
    """The run cannot start or go on: another run's workdir, a file in it that is not this
    trainer's checkpoint, a non-finite step, or a checkpoint that could not be saved."""


def _check_workdir(config, resuming: bool, data_fingerprint: str) -> None:
    """As the JAX trainer: a workdir of another run (other settings, or the JAX trainer's) is refused,
    never resumed or overwritten. A checkpoint.pt from before runs recorded their settings is adopted."""
    if os.path.isdir(os.path.join(config.workdir, CHECKPOINT_DIR)):
        raise TorchRunError(f"{config.workdir} holds a JAX training run (its {CHECKPOINT_DIR}/ folder); give the torch "
                            "trainer a --workdir of its own")
    saved = read_record(config.workdir)
    if saved is None and resuming:
        print(f"note: {config.workdir} has checkpoint.pt but no {CONFIG_FILE}: recording these flags as its settings")
    identity = run_identity(config, data_fingerprint)
    # Only saved weights make the workdir a run's: a record left by a start that never reached its
    # first checkpoint (killed, or stopped by a bad flag) is replaced, as the JAX trainer does.
    has_weights = resuming or os.path.exists(os.path.join(config.workdir, TORCH_MODEL_FILE))
    differences = identity_differences(saved, identity) if saved is not None and has_weights else []
    if differences:
        raise TorchRunError(f"{config.workdir} holds a different run, so it will not be resumed or overwritten: "
                            + "; ".join(d.strip() for d in differences)
                            + ". Use another --workdir, or the workdir's own settings.")
    write_json(os.path.join(config.workdir, CONFIG_FILE), recorded_identity(saved, identity, resuming=resuming))


CHECKPOINT_KEYS = ("model", "ema", "optimizer", "scheduler", "step", "generator")


def _restore(path: str, model, ema, optimizer, scheduler, generator) -> int:
    """Load the run's own checkpoint into its model, EMA, optimiser, schedule and generator; returns its step.

    A file there that is not this trainer's checkpoint (a state_dict saved under the same name,
    another model's) is refused in one line, and left where it is.
    """
    try:
        saved = load_state_dict(path)
    except WeightsFileError as error:
        raise WeightsFileError(f"the run's own checkpoint: {error}. Move it away to start the run over") from None
    missing = [key for key in CHECKPOINT_KEYS if key not in saved]
    if missing:
        raise TorchRunError(f"{path} is not this trainer's checkpoint (it has no {', '.join(missing)}); move it away "
                            "to start the run over")
    try:
        for obj, key in ((model, "model"), (ema, "ema"), (optimizer, "optimizer"), (scheduler, "scheduler")):
            obj.load_state_dict(saved[key])
        generator.set_state(saved["generator"])
        return int(saved["step"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise TorchRunError(f"{path} does not fit this trainer's model and optimiser ({first_line(error)[:200]}); "
                            "move it away to start the run over") from None


def _not_finite(model) -> list[str]:
    """Which of the gradients and parameters hold a NaN or an infinity, after a step."""
    params = list(model.parameters())
    checks = (("gradients", [p.grad for p in params if p.grad is not None]), ("parameters", params))
    return [name for name, tensors in checks if not all(bool(torch.isfinite(t).all()) for t in tensors)]


def train(config: Config) -> dict:
    """Train ``config`` eagerly; returns the EMA state_dict."""
    checkpoint_path = os.path.join(config.workdir, TORCH_CHECKPOINT_FILE)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = Unet()
    # --init-from and the data are read (and the batch checked against the data) before anything is
    # written: a bad file, a refused --batch-size or --data leaves no folder, and no record that would
    # refuse the corrected command. A resumed run's weights are its checkpoint's, wherever --init-from is now.
    init_read = bool(config.init_from) and not os.path.exists(checkpoint_path)
    if init_read:
        _load_init_from(config.init_from, model)
    loader, data_fingerprint = _loader(config, generator)  # draws from the generator only when iterated
    make_writable_folders(config.workdir, os.path.join(config.workdir, "samples"))
    with WorkdirLock(config.workdir):  # as the JAX trainer: a second trainer on the workdir is refused
        # Looked at under the lock: a trainer that held the workdir until now may have saved since.
        resuming = os.path.exists(checkpoint_path)
        if config.init_from and not resuming and not init_read:
            _load_init_from(config.init_from, model)
        ema = Unet()
        ema.load_state_dict(model.state_dict())
        optimizer, scheduler = make_optimizer(model, config.lr, config.warmup_steps, config.decay_steps)
        # Before the run is recorded: a checkpoint.pt that is not this trainer's is refused, and the
        # workdir left as it was.
        start = _restore(checkpoint_path, model, ema, optimizer, scheduler, generator) if resuming else 0
        _check_workdir(config, resuming=resuming, data_fingerprint=data_fingerprint)
        if resuming:
            print(f"resumed {config.workdir} from step {start}")
        trim_metrics(os.path.join(config.workdir, METRICS_FILE), start)  # rows past it are about to be redone
        if start >= config.steps:
            print(f"{config.workdir} is already at step {start} (--steps {config.steps}); nothing to do")
        else:
            _train_steps(config, (model, ema, optimizer, scheduler, generator), loader, start, saved=resuming)
    return ema.state_dict()


def _load_init_from(path: str, model) -> None:
    """The --init-from weights into ``model``: the tutorial Unet's names and shapes, float tensors."""
    state_dict = strip_wrapper_prefix(load_state_dict(path))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:  # torch lists the missing, unexpected and misshapen keys
        raise CheckpointMismatchError(f"--init-from {path} does not match the tutorial's Unet:\n"
                                      + str(error).split(":", 1)[-1].strip()) from None
    check_floating(state_dict, f"--init-from {path}")  # after the names: they say more


def _train_steps(config, run, loader, start: int, *, saved: bool) -> None:
    """Train from ``start`` to ``config.steps``, logging, checkpointing and sampling as the flags say.
    ``saved``: the run has a checkpoint (of step ``start``)."""
    model, ema, optimizer, scheduler, generator = run
    schedule = linear_schedule(config.n_T)
    checkpoint_path = os.path.join(config.workdir, TORCH_CHECKPOINT_FILE)
    last_saved = start if saved else None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.dtype == "bfloat16")
    metrics = open(os.path.join(config.workdir, METRICS_FILE), "a")
    bar = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stdout)
    step, window, t0 = start, [], time.perf_counter()

    def save():
        # Each file is made in memory and renamed into place whole. model.pt goes first: a run stopped
        # between the two resumes from the checkpoint before and writes both again.
        checkpoint = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "step": step, "generator": generator.get_state()}
        for path, obj in ((os.path.join(config.workdir, TORCH_MODEL_FILE), ema.state_dict()),
                          (checkpoint_path, checkpoint)):
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            try:
                write_atomically(path, buffer.getvalue())
            except OSError as error:
                raise TorchRunError(f"saving step {step} to {path} failed ({error.strerror or error}); stopping. "
                                    "The run resumes from its last saved checkpoint") from None

    def kept_checkpoint() -> str:
        return (f"{checkpoint_path} keeps the last good checkpoint, of step {last_saved}" if last_saved is not None
                else f"No checkpoint of the run in {config.workdir} was saved before it")

    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epoch after epoch, each one reshuffled
    try:
        for x0, _ in batches:
            t_B = torch.randint(1, config.n_T + 1, (x0.shape[0],), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            try:
                with autocast:
                    loss = apply_update(model, ema, optimizer, scheduler, schedule, x0, t_B, noise, step,
                                        config.ema_decay)
            except RuntimeError as error:  # Adam's step size (lr over its bias correction) past float32's range
                if "overflow" not in str(error):
                    raise
                raise TorchRunError(f"non-finite parameters at step {step}: Adam's update overflowed float32 "
                                    f"({first_line(error)}; is --lr {config.lr:g} meant?); stopping. "
                                    + kept_checkpoint()) from None
            value = loss.item()  # eager torch syncs every step anyway
            bad = (["loss"] if not math.isfinite(value) else []) + _not_finite(model)
            if bad:  # raised before any save: the last checkpoint stays the last good one
                raise TorchRunError(f"non-finite {' and '.join(bad)} at step {step} (loss {value:.3g}); stopping. "
                                    + kept_checkpoint())
            window.append(value)
            step += 1
            bar.update(1)
            if due(config.log_every, step, config.steps):
                elapsed = time.perf_counter() - t0
                row = {"step": step, "loss": float(np.mean(window)), "images_per_s": len(window) * config.batch_size / elapsed}
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
                window, t0 = [], time.perf_counter()
            if due(config.sample_every, step, config.steps):  # the end always samples, as on the JAX side
                _sample(config, ema, schedule, step)  # before the checkpoint, as there: a stop between is redone
            if due(config.ckpt_every, step, config.steps):
                save()
                last_saved = step
            if step == config.steps:
                break
    finally:
        bar.close()
        metrics.close()


def _sample(config, ema, schedule, step: int):
    """An 8x8 grid from the EMA, with noise of its own (fixed by seed and step): sampling never moves the
    training's random stream."""
    generator = torch.Generator().manual_seed((config.seed * 1_000_003 + step) % 2**63)  # torch takes 64 bits
    x_T = torch.randn((config.num_samples, 1, 28, 28), generator=generator)
    if config.sampler == "ddpm":
        x0 = ddpm_sample(ema, schedule, x_T, generator=generator, clip_x0=True)
    else:
        x0 = ddim_sample(ema, schedule, x_T, config.sample_steps, config.eta, generator=generator, clip_x0=True)
    save_grid(x0.clamp(-1, 1).permute(0, 2, 3, 1).numpy(), os.path.join(config.workdir, "samples", f"step_{step}.png"))


def main(argv=None) -> None:
    parser = build_parser("python -m unet_torch.train", __doc__.splitlines()[0], workdir="runs/torch")
    config, options = parse_flags(parser, argv)
    torch.set_num_threads(usable_cores())
    try:
        if options["download"]:
            digits.download(config.data)
        train(config)
    except (digits.MnistError, WeightsFileError, CheckpointMismatchError, TorchRunError, SettingsError,
            WorkdirError, WorkdirBusyError, RecordError) as error:
        message = error.one_line() if isinstance(error, CheckpointMismatchError) else str(error)
        raise SystemExit(f"error: {message}") from None


if __name__ == "__main__":
    main()
