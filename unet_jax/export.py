"""Write a workdir's weights as a torch state_dict: ``python -m unet_jax.export --workdir W --out model.pt``.

The file loads into the tutorial's ``Unet`` with ``strict=True``. ``.safetensors`` output
is chosen by the extension. The EMA weights are exported unless ``--raw`` is given.
"""

import argparse

from unet_jax import checkpoints


def export(workdir: str, out: str, *, raw: bool = False) -> int:
    """Export the latest checkpoint of ``workdir`` to ``out``; returns its step."""
    import torch

    from parity import flax_to_torch  # the torch boundary lives in parity

    _, restored = checkpoints.restore_latest_params(workdir)
    state_dict = flax_to_torch({"params": restored["params" if raw else "ema_params"]})
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(dict(state_dict), out)
    else:
        torch.save(state_dict, out)
    return restored["step"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unet_jax.export", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/default")
    parser.add_argument("--out", required=True, help="model.pt, model.pth or model.safetensors")
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    args = parser.parse_args(argv)
    if not args.out.endswith((".pt", ".pth", ".safetensors")):
        parser.error(f"--out must end in .pt, .pth or .safetensors, got {args.out!r}")
    try:
        step = export(args.workdir, args.out, raw=args.raw)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote the {'raw' if args.raw else 'EMA'} weights of {args.workdir} at step {step} to {args.out}")


if __name__ == "__main__":
    main()
