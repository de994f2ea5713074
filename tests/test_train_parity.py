"""Both trainers, from the same ported weights on the same batches, stay together for 20 Adam steps."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddpm_recipe.schedule import linear_schedule
from parity import flax_to_torch, torch_to_flax
from parity.compare import build_torch_model
from unet_jax import data
from unet_jax import step as jax_step
from unet_jax import train as jax_train
from unet_jax.model import Unet
from unet_torch import train as torch_train

STEPS, BATCH, LR, WARMUP = 20, 4, 1e-3, 5
# Tolerances: (per-step loss, relative; each tensor's ||jax - torch|| as a share of its own
# 20-step update ||torch - initial||). The update is the scale: a wrong Adam or EMA detail
# (eps inside the root, no bias correction, an EMA a step off) moves a tensor by a share of
# its update of order one, while rounding moves it by a small share.
# float32: XLA and oneDNN sum in different orders (~1e-7). Adam divides each gradient by its
# own running RMS, so where a gradient is almost zero (a conv just before a GroupNorm, whose
# mean the norm removes) that rounding becomes a visible share of an lr-sized step: the worst
# tensor ends about 1 % of its update away (median 0.3 %; encoder.down3.model.0.block.1.weight
# 1.1 %, with XLA's convolution and with Winograd's alike), and the losses 1e-4 apart. Bounds:
# 5 % of the update, 1e-3 of the loss.
# float64: the worst tensor ends 2e-8 of its update away, the losses 1e-11 apart; bounds 1e-6
# and 1e-9 (rounding at 1e-16 cannot grow that far in 20 steps; any formula difference would).
TOLERANCE = {"float32": (1e-3, 5e-2), "float64": (1e-9, 1e-6)}


def _batches(dtype):
    """The same digits, timesteps and noise for both sides: (x0 NHWC, t, noise NHWC) per step."""
    images = data.load_bundled("train").images
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        idx = rng.choice(len(images), BATCH, replace=False)
        x0 = np.asarray(data.to_model_range(jnp.asarray(images[idx]))).astype(dtype)
        yield x0, rng.integers(1, 1001, BATCH), rng.standard_normal(x0.shape).astype(dtype)


# XLA's own convolution, and the lowering with the most rounding of its own that --conv auto picks
# for training (Winograd's transforms; the autotuner's plans mix it with tapgrad and im2col).
@pytest.mark.parametrize("dtype,conv", [("float32", "xla"), ("float64", "xla"), ("float32", "winograd_tapgrad")])
def test_twenty_adam_steps_agree(dtype, conv):
    with jax.enable_x64(dtype == "float64"):
        schedule = linear_schedule()
        model = build_torch_model(0, dtype)
        initial = {name: tensor.double().clone() for name, tensor in model.state_dict().items()}
        ema = copy.deepcopy(model)
        optimizer, scheduler = torch_train.make_optimizer(model, LR, WARMUP, decay_steps=0)

        config = jax_train.Config(lr=LR, warmup_steps=WARMUP)
        tx = jax_step.make_optimizer(config)
        state = jax_train.create_state(torch_to_flax(model.state_dict())["params"], tx)
        update = jax.jit(lambda s, x, t, n: jax_step.apply_update(s, x, t, n, model=Unet(conv=conv), tx=tx, schedule=schedule,
                                                                    ema_decay=0.999))
        torch_losses, jax_losses = [], []
        for step, (x0, t, noise) in enumerate(_batches(dtype)):
            loss = torch_train.apply_update(model, ema, optimizer, scheduler, schedule,
                                          torch.from_numpy(x0.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                                          torch.from_numpy(noise.transpose(0, 3, 1, 2)), step, 0.999)
            torch_losses.append(loss.item())
            state, metrics = update(state, x0, jnp.asarray(t), noise)
            jax_losses.append(float(metrics["loss"]))

        loss_tol, param_tol = TOLERANCE[dtype]
        np.testing.assert_allclose(jax_losses, torch_losses, rtol=loss_tol)
        assert torch_losses[-1] < torch_losses[0]  # it did train
        for ours, theirs in ((state.params, model.state_dict()), (state.ema_params, ema.state_dict())):
            ported = flax_to_torch({"params": ours})
            errors = {name: np.linalg.norm(ported[name].double().numpy() - expected.double().numpy())
                      / np.linalg.norm(expected.double().numpy() - initial[name].numpy())
                      for name, expected in theirs.items()}
            worst = max(errors, key=errors.get)
            assert errors[worst] <= param_tol, (worst, errors[worst])
