"""Draw digits from a trained workdir: ``python -m unet_jax.sample --workdir W``.

``generate`` is the whole sampler as one compiled program; ``save_grid`` writes a PNG.
"""

import argparse
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_recipe.run_folder import check_writable, save_grid
from ddpm_recipe.schedule import (
    DEFAULT_CLIP_X0,
    DEFAULT_ETA,
    DEFAULT_SAMPLE_STEPS,
    DEFAULT_SAMPLER,
    N_T,
    linear_schedule,
)
from ddpm_recipe.settings import SAMPLERS, ddim_eta, positive, seed
from unet_jax import autotune, checkpoints, devices
from unet_jax.diffusion import ddim_sample, ddpm_sample
from unet_jax.model import COMPUTE_DTYPES, IMAGE_SHAPE, Unet


@functools.partial(jax.jit, static_argnames=("model", "num", "sampler", "steps", "n_T", "eta", "clip_x0", "sharding"))
def generate(params, key, *, model: Unet, num: int, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_SAMPLE_STEPS,
             n_T: int = N_T, eta: float = DEFAULT_ETA, clip_x0: bool = DEFAULT_CLIP_X0, sharding=None):
    """``num`` images in [-1, 1], (num, 28, 28, 1), from ``params`` with DDPM or DDIM.

    ``clip_x0`` clips each step's predicted clean image to [-1, 1]; with ``sharding`` (a
    batch-axis NamedSharding) the images are split over the devices.
    """
    schedule = linear_schedule(n_T)
    dtype = jnp.result_type(jnp.float32, jax.tree.leaves(params)[0].dtype)  # bf16 weights still sample in f32

    def eps_fn(x, t):
        return model.apply({"params": params}, x, t)

    start_key, loop_key = jax.random.split(key)
    x_T = jax.random.normal(start_key, (num, *IMAGE_SHAPE), dtype)
    if sharding is not None:
        x_T = jax.lax.with_sharding_constraint(x_T, sharding)
    if sampler == "ddpm":
        x_0 = ddpm_sample(eps_fn, schedule, loop_key, x_T, clip_x0=clip_x0)
    elif sampler == "ddim":
        x_0 = ddim_sample(eps_fn, schedule, loop_key, x_T, steps, eta, clip_x0=clip_x0)
    else:
        raise ValueError(f"expected sampler 'ddpm' or 'ddim', got {sampler!r}")
    return jnp.clip(x_0, -1.0, 1.0)


def generate_on_local_devices(params, key, *, num: int, conv: str = "auto", dtype: str = "float32",
                              **kwargs) -> np.ndarray:
    """``generate``, the images split over this process's devices (as many as divide ``num``).

    ``conv`` is the 3x3 conv lowering (``--conv``): 'auto' takes the fastest forward on this machine.
    ``dtype`` is the compute dtype (a run's ``--dtype``), so that samples come from the model it trained.
    """
    mesh = devices.data_mesh(num)
    plan = autotune.resolve(conv, num // mesh.devices.size, "sample", mesh=mesh, dtype=dtype)
    params = jax.device_put(params, devices.replicated(mesh))
    return np.asarray(generate(params, key, model=Unet(conv=plan, dtype=COMPUTE_DTYPES[dtype]), num=num, sharding=devices.batch_sharding(mesh),
                               **kwargs))


def main(argv=None) -> None:
    devices.use_all_cpu_cores()
    parser = argparse.ArgumentParser(prog="python -m unet_jax.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/default")
    parser.add_argument("--num", type=positive(int), default=64)
    parser.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER)
    parser.add_argument("--sample-steps", type=positive(int), default=DEFAULT_SAMPLE_STEPS,
                        help="DDIM steps (DDPM always takes n_T)")
    parser.add_argument("--eta", type=ddim_eta, default=DEFAULT_ETA, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    parser.add_argument("--no-clip-x0", action="store_true", help="do not clip the predicted x0 to [-1, 1] each step")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--out", default=None, help="output prefix (default WORKDIR/samples/final)")
    autotune.add_conv_flag(parser)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.workdir):
        raise SystemExit(f"error: no workdir at {args.workdir}: give the --workdir of a training run")
    try:
        config, restored = checkpoints.restore_latest_params(args.workdir)
    except checkpoints.UNREADABLE_RUN as error:
        raise SystemExit(f"error: {error}") from None
    if args.sampler == "ddim" and args.sample_steps > config["n_T"]:
        raise SystemExit(f"error: --sample-steps {args.sample_steps} exceeds the run's n_T {config['n_T']}")
    out = args.out or os.path.join(args.workdir, "samples", "final")
    try:  # before the sampling, which would be lost
        check_writable(out + ".png", out + ".npy")
    except OSError as error:
        raise SystemExit(f"error: cannot write {error.filename}: {error.strerror}") from None
    images = generate_on_local_devices(restored["params" if args.raw else "ema_params"], jax.random.key(args.seed),
                                       num=args.num, sampler=args.sampler, steps=args.sample_steps,
                                       n_T=config["n_T"], eta=args.eta, clip_x0=not args.no_clip_x0, conv=args.conv,
                                       dtype=config.get("dtype", "float32"))
    writes = {out + ".png": lambda path: save_grid(images, path), out + ".npy": lambda path: np.save(path, images)}
    for path, write in writes.items():
        try:
            write(path)
        except OSError as error:
            raise SystemExit(f"error: cannot write {path}: {error.strerror or error}") from None
    print(f"wrote {args.num} samples ({args.sampler}, step {restored['step']}) to {out}.png and {out}.npy")


if __name__ == "__main__":
    main()
