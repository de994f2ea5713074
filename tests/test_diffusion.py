"""The schedule, noising and both samplers, against a plain NumPy transcription of the papers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax.diffusion import ddim_sample, ddpm_sample, noise_prediction_loss, q_sample
from unet_jax.schedule import ddim_timesteps, linear_schedule


def test_schedule_is_ho_et_al_in_float64():
    s = linear_schedule()
    assert s.n_T == 1000 and s.beta.dtype == np.float64
    assert s.beta[0] == 0.0 and s.beta[1] == 1e-4 and s.beta[1000] == pytest.approx(0.02, abs=1e-17)
    assert s.alpha_bar[0] == 1.0
    np.testing.assert_allclose(s.alpha_bar[500], np.prod(1 - np.linspace(1e-4, 0.02, 1000)[:500]), rtol=1e-14)
    assert s.alpha_bar[1000] < 1e-4  # x_T is almost pure noise


def test_ddim_timesteps():
    np.testing.assert_array_equal(ddim_timesteps(10, 4), [1, 4, 7, 10])
    assert ddim_timesteps(1000, 100)[-1] == 1000 and len(ddim_timesteps(1000, 100)) == 100
    np.testing.assert_array_equal(ddim_timesteps(1000, 1), [1000])  # one step starts from pure noise
    with pytest.raises(ValueError, match="sample steps"):
        ddim_timesteps(10, 11)


def _eps(x, t):
    """A stand-in noise predictor with both an x and a t dependence."""
    return 0.3 * x + jnp.reshape(t, (-1, 1, 1, 1)) - 0.1


def test_noising_and_loss_follow_the_equations():
    with jax.enable_x64(True):
        s = linear_schedule(50)
        x0 = jnp.linspace(-1, 1, 2 * 4 * 4).reshape(2, 4, 4, 1)
        noise = jnp.cos(jnp.arange(32.0)).reshape(2, 4, 4, 1)
        t = jnp.array([1, 50])
        x_t = q_sample(s, x0, t, noise)
        expected = np.sqrt(s.alpha_bar[[1, 50]])[:, None, None, None] * x0 + np.sqrt(1 - s.alpha_bar[[1, 50]])[:, None, None, None] * noise
        np.testing.assert_allclose(x_t, expected, rtol=1e-15)
        loss = noise_prediction_loss(_eps, s, x0, t, noise)
        np.testing.assert_allclose(loss, np.mean((np.asarray(_eps(expected, t / 50)) - noise) ** 2), rtol=1e-14)


def test_ddpm_matches_numpy_algorithm_2():
    with jax.enable_x64(True):
        s, key = linear_schedule(10), jax.random.key(0)
        x_T = jax.random.normal(jax.random.key(1), (3, 4, 4, 1), jnp.float64)
        ours = ddpm_sample(_eps, s, key, x_T)
        x = np.asarray(x_T)
        for t in range(10, 0, -1):
            z = np.asarray(jax.random.normal(jax.random.fold_in(key, t), x.shape, jnp.float64)) if t > 1 else 0.0
            eps = np.asarray(_eps(x, np.full(3, t / 10)))
            x = (x - s.beta[t] / np.sqrt(1 - s.alpha_bar[t]) * eps) / np.sqrt(s.alpha[t]) + np.sqrt(s.beta[t]) * z
        np.testing.assert_allclose(ours, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_numpy_eq_12(eta):
    with jax.enable_x64(True):
        s, key = linear_schedule(10), jax.random.key(0)
        x_T = jax.random.normal(jax.random.key(1), (3, 4, 4, 1), jnp.float64)
        ours = ddim_sample(_eps, s, key, x_T, steps=4, eta=eta)
        x = np.asarray(x_T)
        taus = [10, 7, 4, 1]
        for t, t_prev in zip(taus, taus[1:] + [0]):
            ab, ab_prev = s.alpha_bar[t], s.alpha_bar[t_prev]
            eps = np.asarray(_eps(x, np.full(3, t / 10)))
            x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
            sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab)) * np.sqrt(1 - ab / ab_prev)
            z = np.asarray(jax.random.normal(jax.random.fold_in(key, t), x.shape, jnp.float64))
            x = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev - sigma**2) * eps + sigma * z
        np.testing.assert_allclose(ours, x, rtol=1e-12, atol=1e-12)


def test_samplers_are_one_compiled_program():
    s = linear_schedule(10)
    traces = []

    def counting_eps(x, t):
        traces.append(1)
        return _eps(x, t)

    x_T = jnp.zeros((2, 4, 4, 1))
    for fn in (lambda k, x: ddpm_sample(counting_eps, s, k, x), lambda k, x: ddim_sample(counting_eps, s, k, x, 5)):
        traces.clear()
        jax.jit(fn)(jax.random.key(0), x_T)
        assert len(traces) == 1  # the model is traced once, inside one lax.scan: no Python loop over steps


def test_clipping_x0_keeps_samples_in_the_data_range():
    s = linear_schedule(10)

    def wild_eps(x, t):  # predicts noise that implies an x0 far outside [-1, 1]
        return -3.0 * jnp.ones_like(x)

    x_T = jax.random.normal(jax.random.key(1), (2, 4, 4, 1))
    for clip in (False, True):
        ddim = ddim_sample(wild_eps, s, jax.random.key(0), x_T, steps=5, clip_x0=clip)
        ddpm = ddpm_sample(wild_eps, s, jax.random.key(0), x_T, clip_x0=clip)
        inside = bool(jnp.all(jnp.abs(ddim) <= 1 + 1e-6) and jnp.all(jnp.abs(ddpm) <= 1 + 1e-6))
        assert inside == clip


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_torch_samplers_match_the_jax_ones(sampler):
    import torch

    from unet_torch import diffusion as torch_diffusion

    with jax.enable_x64(True):
        s = linear_schedule(10)
        x_T = jax.random.normal(jax.random.key(1), (2, 4, 4, 1), jnp.float64)

        def torch_eps(x, t):
            return torch.from_numpy(np.array(_eps(jnp.asarray(x.numpy()), jnp.asarray(t.numpy()))))

        x_torch = torch.from_numpy(np.array(x_T))  # a writable copy
        if sampler == "ddim":  # deterministic at eta = 0: the two must agree to rounding
            ours = ddim_sample(_eps, s, jax.random.key(0), x_T, steps=4, clip_x0=True)
            theirs = torch_diffusion.ddim_sample(torch_eps, s, x_torch, 4, clip_x0=True)
        else:  # DDPM draws noise; compare the noiseless posterior mean chain via T = 1
            s = linear_schedule(1)
            ours = ddpm_sample(_eps, s, jax.random.key(0), x_T, clip_x0=True)
            theirs = torch_diffusion.ddpm_sample(torch_eps, s, x_torch, clip_x0=True)
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-12, atol=1e-12)
