"""The torch side of the benchmark: the reference trainer's step and samplers, eager and compiled."""

import copy

import numpy as np
import torch

from benchmarks.timing import Case, timed
from ddpm_recipe.schedule import linear_schedule
from unet_torch.diffusion import ddim_sample, ddpm_sample
from unet_torch.model import Unet
from unet_torch.train import apply_update, make_optimizer


def _sync(device: str):
    return (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)


def _batches(images_u8: np.ndarray, batch: int, device: str, count: int = 4):
    """A few real batches, prepared up front so only the step is timed (as on the JAX side)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        x = images_u8[rng.choice(len(images_u8), batch, replace=False)].transpose(0, 3, 1, 2)
        x0 = ((torch.from_numpy(x).float() / 255 - 0.5) / 0.5).to(device)
        out.append((x0, torch.randint(1, 1001, (batch,), device=device), torch.randn(x0.shape, device=device)))
    return out


def train_step_case(images_u8, batch: int, dtype: str, *, compiled: str | None, device: str,
                    steps_per_repeat: int) -> Case:
    """The reference train step (forward, backward, Adam, EMA), warmed up; ``compiled`` is a
    torch.compile mode, whose compilation is in the first call's time (``compile_s``)."""
    torch.manual_seed(0)
    model = Unet().to(device)
    ema = copy.deepcopy(model)
    optimizer, scheduler = make_optimizer(model, 1e-3, 0, 0)
    schedule = linear_schedule()
    forward = torch.compile(model, mode=compiled) if compiled else model
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    batches = _batches(images_u8, batch, device)
    counter = {"i": 0}

    def one():
        x0, t, noise = batches[counter["i"] % len(batches)]
        with autocast:
            apply_update(forward, ema, optimizer, scheduler, schedule, x0, t, noise, counter["i"], 0.999)
        counter["i"] += 1

    def run():
        for _ in range(steps_per_repeat):
            one()

    sync = _sync(device)
    _, first_s = timed(lambda: (one(), sync()))  # torch.compile compiles on the first call(s)
    run()
    sync()
    return Case(run, sync, steps_per_repeat, {"compile_s": first_s})


def sample_case(num: int, sampler: str, steps: int, *, compiled: str | None, device: str) -> Case:
    """The eager (or compiled) reference sampler, warmed up: a repeat draws a batch of ``num`` images."""
    torch.manual_seed(0)
    model = Unet().to(device).eval()
    forward = torch.compile(model, mode=compiled) if compiled else model
    schedule = linear_schedule()
    x_T = torch.randn((num, 1, 28, 28), device=device)

    def run():
        if sampler == "ddpm":  # clipped x0, as unet_jax.sample.generate
            ddpm_sample(forward, schedule, x_T, clip_x0=True)
        else:
            ddim_sample(forward, schedule, x_T, steps, clip_x0=True)

    sync = _sync(device)
    _, first_s = timed(lambda: (run(), sync()))
    for _ in range(2 if compiled else 0):  # CUDA graphs record late
        run()
    sync()
    return Case(run, sync, 1, {"compile_s": first_s})
