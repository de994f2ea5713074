"""Exact, XLA-friendly versions of the layers whose plain forms are slow on XLA:CPU.

The pools and the transposed convolution have a ``fast`` switch. ``fast=False`` is the straightforward Flax/lax form
(``lax.conv_transpose``, ``nn.max_pool``, ``nn.avg_pool``); ``fast=True`` is a reformulation
that computes the same numbers. ``GroupNorm`` is ``nn.GroupNorm`` with its gradient written
out, which the model uses where ``fast``. Both read the same parameters, so one set of weights serves
either, and ``tests/test_layers.py`` holds them to each other.

Why: on XLA:CPU the gradient of a transposed convolution takes a naive path, and max-pool's
backward (``select_and_scatter``) is several times slower than a reshape and a max
(``benchmarks/README.md``, Fast, exact layers). In this network every pool has stride == window and every transposed
convolution has stride == kernel, so windows never overlap and both become reshapes.

The 3x3 convolution (``Conv3x3``) has several exact lowerings instead, since none is fastest
everywhere: XLA:CPU's own convolution wins where its gradient convolutions take a fast path,
and loses several-fold where they do not (``benchmarks/README.md`` has every machine measured).
``unet_jax.autotune`` picks one per layer shape by timing them on the machine.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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


def _first_max(windows_BxHxKxWxKxC):
    """(max, index of its first occurrence in row-major window order) of every window.

    One comparison chain yields both, so the index always points at the value returned: an
    equality test against the max afterwards could miss, since XLA may recompute the
    windows' producers in another fusion, rounded differently.
    """
    k = windows_BxHxKxWxKxC.shape[2]
    best, index = windows_BxHxKxWxKxC[:, :, 0, :, 0, :], jnp.zeros((), jnp.int32)
    for position in range(1, k * k):
        value = windows_BxHxKxWxKxC[:, :, position // k, :, position % k, :]
        better = value > best  # strictly: the first of equal maxima wins, as in torch
        best, index = jnp.where(better, value, best), jnp.where(better, position, index)
    return best, index


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _window_max(k: int, windows_BxHxKxWxKxC):
    return _first_max(windows_BxHxKxWxKxC)[0]


def _window_max_forward(k, windows):
    return _first_max(windows)


def _window_max_backward(k, index, dy_BxHxWxC):
    """Each window's gradient goes to its first maximum, as torch's does: elementwise, where
    autodiff of a max splits ties and counts them with reductions, slow on XLA:CPU."""
    rows = [jnp.stack([jnp.where(index == i * k + j, dy_BxHxWxC, 0) for j in range(k)], axis=3) for i in range(k)]
    return (jnp.stack(rows, axis=2),)


_window_max.defvjp(_window_max_forward, _window_max_backward)


def max_pool(x_BxHxWxC, window: int, *, fast: bool = True):
    """torch.nn.MaxPool2d(window): stride = window, no padding, floor."""
    if fast:
        return _window_max(window, _windows(x_BxHxWxC, window))
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
            # One plain (pixels, in) @ (in, k*k*out) matmul, then the depth-to-space as its own
            # transpose: an einsum straight into the interleaved layout leaves XLA:CPU operands
            # the matrix library does not take, and the copies it adds to the gradients cost
            # more than the matmuls.
            b, h, w, _ = x_BxHxWxI.shape
            kernel_IxKKO = kernel_KxKxOxI.transpose(3, 0, 1, 2).reshape(in_features, k * k * self.features)
            patches = (x_BxHxWxI.reshape(b * h * w, in_features) @ kernel_IxKKO).reshape(b, h, w, k, k, self.features)
            y = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * k, w * k, self.features)
            y = jnp.pad(y, ((0, 0), (0, pad), (0, pad), (0, 0)))
        else:
            # lax.conv_transpose pads the stride-dilated input; torch's size (H-1)*s + k + p
            # needs k-1 on each side plus p more at the end.
            padding = ((k - 1, k - 1 + pad), (k - 1, k - 1 + pad))
            y = lax.conv_transpose(x_BxHxWxI, kernel_KxKxOxI, (k, k), padding, transpose_kernel=True)
        return y + bias_O


# ------------------------------------------------------------------ group normalisation


def _over_groups(v_BxC, groups: int):
    """Per-channel sums (B, C) -> the sum over each channel's group, on every channel: (B, 1, 1, C)."""
    b, c = v_BxC.shape
    sums = v_BxC.reshape(b, groups, 1, c // groups).sum(-1, keepdims=True)
    return jnp.broadcast_to(sums, (b, groups, 1, c // groups)).reshape(b, 1, 1, c)


def _group_statistics(x_BxHxWxC, groups: int, epsilon: float):
    """Each image's channel groups' mean and 1 / sqrt(variance + epsilon), on every channel; the
    variance in two passes, as torch and ``nn.GroupNorm(use_fast_variance=False)`` take it."""
    _, h, w, c = x_BxHxWxC.shape
    count = h * w * (c // groups)
    mean = _over_groups(x_BxHxWxC.sum(axis=(1, 2)), groups) / count
    variance = _over_groups(jnp.square(x_BxHxWxC - mean).sum(axis=(1, 2)), groups) / count
    return mean, lax.rsqrt(variance + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm(x_BxHxWxC, scale_C, bias_C, groups: int, epsilon: float):
    return _group_norm_forward(x_BxHxWxC, scale_C, bias_C, groups, epsilon)[0]


def _group_norm_forward(x, scale, bias, groups, epsilon):
    mean, inv_std = _group_statistics(x, groups, epsilon)
    return (x - mean) * (inv_std * scale) + bias, (x, scale, mean, inv_std)


def _group_norm_backward(groups, epsilon, residuals, dy_BxHxWxC):
    """The gradient written out: per image and channel, two sums over the pixels (of dy and of
    dy * x_hat) give the bias and scale gradients and, summed over each group, the two means
    that dx needs; then dx in one elementwise pass. Autodiff of the two-pass statistics reads
    the activation several times more."""
    x, scale, mean, inv_std = residuals
    _, h, w, c = x.shape
    count = h * w * (c // groups)
    x_hat = (x - mean) * inv_std
    dbias_BxC, dscale_BxC = dy_BxHxWxC.sum(axis=(1, 2)), (dy_BxHxWxC * x_hat).sum(axis=(1, 2))
    mean_dx_hat = _over_groups(dbias_BxC * scale, groups) / count
    mean_dx_hat_x_hat = _over_groups(dscale_BxC * scale, groups) / count
    dx = inv_std * (dy_BxHxWxC * scale - mean_dx_hat - x_hat * mean_dx_hat_x_hat)
    return dx, dscale_BxC.sum(0), dbias_BxC.sum(0)


_group_norm.defvjp(_group_norm_forward, _group_norm_backward)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm(num_groups, C, eps) in NHWC: ``nn.GroupNorm(num_groups, epsilon,
    use_fast_variance=False)``'s parameters (``scale``, ``bias``) and numbers, its gradient
    written out (``_group_norm_backward``). Statistics in float32 at least, as Flax's."""

    num_groups: int
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC):
        channels = x_BxHxWxC.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"expected channels divisible by num_groups {self.num_groups}, got {channels}")
        scale_C = self.param("scale", nn.initializers.ones_init(), (channels,), self.param_dtype)
        bias_C = self.param("bias", nn.initializers.zeros_init(), (channels,), self.param_dtype)
        x_BxHxWxC, scale_C, bias_C = nn.dtypes.promote_dtype(x_BxHxWxC, scale_C, bias_C, dtype=self.dtype)
        compute = jnp.promote_types(x_BxHxWxC.dtype, jnp.float32)
        y = _group_norm(x_BxHxWxC.astype(compute), scale_C.astype(compute), bias_C.astype(compute),
                        self.num_groups, self.epsilon)
        return y.astype(x_BxHxWxC.dtype)


# ------------------------------------------------------------------ 3x3 convolution, padding 1

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_same_xla(x_BxHxWxI, kernel_KxKxIxO):
    """XLA's own convolution, stride 1, of an odd K x K kernel zero-padded to keep H and W ("same"
    padding: 1 for 3x3); autodiff adds two gradient convolutions."""
    pad = kernel_KxKxIxO.shape[0] // 2
    return lax.conv_general_dilated(x_BxHxWxI, kernel_KxKxIxO, (1, 1), ((pad, pad), (pad, pad)),
                                    dimension_numbers=_NHWC)


def _taps(x_BxHxWxI):
    """The nine shifted (B, H, W, I) views of the zero-padded input, in kernel order (row, column)."""
    _, h, w, _ = x_BxHxWxI.shape
    padded = jnp.pad(x_BxHxWxI, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [padded[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)]


def _input_gradient_kernel(kernel_KxKxIxO):
    """The input gradient of a same-padded convolution (odd K) is the same convolution of dy with
    the kernel flipped in space and in/out swapped, so any forward lowering can run it."""
    return jnp.flip(kernel_KxKxIxO, (0, 1)).swapaxes(2, 3)


def _tap_products(a_BxHxWxA, b_BxHxWxC, size: int):
    """sum over b, h, w of taps(a) (x) b, as (K, K, A, C) for K = ``size``: a loop over pairs of
    images, one matmul each.

    A pair's K*K taps (nine for 3x3) are stacked channel-major, (K*K*A, pixels), so that the
    matmul with the pair's b, (pixels, C), contracts canonical operands: the matrix libraries
    take no other layout, and XLA would otherwise transpose the taps, K*K times the input, for
    each pair. Looping keeps a pair's taps in cache; the whole batch's taps at once would be
    K*K fresh activation-sized buffers, and on XLA:CPU writing those costs more than the matmuls.
    """
    b, h, w, a_ch = a_BxHxWxA.shape
    c_ch = b_BxHxWxC.shape[-1]
    group, pad = (2 if b % 2 == 0 else 1), size // 2
    padded = jnp.pad(a_BxHxWxA, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    # (pairs, A, 2, H+2*pad, W+2*pad): one transpose of the input, not of its taps
    a_GxAxNxHxW = padded.reshape(b // group, group, h + 2 * pad, w + 2 * pad, a_ch).transpose(0, 4, 1, 2, 3)
    b_GxNxC = b_BxHxWxC.reshape(b // group, group * h * w, c_ch)

    # The running sum in float32 at least: a bfloat16 total, rounded once per pair, would lose more
    # the larger the batch, where XLA's own convolution rounds once.
    total_dtype = jnp.promote_types(b_BxHxWxC.dtype, jnp.float32)

    def group_products(i):
        a = lax.dynamic_index_in_dim(a_GxAxNxHxW, i, keepdims=False)
        taps = jnp.concatenate([a[:, :, r:r + h, c:c + w] for r in range(size) for c in range(size)], axis=0)
        return jnp.dot(taps.reshape(size * size * a_ch, -1), lax.dynamic_index_in_dim(b_GxNxC, i, keepdims=False),
                       preferred_element_type=total_dtype)

    total = lax.fori_loop(0, b // group, lambda i, total: total + group_products(i),
                          jnp.zeros((size * size * a_ch, c_ch), total_dtype))
    return total.astype(b_BxHxWxC.dtype).reshape(size, size, a_ch, c_ch)


def _weight_gradient(x_BxHxWxI, dy_BxHxWxO, size: int):
    """dkernel[r, c] = sum over b, h, w of x_padded[h + r, w + c] (x) dy[h, w], as tap matmuls
    (a same-padded K x K kernel, K = ``size``, padding P = K // 2).

    The taps of either operand will do: substituting p = h + r - P, the same sum is
    x[p, q] (x) dy_padded[p + K-1 - r, q + K-1 - c], tap (K-1 - r, K-1 - c) of dy. The smaller
    side is the one copied K*K times: a layer with one output channel (128 -> 1) stacks dy's
    nine one-channel taps instead of x's nine 128-channel ones.
    """
    if dy_BxHxWxO.shape[-1] < x_BxHxWxI.shape[-1]:
        return jnp.flip(_tap_products(dy_BxHxWxO, x_BxHxWxI, size), (0, 1)).swapaxes(2, 3)
    return _tap_products(x_BxHxWxI, dy_BxHxWxO, size)


def _with_tap_weight_gradient(forward):
    """A same-padded conv lowering whose forward and input gradient run ``forward`` (the input
    gradient as the same convolution of dy with the flipped, in/out-swapped kernel) and whose
    weight gradient is ``_weight_gradient``'s tap matmuls.

    JAX's weight-gradient convolution swaps batch and feature dimensions, which XLA:CPU runs as
    a convolution with an HxW "kernel", far slower than the forward on some CPUs. Per tap the
    weight gradient is just (shifted x)^T @ dy, contracted over B*H*W.
    """

    @jax.custom_vjp
    def conv(x_BxHxWxI, kernel_KxKxIxO):
        return forward(x_BxHxWxI, kernel_KxKxIxO)

    def conv_forward(x, kernel):
        return forward(x, kernel), (x, kernel)

    def conv_backward(residuals, dy_BxHxWxO):
        x, kernel = residuals
        return (forward(dy_BxHxWxO, _input_gradient_kernel(kernel)),
                _weight_gradient(x, dy_BxHxWxO, kernel.shape[0]))

    conv.defvjp(conv_forward, conv_backward)
    return conv


# XLA's convolution forward and for the input gradient; the weight gradient as tap matmuls. Any
# odd kernel size (the evaluation's LeNet uses it for its 5x5 convolutions).
conv_same_tapgrad = _with_tap_weight_gradient(conv_same_xla)


def conv3x3_im2col(x_BxHxWxI, kernel_3x3xIxO):
    """The nine taps side by side on channels, then one (B*H*W, 9I) @ (9I, O) matmul; where the
    output has fewer channels than the input, ``_col2im``'s products of the narrower side instead."""
    b, h, w, in_ch = x_BxHxWxI.shape
    if kernel_3x3xIxO.shape[-1] < in_ch:
        return _col2im(x_BxHxWxI, kernel_3x3xIxO)
    columns = jnp.concatenate(_taps(x_BxHxWxI), axis=-1).reshape(-1, 9 * in_ch)
    return jnp.dot(columns, kernel_3x3xIxO.reshape(9 * in_ch, -1)).reshape(b, h, w, -1)


def _col2im(x_BxHxWxI, kernel_3x3xIxO):
    """One (B*H*W, I) @ (I, 9O) matmul, then its nine (B, H, W, O) slices summed at their shifts.

    Each pixel's products with the nine taps of the kernel are its contributions to the nine
    outputs around it: y[p] = sum over (r, c) of x[p + (r - 1, c - 1)] @ kernel[r, c], which is
    product (r, c) of the pixel at p + (r - 1, c - 1). Copying nine times the O-channel products
    rather than the I-channel input is what makes a 128 -> 1 layer cheap.
    """
    b, h, w, in_ch = x_BxHxWxI.shape
    out_ch = kernel_3x3xIxO.shape[-1]
    kernel_Ix9O = kernel_3x3xIxO.transpose(2, 0, 1, 3).reshape(in_ch, 9 * out_ch)
    products = jnp.dot(x_BxHxWxI.reshape(-1, in_ch), kernel_Ix9O).reshape(b, h, w, 9, out_ch)
    padded = jnp.pad(products, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))
    return sum(padded[:, r:r + h, c:c + w, 3 * r + c] for r in range(3) for c in range(3))


# Winograd F(2x2, 3x3) (Lavin & Gray, 2016): Y = A^T [(G g G^T) * (B^T d B)] A per 4x4 input tile.
_WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
_WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])


def _combine(matrix, arrays):
    """[sum_j matrix[i, j] * arrays[j] for each row i], as adds and subtracts (the entries are 0 and +-1)."""
    out = []
    for row in matrix:
        terms = [(coefficient, a) for coefficient, a in zip(row, arrays) if coefficient]
        total = terms[0][1] if terms[0][0] == 1 else -terms[0][1]
        for coefficient, a in terms[1:]:
            total = total + a if coefficient == 1 else total - a
        out.append(total)
    return out


def conv3x3_winograd(x_BxHxWxI, kernel_3x3xIxO):
    """Winograd F(2x2, 3x3): 16 multiplies per 2x2 outputs where the direct form takes 36.

    The input is cut into 4x4 tiles at stride 2 (strided slices, no gather), transformed by
    adds, multiplied as 16 batched (tiles, I) @ (I, O) matmuls, and transformed back. Odd
    sizes pad the last tile and crop it. Exact in exact arithmetic; in floating point the
    transforms add a little rounding (measured through the whole network by ``python -m parity``).
    """
    b, h, w, in_ch = x_BxHxWxI.shape
    out_ch = kernel_3x3xIxO.shape[-1]
    th, tw = -(-h // 2), -(-w // 2)  # output tiles
    padded = jnp.pad(x_BxHxWxI, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
    # d[r][c]: element (r, c) of every input tile, (B, th, tw, I)
    d = [[padded[:, r:r + 2 * th:2, c:c + 2 * tw:2, :] for c in range(4)] for r in range(4)]
    rows = [_combine(_WINOGRAD_BT, [d[r][c] for r in range(4)]) for c in range(4)]  # rows[c][xi] = (B^T d)[xi, c]
    v = [_combine(_WINOGRAD_BT, [rows[c][xi] for c in range(4)]) for xi in range(4)]  # v[xi][nu] = (B^T d B)[xi, nu]
    # Stacked as four stacks of four: XLA:CPU leaves a stack of sixteen computed arrays as sixteen
    # buffers and a copy, but fuses a stack of four stacks into one loop that writes V once.
    v_16xNxI = jnp.stack([jnp.stack(v[xi]) for xi in range(4)]).reshape(16, b * th * tw, in_ch)
    g = jnp.asarray(_WINOGRAD_G, kernel_3x3xIxO.dtype)
    u_16xIxO = jnp.einsum("ai,ijco,bj->abco", g, kernel_3x3xIxO, g).reshape(16, in_ch, out_ch)
    m = lax.dot_general(v_16xNxI, u_16xIxO, (((2,), (1,)), ((0,), (0,)))).reshape(4, 4, b, th, tw, out_ch)
    cols = [_combine(_WINOGRAD_AT, [m[xi, nu] for xi in range(4)]) for nu in range(4)]  # cols[nu][p]
    y = [_combine(_WINOGRAD_AT, [cols[nu][p] for nu in range(4)]) for p in range(2)]  # y[p][q]: (B, th, tw, O)
    tiles = jnp.stack([jnp.stack(y[p], axis=3) for p in range(2)], axis=2)  # (B, th, 2, tw, 2, O)
    return tiles.reshape(b, 2 * th, 2 * tw, out_ch)[:, :h, :w, :]


# Winograd forward and for the input gradient; the weight gradient as tapgrad's matmuls. Autodiff
# of ``conv3x3_winograd`` runs the transposes of its strided tile slices, which cost more than
# the multiplies they save.
conv3x3_winograd_tapgrad = _with_tap_weight_gradient(conv3x3_winograd)


CONV_LOWERINGS = {
    "xla": conv_same_xla,
    "tapgrad": conv_same_tapgrad,
    "im2col": conv3x3_im2col,
    "winograd": conv3x3_winograd,
    "winograd_tapgrad": conv3x3_winograd_tapgrad,
}


def conv_shape(height: int, width: int, in_ch: int, out_ch: int) -> str:
    """The key a ConvPlan holds a layer's lowering under: '28x28 64->64'."""
    return f"{height}x{width} {in_ch}->{out_ch}"


@dataclasses.dataclass(frozen=True)
class ConvPlan:
    """The lowering of each 3x3 convolution, by layer shape; shapes not listed use ``default``."""

    default: str = "xla"
    by_shape: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for name in (self.default, *(lowering for _, lowering in self.by_shape)):
            if name not in CONV_LOWERINGS:
                raise ValueError(f"expected a 3x3 conv lowering in {sorted(CONV_LOWERINGS)}, got {name!r}")

    def lowering(self, shape: str) -> str:
        return dict(self.by_shape).get(shape, self.default)

    def to_json(self) -> dict:
        return {"default": self.default, "by_shape": dict(self.by_shape)}

    @classmethod
    def from_json(cls, obj: dict) -> "ConvPlan":
        return cls(obj["default"], tuple(sorted(obj["by_shape"].items())))

    def describe(self) -> str:
        if not self.by_shape:
            return self.default
        return ", ".join(f"{shape}: {lowering}" for shape, lowering in self.by_shape)


def as_plan(conv: "str | ConvPlan") -> ConvPlan:
    return conv if isinstance(conv, ConvPlan) else ConvPlan(conv)


class Conv3x3(nn.Module):
    """torch.nn.Conv2d(in, features, 3, padding=1) in NHWC, lowered as ``conv`` says for its shape.

    The parameters are nn.Conv's: ``kernel`` (3, 3, in, features) and ``bias``, with its
    initialisers, so every lowering reads the same weights and porting does not change.
    """

    features: int
    conv: str | ConvPlan = "xla"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x_BxHxWxI):
        _, h, w, in_ch = x_BxHxWxI.shape
        kernel = self.param("kernel", self.kernel_init, (3, 3, in_ch, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x_BxHxWxI, kernel, bias = nn.dtypes.promote_dtype(x_BxHxWxI, kernel, bias, dtype=self.dtype)
        lowering = as_plan(self.conv).lowering(conv_shape(h, w, in_ch, self.features))
        return CONV_LOWERINGS[lowering](x_BxHxWxI, kernel) + bias
