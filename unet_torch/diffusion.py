"""DDPM in eager PyTorch, on the same float64 schedule and sampler defaults as the JAX side (``ddpm_recipe.schedule``)."""

import torch

from ddpm_recipe.schedule import DEFAULT_CLIP_X0, DEFAULT_ETA, Schedule, check_eta, ddim_timesteps


def _at(table, t_B, like):
    return torch.as_tensor(table, dtype=like.dtype, device=like.device)[t_B].view(-1, 1, 1, 1)


def q_sample(schedule: Schedule, x0, t_B, noise):
    return _at(schedule.sqrt_alpha_bar, t_B, x0) * x0 + _at(schedule.sqrt_one_minus_alpha_bar, t_B, x0) * noise


def noise_prediction_loss(model, schedule: Schedule, x0, t_B, noise):
    x_t = q_sample(schedule, x0, t_B, noise)
    return torch.mean((model(x_t, (t_B / schedule.n_T).to(x0.dtype)) - noise) ** 2)


def _predict_x0(x, eps_hat, ab_t, clip: bool):
    x0_hat = (x - (1 - ab_t) ** 0.5 * eps_hat) / ab_t**0.5
    return x0_hat.clamp(-1, 1) if clip else x0_hat


@torch.no_grad()
def ddpm_sample(model, schedule: Schedule, x_T, generator=None, clip_x0: bool = DEFAULT_CLIP_X0):
    """Ancestral sampling, sigma_t^2 = beta_t, t = T..1, through the posterior (as unet_jax.diffusion)."""
    x = x_T
    for t in range(schedule.n_T, 0, -1):
        eps_hat = model(x, torch.full((x.shape[0],), t / schedule.n_T, dtype=x.dtype, device=x.device))
        ab_t, ab_prev, beta = schedule.alpha_bar[t], schedule.alpha_bar[t - 1], schedule.beta[t]
        x0_hat = _predict_x0(x, eps_hat, ab_t, clip_x0)
        x = (ab_prev**0.5 * beta * x0_hat + schedule.alpha[t] ** 0.5 * (1 - ab_prev) * x) / (1 - ab_t)
        if t > 1:
            x = x + beta**0.5 * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x


@torch.no_grad()
def ddim_sample(model, schedule: Schedule, x_T, steps: int, eta: float = DEFAULT_ETA, generator=None,
                clip_x0: bool = DEFAULT_CLIP_X0):
    """DDIM (Song et al. 2021, eq. 12) over ``steps`` evenly spaced timesteps."""
    check_eta(eta)
    taus = list(ddim_timesteps(schedule.n_T, steps)[::-1])
    x = x_T
    for t, t_prev in zip(taus, taus[1:] + [0]):
        ab_t, ab_p = schedule.alpha_bar[t], schedule.alpha_bar[t_prev]
        eps_hat = model(x, torch.full((x.shape[0],), t / schedule.n_T, dtype=x.dtype, device=x.device))
        x0_hat = _predict_x0(x, eps_hat, ab_t, clip_x0)
        if clip_x0:
            eps_hat = (x - ab_t**0.5 * x0_hat) / (1 - ab_t) ** 0.5
        sigma = eta * ((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)) ** 0.5
        x = ab_p**0.5 * x0_hat + max(1 - ab_p - sigma**2, 0.0) ** 0.5 * eps_hat
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x
