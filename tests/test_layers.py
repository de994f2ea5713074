"""The fast layers against the plain Flax/lax ones and against torch, values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from unet_jax.layers import ConvTranspose, avg_pool, max_pool


@pytest.mark.parametrize("in_ch,out_ch,k,extra,size", [(128, 128, 3, 0, 1), (256, 128, 2, 1, 3), (128, 64, 2, 0, 14)])
def test_conv_transpose_matches_torch_and_flax(in_ch, out_ch, k, extra, size):
    with jax.enable_x64(True):
        torch.manual_seed(0)
        layer = torch.nn.ConvTranspose2d(in_ch, out_ch, k, k, output_padding=extra).double()
        x = torch.randn(2, in_ch, size, size, dtype=torch.float64)
        expected = layer(x).detach().numpy().transpose(0, 2, 3, 1)
        variables = {"params": {"kernel": jnp.asarray(layer.weight.detach().numpy().transpose(2, 3, 1, 0)),
                                "bias": jnp.asarray(layer.bias.detach().numpy())}}
        x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
        fast = ConvTranspose(out_ch, k, extra, fast=True).apply(variables, x_nhwc)
        plain = ConvTranspose(out_ch, k, extra, fast=False).apply(variables, x_nhwc)
        flax_layer = nn.ConvTranspose(out_ch, (k, k), strides=(k, k), padding=((k - 1, k - 1 + extra),) * 2,
                                      transpose_kernel=True).apply(variables, x_nhwc)
        assert fast.shape == expected.shape == (2, size * k + extra, size * k + extra, out_ch)
        np.testing.assert_allclose(fast, expected, rtol=0, atol=1e-12)
        np.testing.assert_allclose(plain, expected, rtol=0, atol=1e-12)
        np.testing.assert_allclose(flax_layer, expected, rtol=0, atol=1e-12)
        if extra:  # the output_padding row and column carry only the bias, as in torch
            np.testing.assert_array_equal(fast[:, -1, :, :], np.broadcast_to(variables["params"]["bias"], fast[:, -1].shape))


def test_conv_transpose_gradients_agree_between_fast_and_plain():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (3, 3, 3, 16), jnp.float64)
        layer = ConvTranspose(8, 2, 1)
        variables = layer.init(jax.random.key(1), x)

        def loss(variables, x, fast):
            return jnp.sum(jnp.sin(ConvTranspose(8, 2, 1, fast=fast).apply(variables, x)))

        g_fast = jax.grad(loss, argnums=(0, 1))(variables, x, True)
        g_plain = jax.grad(loss, argnums=(0, 1))(variables, x, False)
        for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [28, 14, 7])  # 7 -> 3 floors, as torch does
def test_max_pool_matches_flax_and_torch(size):
    with jax.enable_x64(True):
        x = np.random.default_rng(size).standard_normal((2, size, size, 5))
        fast, plain = max_pool(jnp.asarray(x), 2, fast=True), max_pool(jnp.asarray(x), 2, fast=False)
        expected = torch.nn.MaxPool2d(2)(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        assert fast.shape == (2, size // 2, size // 2, 5)
        np.testing.assert_array_equal(fast, expected)
        np.testing.assert_array_equal(plain, expected)
        g_fast = jax.grad(lambda v: jnp.sum(jnp.sin(max_pool(v, 2, fast=True))))(jnp.asarray(x))
        g_plain = jax.grad(lambda v: jnp.sum(jnp.sin(max_pool(v, 2, fast=False))))(jnp.asarray(x))
        np.testing.assert_allclose(g_fast, g_plain, rtol=0, atol=1e-15)


def test_avg_pool_matches_flax_and_torch():
    with jax.enable_x64(True):
        x = np.random.default_rng(0).standard_normal((4, 3, 3, 6))
        expected = torch.nn.AvgPool2d(3)(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        for fast in (True, False):
            out = avg_pool(jnp.asarray(x), 3, fast=fast)
            assert out.shape == (4, 1, 1, 6)
            np.testing.assert_allclose(out, expected, rtol=0, atol=1e-15)
