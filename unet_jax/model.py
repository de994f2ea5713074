"""The Flax Linen mirror of the tutorial UNet (``unet_torch.model``), layer for layer.

Module and attribute names are torch's. A torch ``nn.Sequential`` attribute becomes a
list assigned in ``setup``, which Flax names ``<attr>_<index>``, so the torch key
``encoder.down1.model.0.block.1.weight`` lives at Flax path
``encoder/down1/model_0/block_1/scale``. ``parity/port.py`` spells every pair out.

Tensors are NHWC: ``x`` is ``(B, 28, 28, 1)`` where torch has ``(B, 1, 28, 28)``, and
concatenations run over the last axis in torch's order ``(x, skip)``.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_recipe.settings import DTYPES
from unet_jax.layers import Conv3x3, ConvPlan, ConvTranspose, GroupNorm, avg_pool, conv_shape, max_pool

Dtype = Any

IMAGE_SHAPE = (28, 28, 1)
# The compute dtypes a run may ask for (--dtype, ddpm_recipe.settings.DTYPES); parameters stay float32 either way.
COMPUTE_DTYPES = {name: jnp.dtype(name) for name in DTYPES}
TIME_EMBEDDING_DIM = 128


def conv3x3(features: int, conv: str | ConvPlan, dtype: Dtype | None):
    """torch.nn.Conv2d(in, features, 3, 1, 1)."""
    return Conv3x3(features, conv=conv, dtype=dtype)


def group_norm(dtype: Dtype | None, fast: bool = True):
    """torch.nn.GroupNorm(8, C): torch's epsilon (Flax defaults to 1e-6) and two-pass variance;
    where ``fast``, with its gradient written out (``layers.GroupNorm``), else Flax's own."""
    if fast:
        return GroupNorm(num_groups=8, epsilon=1e-5, dtype=dtype)
    return nn.GroupNorm(num_groups=8, epsilon=1e-5, use_fast_variance=False, dtype=dtype)


def sequential(layers, x):
    """torch.nn.Sequential.forward."""
    return functools.reduce(lambda y, layer: layer(y), layers, x)


def check_image(x):
    if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(
            f"expected x of shape (B, 28, 28, 1) (NHWC, one 28x28 channel), got {tuple(x.shape)}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"expected x as floats in [-1, 1] (pixels / 127.5 - 1), got {x.dtype}: "
                         "convert uint8 images with unet_jax.data.to_model_range")


def check_timesteps(t, batch: int):
    """t must be (B,) floats holding timestep / n_T, so within [0, 1]. Values are checked only where
    they are concrete: under jit they are not known until the program runs."""
    if jnp.size(t) != batch:
        raise ValueError(f"expected t of shape ({batch},) holding timestep / n_T, got {tuple(jnp.shape(t))}")
    dtype = jnp.asarray(t).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"expected t as floats holding timestep / n_T in [0, 1], got {dtype}")
    if not isinstance(t, jax.core.Tracer):
        values = np.asarray(t, np.float64).ravel()
        bad = values[~((values >= 0.0) & (values <= 1.0))]  # NaN fails both comparisons
        if bad.size:
            raise ValueError(f"expected t = timestep / n_T in [0, 1], got {bad[0]} ({bad.size} of {values.size} "
                             "outside): divide the timesteps by n_T")


class ConvBlock(nn.Module):
    """Conv 3x3 -> GroupNorm(8) -> ReLU; keeps the spatial size."""

    out_channels: int
    conv: str | ConvPlan = "xla"
    dtype: Dtype | None = None
    fast: bool = True

    def setup(self):
        self.block = [conv3x3(self.out_channels, self.conv, self.dtype), group_norm(self.dtype, self.fast), nn.relu]

    def __call__(self, x):
        return sequential(self.block, x)


class UnetDown(nn.Module):
    """ConvBlock then MaxPool2d(downscale)."""

    out_channels: int
    downscale: int = 2
    fast: bool = True
    conv: str | ConvPlan = "xla"
    dtype: Dtype | None = None

    def setup(self):
        self.model = [
            ConvBlock(self.out_channels, conv=self.conv, dtype=self.dtype, fast=self.fast),
            functools.partial(max_pool, window=self.downscale, fast=self.fast),
        ]

    def __call__(self, x):
        return sequential(self.model, x)


class Encoder(nn.Module):
    """28x28x1 -> 28x28x64 -> 14x14x64 -> 7x7x128 -> 3x3x128 -> 1x1x128."""

    fast: bool = True
    conv: str | ConvPlan = "xla"
    dtype: Dtype | None = None

    def setup(self):
        self.initial_features = [conv3x3(64, self.conv, self.dtype), group_norm(self.dtype, self.fast), nn.relu]
        self.down1 = UnetDown(64, downscale=2, fast=self.fast, conv=self.conv, dtype=self.dtype)
        self.down2 = UnetDown(128, downscale=2, fast=self.fast, conv=self.conv, dtype=self.dtype)
        self.down3 = UnetDown(128, downscale=2, fast=self.fast, conv=self.conv, dtype=self.dtype)
        self.down4 = [functools.partial(avg_pool, window=3, fast=self.fast), nn.relu]

    def __call__(self, x_Bx28x28x1):
        check_image(x_Bx28x28x1)
        x_f = sequential(self.initial_features, x_Bx28x28x1)
        d1 = self.down1(x_f)
        d2 = self.down2(d1)
        d3 = self.down3(d2)
        latent = sequential(self.down4, d3)
        return x_f, d1, d2, d3, latent


class UnetUp(nn.Module):
    """Concatenate (x, skip) on channels, ConvTranspose(upscale, stride upscale), ConvBlock."""

    out_channels: int
    upscale: int = 2
    extra_dim: int = 0
    fast: bool = True
    conv: str | ConvPlan = "xla"
    dtype: Dtype | None = None

    def setup(self):
        self.model = [
            ConvTranspose(self.out_channels, self.upscale, self.extra_dim, fast=self.fast, dtype=self.dtype),
            ConvBlock(self.out_channels, conv=self.conv, dtype=self.dtype, fast=self.fast),
        ]

    def __call__(self, x, skip):
        return sequential(self.model, jnp.concatenate((x, skip), axis=-1))


class Decoder(nn.Module):
    """1x1x128 -> 3x3x128 -> 7x7x128 -> 14x14x64 -> 28x28x64 -> 28x28x1, with skips."""

    fast: bool = True
    conv: str | ConvPlan = "xla"
    dtype: Dtype | None = None

    def setup(self):
        # The first decoder layer has no skip connection.
        self.up1 = [ConvTranspose(128, 3, fast=self.fast, dtype=self.dtype), group_norm(self.dtype, self.fast), nn.relu]
        self.up2 = UnetUp(128, upscale=2, extra_dim=1, fast=self.fast, conv=self.conv, dtype=self.dtype)
        self.up3 = UnetUp(64, upscale=2, fast=self.fast, conv=self.conv, dtype=self.dtype)
        self.up4 = UnetUp(64, upscale=2, fast=self.fast, conv=self.conv, dtype=self.dtype)
        self.out = conv3x3(1, self.conv, self.dtype)

    def __call__(self, latent, d3, d2, d1, x_f):
        u1 = sequential(self.up1, latent)
        u2 = self.up2(u1, d3)
        u3 = self.up3(u2, d2)
        u4 = self.up4(u3, d1)
        eps_hat = self.out(jnp.concatenate([u4, x_f], axis=-1))
        return u1, u2, u3, u4, eps_hat


class TimeEmbedding(nn.Module):
    """t / n_T -> sin(Dense(32, no bias)) -> Dense(embedding_dim), shaped (B, 1, 1, C)."""

    embedding_dim: int
    dtype: Dtype | None = None

    def setup(self):
        self.lin1 = nn.Dense(32, use_bias=False, dtype=self.dtype)
        self.lin2 = nn.Dense(self.embedding_dim, dtype=self.dtype)

    def __call__(self, ts):
        temb = jnp.sin(self.lin1(jnp.reshape(ts, (-1, 1))))
        return self.lin2(temb).reshape(-1, 1, 1, self.embedding_dim)


class Unet(nn.Module):
    """eps_hat = Unet()(x, t): x is (B, 28, 28, 1) NHWC, t is (B,) holding timestep / n_T.

    ``fast=False`` swaps in the plain Flax/lax pools, transposed convolutions and GroupNorm
    (same parameters, same numbers, slower on CPU). ``conv`` lowers the 3x3 convolutions: a name
    from ``layers.CONV_LOWERINGS`` for all of them, or a ``ConvPlan`` per layer shape (what
    ``unet_jax.autotune`` measures); every choice reads the same parameters. ``dtype`` is the
    compute dtype (e.g. ``jnp.bfloat16``); parameters keep the dtype they were initialised or
    ported in.
    """

    fast: bool = True
    conv: str | ConvPlan = "xla"
    dtype: Dtype | None = None

    def setup(self):
        self.encoder = Encoder(fast=self.fast, conv=self.conv, dtype=self.dtype)
        self.decoder = Decoder(fast=self.fast, conv=self.conv, dtype=self.dtype)
        self.time_embedding_layer = TimeEmbedding(TIME_EMBEDDING_DIM, dtype=self.dtype)

    def __call__(self, x, t):
        return self.intermediates(x, t)["eps_hat"]

    def intermediates(self, x, t):
        """Every tensor the tutorial names, keyed by its name, ending with eps_hat."""
        check_image(x)
        check_timesteps(t, x.shape[0])
        x_f, d1, d2, d3, latent = self.encoder(x)
        temb = self.time_embedding_layer(t)
        u1, u2, u3, u4, eps_hat = self.decoder(latent + temb, d3, d2, d1, x_f)
        return dict(
            x_f=x_f, d1=d1, d2=d2, d3=d3, latent=latent, temb=temb,
            u1=u1, u2=u2, u3=u3, u4=u4, eps_hat=eps_hat,
        )


def init_variables(rng, *, batch: int = 1, **model_kwargs):
    """Fresh ``{'params': ...}`` for ``Unet(**model_kwargs)``.

    One compiled program, the same numbers as eager initialisation, which would compile each of
    the initialisers' small ops as a program of its own. It runs once, so on a CPU it is compiled
    for a short compile rather than a fast run, at XLA's optimisation level 1; its numbers are the
    default level's (no fast-math at either), and tests/test_model.py holds them to Flax's eager
    ones bit for bit. Traced (``jax.eval_shape`` of it, inside a jit), it is an ordinary nested jit.
    """
    model = Unet(**model_kwargs)
    if isinstance(rng, jax.core.Tracer):
        return _init(rng, batch, model)
    return _compiled_init(batch, model, jax.ShapeDtypeStruct(rng.shape, rng.dtype))(rng)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init(rng, batch: int, model: "Unet"):
    x = jnp.zeros((batch, *IMAGE_SHAPE), jnp.float32)
    t = jnp.zeros((batch,), jnp.float32)
    return model.init(rng, x, t)


@functools.cache
def _compiled_init(batch: int, model: "Unet", key: jax.ShapeDtypeStruct):
    options = {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else {}
    return _init.lower(key, batch, model).compile(options)


def _traced_convs() -> list[tuple[str, str, bool]]:
    """(shape key, module path, whether it reads the model's input image) of each 3x3 convolution."""
    convs, image = [], []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, Unet) and context.method_name == "__call__":
            image.append(args[0])
        if isinstance(module, Conv3x3) and context.method_name == "__call__":
            _, h, w, in_ch = args[0].shape
            convs.append((conv_shape(h, w, in_ch, module.features), "/".join(module.path), args[0] is image[0]))
        return next_fun(*args, **kwargs)

    x = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(Unet().init, jax.random.key(0), x, jnp.zeros((1,), jnp.float32))
    return convs


def conv_layers() -> dict[str, list[str]]:
    """The Unet's 3x3 convolutions: shape key ('28x28 64->64') -> the module paths that have it."""
    layers: dict[str, list[str]] = {}
    for key, path, _ in _traced_convs():
        layers.setdefault(key, []).append(path)
    return layers


def image_conv_shapes() -> set[str]:
    """The shape keys whose every layer reads the model's input image: training takes no
    gradient with respect to those layers' input, so neither does timing them for it."""
    convs = _traced_convs()
    return {key for key, _, _ in convs} - {key for key, _, reads_image in convs if not reads_image}
