"""python -m parity: the torch reference and the Flax port, tensor by tensor.

Builds the torch Unet (random init from --seed, GroupNorm affine perturbed away from 1/0,
or --weights PATH), ports it, runs both on the same batch and prints one row per
intermediate and per parameter gradient. Exits 1 if any row fails its tolerance.
"""

import argparse
import sys

import jax

from ddpm_recipe.settings import positive, seed
from ddpm_recipe.weights import (
    CheckpointMismatchError,
    TorchNotInstalledError,
    WeightsFileError,
    flag_error,
    import_torch,
)
from unet_jax.layers import CONV_LOWERINGS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--batch", type=positive(int), default=8)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--weights", help="a torch state_dict (.pt/.pth/.safetensors) to compare instead of a random init")
    parser.add_argument("--reference-layers", action="store_true", help="use plain Flax/lax pools and transposed convs")
    parser.add_argument("--conv", choices=sorted(CONV_LOWERINGS), default="xla",
                        help="the Flax side's 3x3 conv lowering (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        import_torch("python -m parity (it runs the torch reference)")
    except TorchNotInstalledError as error:
        raise SystemExit(f"error: {error}") from None
    from parity.compare import build_torch_model, compare, format_table

    with jax.enable_x64(args.dtype == "float64"):
        try:
            model = build_torch_model(args.seed, args.dtype, args.weights)
        except (WeightsFileError, CheckpointMismatchError) as error:
            raise SystemExit(f"error: {flag_error('--weights', args.weights, error)}") from None
        rows = compare(model, seed=args.seed, batch=args.batch, dtype=args.dtype, fast=not args.reference_layers,
                       conv=args.conv)
    print(f"parity: torch reference vs Flax port, {args.dtype}, batch {args.batch}, seed {args.seed}, "
          f"3x3 conv lowering {args.conv}")
    print(format_table(rows))
    passed, failed, skipped = (sum(1 for r in rows if r.passed), [r for r in rows if r.failed],
                               [r for r in rows if r.skipped])
    print(f"\n{passed} passed, {len(failed)} failed, {len(skipped)} skipped")
    if skipped:
        print(f"skipped: {skipped[0].skipped}; float64 compares these gradients exactly (see parity/compare.py)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
