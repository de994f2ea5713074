"""Write a workdir's weights as a torch state_dict: ``python -m unet_jax.export --workdir W --out model.pt``.

The file loads into the tutorial's ``Unet`` with ``strict=True``. ``.safetensors`` output
is chosen by the extension. The EMA weights are exported unless ``--raw`` is given.
``--init-seed S`` writes instead the initial weights that ``python -m unet_jax.train --seed S``
starts from, so that ``python -m unet_torch.train --init-from`` can start from the same ones.
"""

import argparse
import io

from ddpm_recipe.run_folder import check_writable, write_atomically
from ddpm_recipe.settings import seed
from ddpm_recipe.weights import TorchNotInstalledError, import_torch
from unet_jax import checkpoints


class OutputError(RuntimeError):
    """The weights file cannot be written where it was asked for."""


def export(workdir: str, out: str, *, raw: bool = False) -> int:
    """Export the latest checkpoint of ``workdir`` to ``out``; returns its step."""
    _, restored = checkpoints.restore_latest_params(workdir)
    save_torch(restored["params" if raw else "ema_params"], out)
    return restored["step"]


def export_initial(seed: int, out: str) -> None:
    """Export the weights a JAX training run with ``--seed seed`` starts from."""
    from unet_jax.model import init_variables
    from unet_jax.step import run_keys

    save_torch(init_variables(run_keys(seed)[0])["params"], out)


def save_torch(params, out: str) -> None:
    """Flax params -> a torch state_dict file (.pt/.pth, or .safetensors by the extension); makes its folder.

    A .safetensors file needs no torch: it holds the tensors under torch's names and layouts. The
    file is made in memory and written atomically, by Python's own file handling: a failed write
    leaves no partial file and ends in an OutputError, and the file's mode follows the umask.
    """
    from parity import flax_to_numpy, flax_to_torch  # the torch boundary lives in parity

    if out.endswith(".safetensors"):
        import jax.numpy as jnp
        from safetensors.flax import save  # the flax writer keeps bfloat16, which NumPy's drops

        data = save({k: jnp.asarray(a) for k, a in flax_to_numpy({"params": params}).items()})
    else:
        torch = import_torch(f"writing {out} (a torch .pt file; a .safetensors one does not)")
        buffer = io.BytesIO()
        torch.save(flax_to_torch({"params": params}), buffer)
        data = buffer.getvalue()
    try:
        check_writable(out)
        write_atomically(out, data)
    except OSError as error:
        raise OutputError(f"cannot write {out}: {error.strerror or error}") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unet_jax.export", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="the run to export (default runs/default)")
    parser.add_argument("--out", required=True, help="model.pt, model.pth or model.safetensors")
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    parser.add_argument("--init-seed", type=seed, default=None,
                        help="export the initial weights of a training run with this --seed (no workdir needed)")
    args = parser.parse_args(argv)
    if not args.out.endswith((".pt", ".pth", ".safetensors")):
        parser.error(f"--out must end in .pt, .pth or .safetensors, got {args.out!r}")
    if args.init_seed is not None and (args.raw or args.workdir is not None):
        parser.error("--init-seed exports a run's initial weights, made from the seed alone: drop --workdir and --raw")
    if args.workdir is None:
        args.workdir = "runs/default"
    try:
        if args.init_seed is not None:
            export_initial(args.init_seed, args.out)
            print(f"wrote the initial weights of a training run with --seed {args.init_seed} to {args.out}")
            return
        step = export(args.workdir, args.out, raw=args.raw)
    except (*checkpoints.UNREADABLE_RUN, TorchNotInstalledError, OutputError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote the {'raw' if args.raw else 'EMA'} weights of {args.workdir} at step {step} to {args.out}")


if __name__ == "__main__":
    main()
