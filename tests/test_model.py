"""The Flax mirror's structure, shapes, input checks and options."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_recipe.schedule import N_T
from unet_jax import Decoder, Encoder, Unet, init_variables


@pytest.fixture(scope="module")
def variables():
    return init_variables(jax.random.key(0))


def _inputs(batch=4):
    x = jax.random.normal(jax.random.key(1), (batch, 28, 28, 1))
    t = jnp.arange(1, batch + 1) / N_T
    return x, t


def test_initial_weights_are_flaxs_own_initialisation(variables):
    # init_variables compiles the initialisers as one program; Flax run op by op is the reference.
    x, t = jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,))
    eager = Unet().init(jax.random.key(0), x, t)
    assert jax.tree.structure(eager) == jax.tree.structure(variables)
    for ours, theirs in zip(jax.tree.leaves(variables), jax.tree.leaves(eager)):
        np.testing.assert_array_equal(ours, theirs)


def test_initial_weights_are_the_same_inside_a_jit(variables):
    # Traced, init_variables is a nested jit at XLA's default level; with a key closed over, its own program.
    key = jax.random.key(0)
    for inside in (jax.jit(init_variables)(key), jax.jit(lambda: init_variables(key))()):
        for ours, theirs in zip(jax.tree.leaves(inside), jax.tree.leaves(variables), strict=True):
            np.testing.assert_array_equal(ours, theirs)


def test_intermediate_shapes_are_the_tutorials(variables):
    x, t = _inputs(32)
    out = jax.eval_shape(functools.partial(Unet().apply, method=Unet.intermediates), variables, x, t)
    expected = {  # the tutorial's printed shapes, NCHW -> NHWC
        "x_f": (32, 28, 28, 64), "d1": (32, 14, 14, 64), "d2": (32, 7, 7, 128), "d3": (32, 3, 3, 128),
        "latent": (32, 1, 1, 128), "temb": (32, 1, 1, 128), "u1": (32, 3, 3, 128), "u2": (32, 7, 7, 128),
        "u3": (32, 14, 14, 64), "u4": (32, 28, 28, 64), "eps_hat": (32, 28, 28, 1),
    }
    assert {k: v.shape for k, v in out.items()} == expected


def test_encoder_and_decoder_stand_alone(variables):
    x, t = _inputs()
    params = variables["params"]
    x_f, d1, d2, d3, latent = jax.jit(Encoder().apply)({"params": params["encoder"]}, x)
    u1, u2, u3, u4, eps_hat = jax.jit(Decoder().apply)({"params": params["decoder"]}, latent, d3, d2, d1, x_f)
    full = jax.jit(functools.partial(Unet().apply, method=Unet.intermediates))(variables, x, jnp.zeros(4))
    # With temb = lin2(sin(0)) = lin2's bias (zero at init), the Unet's decoder sees latent alone.
    np.testing.assert_allclose(eps_hat, full["eps_hat"], rtol=0, atol=1e-6)
    assert (u1.shape, u4.shape) == ((4, 3, 3, 128), (4, 28, 28, 64))


def test_fast_and_reference_layers_agree(variables):
    x, t = _inputs()
    fast = jax.jit(Unet(fast=True).apply)(variables, x, t)
    plain = jax.jit(Unet(fast=False).apply)(variables, x, t)
    np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params(variables):
    # Timesteps across [0, 1], where the time embedding moves eps_hat by ~10 % of its largest value
    # (measured 0.24 of 2.54); bfloat16 rounding measured 0.017. Bound: 2 % of the largest value.
    x, t = _inputs()[0], jnp.array([0.05, 0.35, 0.7, 1.0])
    out = jax.jit(Unet(dtype=jnp.bfloat16).apply)(variables, x, t)
    assert out.dtype == jnp.bfloat16
    ref = jax.jit(Unet().apply)(variables, x, t)
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.02 * float(jnp.max(jnp.abs(ref)))
    # A bfloat16 model initialises float32 parameters (the trainer's bf16 runs rely on it).
    fresh = jax.eval_shape(lambda: init_variables(jax.random.key(1), dtype=jnp.bfloat16))
    assert {p.dtype for p in jax.tree.leaves(fresh)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("shape", [(2, 32, 32, 1), (2, 28, 28, 3), (2, 1, 28, 28), (28, 28, 1)])
def test_wrong_image_shape_is_a_clear_value_error(variables, shape):
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 28, 28, 1\)"):
        Unet().apply(variables, jnp.zeros(shape), jnp.zeros(shape[0]))


def test_wrong_timestep_count_is_a_clear_value_error(variables):
    with pytest.raises(ValueError, match=r"expected t of shape \(2,\)"):
        Unet().apply(variables, jnp.zeros((2, 28, 28, 1)), jnp.zeros(3))


def test_bad_shape_raises_under_jit_too(variables):
    with pytest.raises(ValueError, match="expected x of shape"):
        jax.jit(Unet().apply)(variables, jnp.zeros((2, 32, 32, 1)), jnp.zeros(2))
