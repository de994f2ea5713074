"""python -m benchmarks.conv: one 3x3 convolution layer, XLA against torch's oneDNN, per core.

The network's largest layer (batch 64, 28x28, 64 -> 64 channels, float32 or bfloat16, NHWC
for XLA and NCHW for torch), forward alone and forward with both gradients: XLA on one host device,
each 3x3 conv lowering of ``unet_jax.layers`` (``--conv``), torch on one thread and on
every core. Medians of repeats, warm-up excluded. This is the
measurement behind benchmarks/README.md's account of what bounds the train step on a CPU.
"""

import argparse

import jax
import jax.numpy as jnp

from ddpm_recipe.weights import TorchNotInstalledError, import_torch

try:
    torch = import_torch("python -m benchmarks.conv (it times torch beside XLA)")
except TorchNotInstalledError as error:
    raise SystemExit(f"error: {error}") from None

from benchmarks.timing import time_repeats  # noqa: E402
from ddpm_recipe.settings import positive  # noqa: E402
from unet_jax import devices  # noqa: E402
from unet_jax.layers import CONV_LOWERINGS  # noqa: E402


def xla_case(batch: int, size: int, channels: int, repeats: int, dtype: str, lowering: str = "xla") -> dict:
    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels), dtype)
    w = (0.05 * jax.random.normal(jax.random.key(1), (3, 3, channels, channels))).astype(dtype)
    conv = CONV_LOWERINGS[lowering]

    forward = jax.jit(conv)
    gradients = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w).astype(jnp.float32) ** 2), argnums=(0, 1)))
    out = {}
    for name, fn in (("forward", forward), ("forward + gradients", gradients)):
        holder = [None]
        timing = time_repeats(lambda: holder.__setitem__(0, fn(x, w)), lambda: jax.block_until_ready(holder[0]),
                              warmup=2, repeats=repeats)
        out[name] = timing["median_s"]
    return out


def torch_case(batch: int, size: int, channels: int, repeats: int, dtype: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, dtype=getattr(torch, dtype), requires_grad=True)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(getattr(torch, dtype))

    def forward():
        with torch.no_grad():
            conv(x)

    def gradients():
        x.grad, conv.weight.grad, conv.bias.grad = None, None, None
        (conv(x).float() ** 2).sum().backward()

    out = {}
    for name, fn in (("forward", forward), ("forward + gradients", gradients)):
        out[name] = time_repeats(fn, lambda: None, warmup=2, repeats=repeats)["median_s"]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conv", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive(int), default=64)
    parser.add_argument("--size", type=positive(int), default=28)
    parser.add_argument("--channels", type=positive(int), default=64)
    parser.add_argument("--repeats", type=positive(int), default=10)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--conv", nargs="+", choices=sorted(CONV_LOWERINGS), default=sorted(CONV_LOWERINGS),
                        help="the 3x3 conv lowerings to time on XLA (default: all)")
    args = parser.parse_args(argv)
    shape = (args.batch, args.size, args.channels, args.repeats, args.dtype)
    cores = devices.usable_cores()
    rows = [(f"XLA, 1 {jax.default_backend()} device" + ("" if name == "xla" else f", --conv {name}"),
             xla_case(*shape, lowering=name)) for name in args.conv]
    rows.append(("torch (oneDNN), 1 thread", torch_case(*shape, threads=1)))
    if cores > 1:
        rows.append((f"torch (oneDNN), {cores} threads", torch_case(*shape, threads=cores)))
    flops = 2 * args.batch * args.size**2 * args.channels**2 * 9  # one 3x3 convolution
    print(f"3x3 conv, batch {args.batch}, {args.size}x{args.size}, {args.channels} -> {args.channels} channels, {args.dtype}; "
          f"JAX {jax.__version__}, torch {torch.__version__}\n")
    print("| implementation | forward ms | GFLOP/s | forward + gradients ms | GFLOP/s |")
    print("|---|---|---|---|---|")
    for name, t in rows:
        fwd, both = t["forward"], t["forward + gradients"]
        print(f"| {name} | {1e3 * fwd:.1f} | {flops / fwd / 1e9:.0f} | {1e3 * both:.1f} | {3 * flops / both / 1e9:.0f} |")


if __name__ == "__main__":
    main()
