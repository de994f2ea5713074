"""The fast layers and every 3x3 conv lowering against the plain Flax/lax ones and against torch, values and gradients."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from unet_jax.layers import (
    CONV_LOWERINGS,
    Conv3x3,
    ConvPlan,
    ConvTranspose,
    GroupNorm,
    avg_pool,
    conv_same_tapgrad,
    conv_shape,
    max_pool,
)


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


@pytest.mark.parametrize("size,channels", [(28, 64), (14, 128), (7, 128), (3, 128)])  # the UNet's GroupNorms
def test_group_norm_and_its_written_out_gradient_match_torch_and_flax_in_float64(size, channels):
    with jax.enable_x64(True):
        torch.manual_seed(size)
        layer = torch.nn.GroupNorm(8, channels).double()
        torch.nn.init.normal_(layer.weight, 1.0, 0.3)
        torch.nn.init.normal_(layer.bias, 0.0, 0.3)
        # Groups of different means and spreads, and a ReLU after, as in the network.
        x = (torch.randn(2, channels, size, size, dtype=torch.float64) * torch.linspace(0.5, 3, channels)[:, None, None]
             + torch.linspace(-1, 2, channels)[:, None, None]).requires_grad_()
        probe = torch.randn(2, channels, size, size, dtype=torch.float64)
        (torch.relu(layer(x)) * probe).sum().backward()
        variables = {"params": {"scale": jnp.asarray(layer.weight.detach().numpy()),
                                "bias": jnp.asarray(layer.bias.detach().numpy())}}
        x_nhwc, probe_nhwc = (jnp.asarray(a.detach().numpy().transpose(0, 2, 3, 1)) for a in (x, probe))
        flax_layer = nn.GroupNorm(8, epsilon=1e-5, use_fast_variance=False)
        for module in (GroupNorm(8, epsilon=1e-5), flax_layer):
            y = module.apply(variables, x_nhwc)
            np.testing.assert_allclose(y, layer(x).detach().numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-12)
            grads = jax.grad(lambda v, x: jnp.sum(nn.relu(module.apply(v, x)) * probe_nhwc), argnums=(0, 1))(
                variables, x_nhwc)
            np.testing.assert_allclose(grads[1], x.grad.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-12)
            np.testing.assert_allclose(grads[0]["params"]["scale"], layer.weight.grad.numpy(), rtol=0, atol=1e-11)
            np.testing.assert_allclose(grads[0]["params"]["bias"], layer.bias.grad.numpy(), rtol=0, atol=1e-11)


def test_tap_weight_gradients_sum_the_batch_in_float32_for_bfloat16():
    # XLA's convolution rounds a bfloat16 weight gradient once; a bfloat16 running sum over the
    # batch's image pairs rounded once per pair (measured 7.5e-3 at batch 64, 1.9e-2 at 512, where
    # XLA keeps 2.9e-3 at any batch). Now all three measure 2.9e-3: bound 1.1x XLA's.
    x, dy = (jax.random.normal(jax.random.key(k), (64, 7, 7, 128)) for k in (0, 2))
    kernel = 0.05 * jax.random.normal(jax.random.key(1), (3, 3, 128, 128))

    def weight_gradient(name, dtype):
        _, vjp = jax.vjp(lambda k: CONV_LOWERINGS[name](x.astype(dtype), k.astype(dtype)), kernel)
        return np.asarray(vjp(dy.astype(dtype))[0], np.float64)

    exact = weight_gradient("xla", jnp.float32)
    error = {name: np.linalg.norm(weight_gradient(name, jnp.bfloat16) - exact) / np.linalg.norm(exact)
             for name in ("xla", "tapgrad", "winograd_tapgrad")}
    assert max(error["tapgrad"], error["winograd_tapgrad"]) <= 1.1 * error["xla"], error


def test_group_norm_computes_its_statistics_in_float32_for_bfloat16():
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 16)) * 3 + 100  # a large mean: bfloat16 statistics would lose it
    variables = GroupNorm(8).init(jax.random.key(1), x)
    ours = GroupNorm(8, dtype=jnp.bfloat16).apply(variables, x.astype(jnp.bfloat16))
    flax = nn.GroupNorm(8, epsilon=1e-5, use_fast_variance=False, dtype=jnp.bfloat16).apply(
        variables, x.astype(jnp.bfloat16))
    assert ours.dtype == flax.dtype == jnp.bfloat16
    # Within a bfloat16 rounding of each other (float32 sums in another order); bfloat16 statistics
    # of a mean of 100 would be off by a tenth of a standard deviation.
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(flax, np.float32), rtol=0, atol=2e-2)
    with pytest.raises(ValueError, match="divisible by num_groups 8, got 12"):
        GroupNorm(8).init(jax.random.key(1), jnp.zeros((1, 3, 3, 12)))


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
        x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
        torch.sin(torch.nn.MaxPool2d(2)(x_torch)).sum().backward()
        np.testing.assert_allclose(g_fast, x_torch.grad.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-15)
        np.testing.assert_allclose(g_plain, g_fast, rtol=0, atol=1e-15)


def test_avg_pool_matches_flax_and_torch():
    with jax.enable_x64(True):
        x = np.random.default_rng(0).standard_normal((4, 3, 3, 6))
        expected = torch.nn.AvgPool2d(3)(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        for fast in (True, False):
            out = avg_pool(jnp.asarray(x), 3, fast=fast)
            assert out.shape == (4, 1, 1, 6)
            np.testing.assert_allclose(out, expected, rtol=0, atol=1e-15)


# Every 3x3 convolution shape of the UNet (map size, in, out), a 3x3 map, 256 inputs, and the 1-channel ends.
CONV_SHAPES = [(28, 1, 64), (28, 64, 64), (14, 64, 128), (7, 128, 128), (14, 64, 64), (28, 128, 1), (3, 256, 128)]


def _torch_conv(x_nhwc, kernel_hwio, dy_nhwc):
    """torch.nn.functional.conv2d(padding="same"), its input and weight gradients, back in NHWC/HWIO."""
    def nchw(a, axes):
        return torch.from_numpy(np.array(np.asarray(a).transpose(axes), order="C"))  # a writable, contiguous copy

    x = nchw(x_nhwc, (0, 3, 1, 2)).requires_grad_()
    w = nchw(kernel_hwio, (3, 2, 0, 1)).requires_grad_()
    y = torch.nn.functional.conv2d(x, w, padding="same")
    y.backward(nchw(dy_nhwc, (0, 3, 1, 2)))
    return (y.detach().numpy().transpose(0, 2, 3, 1), x.grad.numpy().transpose(0, 2, 3, 1),
            w.grad.numpy().transpose(2, 3, 1, 0))


def _conv_case(size, in_ch, out_ch, dtype, k=3):
    # NumPy draws: jax.random.normal would compile once per shape and dtype, about a second each.
    rng = np.random.default_rng(size * 1000 + in_ch + out_ch)
    x = rng.standard_normal((2, size, size, in_ch))
    kernel = rng.standard_normal((k, k, in_ch, out_ch)) / np.sqrt(k * k * in_ch)
    dy = rng.standard_normal((2, size, size, out_ch))
    return tuple(jnp.asarray(a, dtype) for a in (x, kernel, dy))


def _forward_and_gradients(lowering, x, kernel, dy):
    y, pullback = jax.vjp(CONV_LOWERINGS[lowering], x, kernel)
    return (y, *pullback(dy))


@functools.cache
def _every_shape(lowering: str, dtype) -> dict:
    """(x, kernel, dy) and (y, dx, dkernel) of ``lowering`` for every CONV_SHAPES case, keyed by shape.

    All the shapes go through one jitted program, one compile per lowering and dtype: compiled one
    by one, the small programs cost about a second each, most of it the same fixed work.
    """
    cases = {shape: _conv_case(*shape, dtype) for shape in CONV_SHAPES}
    found = jax.jit(lambda cases: {shape: _forward_and_gradients(lowering, *case) for shape, case in cases.items()})(cases)
    return {shape: (cases[shape], found[shape]) for shape in CONV_SHAPES}


def _max_relative(found, expected):
    return float(np.max(np.abs(np.asarray(found, np.float64) - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("lowering", sorted(CONV_LOWERINGS))
@pytest.mark.parametrize("size,in_ch,out_ch", CONV_SHAPES)
def test_conv_lowering_matches_torch_in_float64(lowering, size, in_ch, out_ch):
    with jax.enable_x64(True):
        (x, kernel, dy), found = _every_shape(lowering, jnp.float64)[size, in_ch, out_ch]
        expected = _torch_conv(x, kernel, dy)
        for name, f, e in zip(("y", "dx", "dkernel"), found, expected):
            assert f.shape == e.shape, name
            assert _max_relative(f, e) <= 1e-12, (name, _max_relative(f, e))


# The evaluation LeNet's 5x5 convolutions, and a 1-output-channel one (dy's taps are stacked)
@pytest.mark.parametrize("size,in_ch,out_ch", [(28, 1, 32), (14, 32, 64), (14, 32, 1)])
def test_tap_weight_gradient_of_a_5x5_kernel_matches_torch_in_float64(size, in_ch, out_ch):
    with jax.enable_x64(True):
        x, kernel, dy = _conv_case(size, in_ch, out_ch, jnp.float64, k=5)
        y, pullback = jax.vjp(conv_same_tapgrad, x, kernel)
        for name, f, e in zip(("y", "dx", "dkernel"), (y, *pullback(dy)), _torch_conv(x, kernel, dy)):
            assert f.shape == e.shape, name
            assert _max_relative(f, e) <= 1e-12, (name, _max_relative(f, e))


@pytest.mark.parametrize("lowering", sorted(set(CONV_LOWERINGS) - {"xla"}))
@pytest.mark.parametrize("size,in_ch,out_ch", CONV_SHAPES)
def test_conv_lowering_matches_lax_conv_in_float32(lowering, size, in_ch, out_ch):
    _, expected = _every_shape("xla", jnp.float32)[size, in_ch, out_ch]
    _, found = _every_shape(lowering, jnp.float32)[size, in_ch, out_ch]
    for name, f, e in zip(("y", "dx", "dkernel"), found, [np.asarray(a, np.float64) for a in expected]):
        # float32 rounding of sums of up to 9 * 256 terms (Winograd's transforms add a few more roundings)
        assert _max_relative(f, e) <= 1e-5, (name, _max_relative(f, e))


def test_conv3x3_module_reads_nn_conv_parameters_and_follows_its_plan():
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 16))
    variables = nn.Conv(8, (3, 3), padding=1).init(jax.random.key(1), x)
    expected = nn.Conv(8, (3, 3), padding=1).apply(variables, x)
    assert jax.tree.map(jnp.shape, Conv3x3(8).init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, variables)
    for lowering in CONV_LOWERINGS:
        plan = ConvPlan("xla", ((conv_shape(7, 7, 16, 8), lowering),))
        np.testing.assert_allclose(Conv3x3(8, conv=plan).apply(variables, x), expected, rtol=0, atol=1e-5)
        assert plan.lowering("7x7 16->8") == lowering and plan.lowering("28x28 1->64") == "xla"
        assert ConvPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_conv_plan_refuses_an_unknown_lowering():
    with pytest.raises(ValueError, match="expected a 3x3 conv lowering in .* got 'fft'"):
        ConvPlan("fft")
    with pytest.raises(ValueError, match="got 'cudnn'"):
        ConvPlan("xla", (("28x28 64->64", "cudnn"),))


def test_max_pool_gradient_goes_to_the_first_maximum_as_in_torch():
    with jax.enable_x64(True):
        # Rounded to integers: most windows hold ties, some at positive values.
        x = np.round(np.random.default_rng(0).standard_normal((2, 7, 7, 3)))
        dy = np.random.default_rng(1).standard_normal((2, 3, 3, 3))
        _, pullback = jax.vjp(lambda v: max_pool(v, 2), jnp.asarray(x))
        t = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
        torch.nn.MaxPool2d(2)(t).backward(torch.from_numpy(dy.transpose(0, 3, 1, 2)))
        np.testing.assert_array_equal(pullback(jnp.asarray(dy))[0], t.grad.numpy().transpose(0, 2, 3, 1))
