"""DDPM in JAX: forward noising, the noise-prediction loss, and two samplers.

The samplers take any ``eps_fn(x_t, t / n_T) -> eps_hat`` and run their whole loop as one
XLA program (``lax.scan``); the trainer and ``sample.py`` close over the UNet. Noise for
step t comes from ``fold_in(key, t)``, so a sample is a function of its key alone.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from ddpm_recipe.schedule import DEFAULT_CLIP_X0, DEFAULT_ETA, DEFAULT_SAMPLE_STEPS, Schedule, check_eta, ddim_timesteps


def _at(table, t_B, like):
    """table[t] as a (B, 1, 1, 1) array in the dtype of ``like``."""
    return jnp.asarray(table, like.dtype)[t_B].reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(schedule: Schedule, x0, t_B, noise):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    return _at(schedule.sqrt_alpha_bar, t_B, x0) * x0 + _at(schedule.sqrt_one_minus_alpha_bar, t_B, x0) * noise


def draw_timesteps_and_noise(key, x0, n_T: int):
    """t ~ U{1..n_T} per image and eps ~ N(0, I) shaped like x0."""
    t_key, noise_key = jax.random.split(key)
    t_B = jax.random.randint(t_key, (x0.shape[0],), 1, n_T + 1)
    return t_B, jax.random.normal(noise_key, x0.shape, x0.dtype)


def noise_prediction_loss(eps_fn: Callable, schedule: Schedule, x0, t_B, noise):
    """mean((eps - eps_fn(x_t, t / n_T))^2), the simple loss of Ho et al."""
    x_t = q_sample(schedule, x0, t_B, noise)
    eps_hat = eps_fn(x_t, (t_B / schedule.n_T).astype(x0.dtype))
    return jnp.mean((eps_hat.astype(noise.dtype) - noise) ** 2)


def _predict_x0(x_t, eps_hat, ab_t, clip: bool):
    x0_hat = (x_t - jnp.sqrt(1 - ab_t) * eps_hat) / jnp.sqrt(ab_t)
    return jnp.clip(x0_hat, -1.0, 1.0) if clip else x0_hat


def ddpm_sample(eps_fn: Callable, schedule: Schedule, key, x_T, clip_x0: bool = DEFAULT_CLIP_X0):
    """Ancestral sampling (Ho et al. Algorithm 2, sigma_t^2 = beta_t) from x_T over t = T..1.

    Written through the posterior q(x_{t-1} | x_t, x0_hat), which is Algorithm 2 exactly
    when ``clip_x0`` is off; on, x0_hat is clipped to the data range [-1, 1] first, as in
    the reference implementations of both papers.
    """
    dtype = x_T.dtype
    beta, alpha, alpha_bar = (jnp.asarray(a, dtype) for a in (schedule.beta, schedule.alpha, schedule.alpha_bar))

    def step(x_t, t):
        t_B = jnp.full((x_t.shape[0],), t)
        eps_hat = eps_fn(x_t, (t_B / schedule.n_T).astype(dtype)).astype(dtype)
        x0_hat = _predict_x0(x_t, eps_hat, alpha_bar[t], clip_x0)
        ab_t, ab_prev = alpha_bar[t], alpha_bar[t - 1]
        mean = (jnp.sqrt(ab_prev) * beta[t] * x0_hat + jnp.sqrt(alpha[t]) * (1 - ab_prev) * x_t) / (1 - ab_t)
        z = jax.random.normal(jax.random.fold_in(key, t), x_t.shape, dtype)
        return mean + jnp.where(t > 1, jnp.sqrt(beta[t]), 0.0).astype(dtype) * z, None

    x_0, _ = lax.scan(step, x_T, jnp.arange(schedule.n_T, 0, -1))
    return x_0


def ddim_sample(eps_fn: Callable, schedule: Schedule, key, x_T, steps: int = DEFAULT_SAMPLE_STEPS,
                eta: float = DEFAULT_ETA, clip_x0: bool = DEFAULT_CLIP_X0):
    """DDIM (Song et al. 2021, eq. 12) over ``steps`` evenly spaced timesteps; eta=1 is DDPM-like."""
    if not isinstance(eta, jax.core.Tracer):
        check_eta(eta)
    dtype = x_T.dtype
    taus = ddim_timesteps(schedule.n_T, steps)
    alpha_bar = jnp.asarray(schedule.alpha_bar, dtype)
    t_now = jnp.asarray(taus[::-1])
    t_prev = jnp.asarray(list(taus[::-1][1:]) + [0])

    def step(x_t, ts):
        t, t_p = ts
        ab_t, ab_p = alpha_bar[t], alpha_bar[t_p]
        eps_hat = eps_fn(x_t, jnp.full((x_t.shape[0],), t / schedule.n_T, dtype)).astype(dtype)
        x0_hat = _predict_x0(x_t, eps_hat, ab_t, clip_x0)
        if clip_x0:  # keep eps consistent with the clipped x0 (as the DDIM reference code does)
            eps_hat = (x_t - jnp.sqrt(ab_t) * x0_hat) / jnp.sqrt(1 - ab_t)
        sigma = eta * jnp.sqrt((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p))
        z = jax.random.normal(jax.random.fold_in(key, t), x_t.shape, dtype)
        direction = jnp.sqrt(jnp.maximum(1 - ab_p - sigma**2, 0.0)) * eps_hat
        return jnp.sqrt(ab_p) * x0_hat + direction + sigma * z, None

    x_0, _ = lax.scan(step, x_T, (t_now, t_prev))
    return x_0
