"""Exact, XLA-friendly versions of the three layers whose plain forms are slow on XLA:CPU.

Every layer here has a ``fast`` switch. ``fast=False`` is the straightforward Flax/lax form
(``lax.conv_transpose``, ``nn.max_pool``, ``nn.avg_pool``); ``fast=True`` is a reformulation
that computes the same numbers. Both read the same parameters, so one set of weights serves
either, and ``tests/test_layers.py`` holds them to each other.

Why: on XLA:CPU the gradient of a transposed convolution takes a naive path (hundreds of ms
per layer here), and max-pool's backward (``select_and_scatter``) is about 9x slower than a
reshape and a max. In this network every pool has stride == window and every transposed
convolution has stride == kernel, so windows never overlap and both become reshapes.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

Dtype = Any


def _crop_to_windows(x_BxHxWxC, window: int):
    """Crop H and W down to a multiple of the window (torch pools floor: 7 -> 3)."""
    _, height, width, _ = x_BxHxWxC.shape
    return x_BxHxWxC[:, : height // window * window, : width // window * window, :]


def _windows(x_BxHxWxC, window: int):
    x = _crop_to_windows(x_BxHxWxC, window)
    b, h, w, c = x.shape
    return x.reshape(b, h // window, window, w // window, window, c)


def max_pool(x_BxHxWxC, window: int, *, fast: bool = True):
    """torch.nn.MaxPool2d(window): stride = window, no padding, floor."""
    if fast:
        return _windows(x_BxHxWxC, window).max(axis=(2, 4))
    return nn.max_pool(x_BxHxWxC, (window, window), strides=(window, window), padding="VALID")


def avg_pool(x_BxHxWxC, window: int, *, fast: bool = True):
    """torch.nn.AvgPool2d(window): stride = window, no padding, floor."""
    if fast:
        return _windows(x_BxHxWxC, window).mean(axis=(2, 4))
    return nn.avg_pool(x_BxHxWxC, (window, window), strides=(window, window), padding="VALID")


class ConvTranspose(nn.Module):
    """torch.nn.ConvTranspose2d(in, out, k, stride=k, output_padding=p) in NHWC.

    The kernel is stored as ``nn.ConvTranspose(..., transpose_kernel=True)`` stores it,
    ``(k, k, out, in)``, which is torch's ``(in, out, k, k)`` weight transposed (2, 3, 1, 0).
    Since stride == kernel the taps never overlap: each input pixel writes its own k x k
    output patch, so the layer is one matmul and a depth-to-space. ``output_padding`` adds
    a last row and column that no tap reaches; they hold only the bias, as in torch.
    """

    features: int
    kernel_size: int
    output_padding: int = 0
    fast: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x_BxHxWxI):
        k, pad = self.kernel_size, self.output_padding
        in_features = x_BxHxWxI.shape[-1]
        kernel_KxKxOxI = self.param("kernel", self.kernel_init, (k, k, self.features, in_features), self.param_dtype)
        bias_O = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x_BxHxWxI, kernel_KxKxOxI, bias_O = nn.dtypes.promote_dtype(x_BxHxWxI, kernel_KxKxOxI, bias_O, dtype=self.dtype)

        if self.fast:
            b, h, w, _ = x_BxHxWxI.shape
            patches = jnp.einsum("bhwi,acoi->bhawco", x_BxHxWxI, kernel_KxKxOxI)
            y = patches.reshape(b, h * k, w * k, self.features)
            y = jnp.pad(y, ((0, 0), (0, pad), (0, pad), (0, 0)))
        else:
            # lax.conv_transpose pads the stride-dilated input; torch's size (H-1)*s + k + p
            # needs k-1 on each side plus p more at the end.
            padding = ((k - 1, k - 1 + pad), (k - 1, k - 1 + pad))
            y = lax.conv_transpose(x_BxHxWxI, kernel_KxKxOxI, (k, k), padding, transpose_kernel=True)
        return y + bias_O
