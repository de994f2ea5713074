"""The schedule, noising and both samplers, against a plain NumPy transcription of the papers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_recipe.schedule import ddim_timesteps, linear_schedule
from unet_jax.diffusion import ddim_sample, ddpm_sample, noise_prediction_loss, q_sample


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
        ours = ddpm_sample(_eps, s, key, x_T, clip_x0=False)
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
        ours = ddim_sample(_eps, s, key, x_T, steps=4, eta=eta, clip_x0=False)
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


def _numpy_ddpm(x, s, eps_fn, noise, clip):
    """Ho et al. 2020: x0 from eq. 15 (clipped to [-1, 1] if asked), then a draw from the posterior of eq. 6-7."""
    for t in range(s.n_T, 0, -1):
        eps = np.asarray(eps_fn(x, np.full(len(x), t / s.n_T)))
        x0 = (x - np.sqrt(1 - s.alpha_bar[t]) * eps) / np.sqrt(s.alpha_bar[t])
        x0 = np.clip(x0, -1, 1) if clip else x0
        ab, ab_prev = s.alpha_bar[t], s.alpha_bar[t - 1]
        mean = np.sqrt(ab_prev) * s.beta[t] / (1 - ab) * x0 + np.sqrt(s.alpha[t]) * (1 - ab_prev) / (1 - ab) * x
        x = mean + (np.sqrt(s.beta[t]) * noise(t) if t > 1 else 0.0)
    return x


def _numpy_ddim(x, s, eps_fn, noise, taus, eta, clip):
    """Song et al. 2021, eq. 12; with clipping, x0 is clipped and eps re-derived from it (their code's way)."""
    for t, t_prev in zip(taus, taus[1:] + [0]):
        ab, ab_prev = s.alpha_bar[t], s.alpha_bar[t_prev]
        eps = np.asarray(eps_fn(x, np.full(len(x), t / s.n_T)))
        x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
        if clip:
            x0 = np.clip(x0, -1, 1)
            eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
        sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab)) * np.sqrt(1 - ab / ab_prev)
        x = np.sqrt(ab_prev) * x0 + np.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps + sigma * noise(t)
    return x


def _wide_eps(x, t):
    """A predictor whose x0 leaves [-1, 1] often, so that clipping matters at every step."""
    return 0.3 * x + 2.0 * jnp.reshape(t, (-1, 1, 1, 1)) - 1.2


def _jax_noise(key, shape):
    return lambda t: np.asarray(jax.random.normal(jax.random.fold_in(key, t), shape, jnp.float64))


def test_the_default_samplers_are_the_clipped_ones_and_match_numpy():
    # The samplers everyone runs: DDPM and DDIM with x0 clipped, DDIM at eta = 1, as called with defaults.
    with jax.enable_x64(True):
        s, key = linear_schedule(10), jax.random.key(0)
        x_T = jax.random.normal(jax.random.key(1), (3, 4, 4, 1), jnp.float64)
        noise = _jax_noise(key, x_T.shape)
        ddpm = ddpm_sample(_wide_eps, s, key, x_T)
        np.testing.assert_allclose(ddpm, _numpy_ddpm(np.asarray(x_T), s, _wide_eps, noise, clip=True), rtol=1e-12,
                                   atol=1e-12)
        ddim = ddim_sample(_wide_eps, s, key, x_T, steps=4)
        np.testing.assert_allclose(ddim, _numpy_ddim(np.asarray(x_T), s, _wide_eps, noise, [10, 7, 4, 1], 1.0, True),
                                   rtol=1e-12, atol=1e-12)
        unclipped = _numpy_ddim(np.asarray(x_T), s, _wide_eps, noise, [10, 7, 4, 1], 1.0, False)
        assert np.max(np.abs(np.asarray(ddim) - unclipped)) > 1e-3, "the clipping was exercised"


def test_generate_as_called_with_its_defaults_is_the_numpy_sampler_of_the_real_model():
    # The sampler everyone calls (the README's quickstart, the CLIs, the trainer's grids): generate with
    # its defaults, DDIM in 100 of T = 1000 steps at eta = 1 with x0 clipped, on the tutorial's Unet;
    # and sampler="ddpm" at a small T. x_T and each step's noise come from generate's key as it documents.
    from unet_jax.model import Unet, init_variables
    from unet_jax.sample import generate

    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(jnp.float64), init_variables(jax.random.key(3))["params"])
        model = Unet(conv="xla")
        eps_fn = jax.jit(lambda x, t: model.apply({"params": params}, x, t))
        key = jax.random.key(7)
        start_key, loop_key = jax.random.split(key)
        x_T = np.asarray(jax.random.normal(start_key, (2, 28, 28, 1), jnp.float64))
        noise = _jax_noise(loop_key, x_T.shape)
        ours = generate(params, key, model=model, num=2)
        s = linear_schedule(1000)
        reference = _numpy_ddim(x_T, s, eps_fn, noise, list(ddim_timesteps(1000, 100)[::-1]), 1.0, True)
        np.testing.assert_allclose(ours, np.clip(reference, -1, 1), rtol=0, atol=1e-10)
        ours = generate(params, key, model=model, num=2, sampler="ddpm", n_T=20)
        reference = _numpy_ddpm(x_T, linear_schedule(20), eps_fn, noise, clip=True)
        np.testing.assert_allclose(ours, np.clip(reference, -1, 1), rtol=0, atol=1e-10)


def test_one_set_of_sampler_defaults():
    import argparse
    import inspect

    from ddpm_recipe import schedule
    from unet_jax import evaluate, sample
    from unet_jax.train import Config
    from unet_torch import diffusion as torch_diffusion

    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}

    expected = {"sampler": schedule.DEFAULT_SAMPLER, "steps": schedule.DEFAULT_SAMPLE_STEPS,
                "eta": schedule.DEFAULT_ETA, "clip_x0": schedule.DEFAULT_CLIP_X0}
    assert expected == {"sampler": "ddim", "steps": 100, "eta": 1.0, "clip_x0": True}
    assert {k: defaults(sample.generate.__wrapped__)[k] for k in expected} == expected
    assert {k: defaults(ddim_sample)[k] for k in ("steps", "eta", "clip_x0")} == {k: expected[k] for k in ("steps", "eta", "clip_x0")}
    assert defaults(ddpm_sample)["clip_x0"] == expected["clip_x0"]
    for fn in (torch_diffusion.ddim_sample, torch_diffusion.ddpm_sample):
        assert all(defaults(fn)[k] == expected[k] for k in ("eta", "clip_x0") if k in defaults(fn))
    config = Config()
    assert (config.sampler, config.sample_steps, config.eta) == (expected["sampler"], expected["steps"], expected["eta"])
    for main in (sample.main, evaluate.main):
        parser_defaults = {}

        def capture(self, args=None, namespace=None):
            parser_defaults.update({a.dest: a.default for a in self._actions})
            raise SystemExit(0)

        original = argparse.ArgumentParser.parse_args
        argparse.ArgumentParser.parse_args = capture
        try:
            with pytest.raises(SystemExit):
                main([])
        finally:
            argparse.ArgumentParser.parse_args = original
        assert (parser_defaults["sampler"], parser_defaults["sample_steps"], parser_defaults["eta"]) == \
            (expected["sampler"], expected["steps"], expected["eta"])


@pytest.mark.parametrize("sampler,eta", [("ddpm", None), ("ddim", 1.0), ("ddim", 0.0)])
def test_torch_and_jax_samplers_agree_over_many_steps_with_shared_noise(sampler, eta, monkeypatch):
    import torch

    from unet_torch import diffusion as torch_diffusion

    with jax.enable_x64(True):
        s, key = linear_schedule(10), jax.random.key(0)
        x_T = jax.random.normal(jax.random.key(1), (2, 4, 4, 1), jnp.float64)
        noise = _jax_noise(key, x_T.shape)
        taus = [10, 7, 4, 1]
        # torch draws with torch.randn in its loop; hand it JAX's noise for the same steps, in its order.
        order = list(range(10, 1, -1)) if sampler == "ddpm" else taus[:-1] if eta else []  # DDIM's last sigma is 0
        queue = [torch.from_numpy(noise(t).transpose(0, 3, 1, 2).copy()) for t in order]
        monkeypatch.setattr(torch, "randn", lambda *args, **kwargs: queue.pop(0))

        def torch_eps(x, t):
            return torch.from_numpy(np.array(_wide_eps(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy())))
                                    .transpose(0, 3, 1, 2))

        x_torch = torch.from_numpy(np.array(x_T).transpose(0, 3, 1, 2).copy())
        if sampler == "ddim":
            ours = ddim_sample(_wide_eps, s, key, x_T, steps=4, eta=eta)
            theirs = torch_diffusion.ddim_sample(torch_eps, s, x_torch, 4, eta=eta)
        else:
            ours = ddpm_sample(_wide_eps, s, key, x_T)
            theirs = torch_diffusion.ddpm_sample(torch_eps, s, x_torch)
        assert queue == [], "torch drew noise exactly where JAX did"
        np.testing.assert_allclose(ours, theirs.numpy().transpose(0, 2, 3, 1), rtol=1e-12, atol=1e-12)


def test_both_ddim_samplers_refuse_a_negative_eta():
    import torch

    from unet_torch.diffusion import ddim_sample as torch_ddim_sample

    schedule = linear_schedule(10)
    with pytest.raises(ValueError, match="expected DDIM eta >= 0"):
        ddim_sample(lambda x, t: x, schedule, jax.random.key(0), jnp.zeros((1, 28, 28, 1)), 2, eta=-0.5)
    with pytest.raises(ValueError, match="expected DDIM eta >= 0"):
        torch_ddim_sample(lambda x, t: x, schedule, torch.zeros(1, 1, 28, 28), 2, eta=-0.5)
