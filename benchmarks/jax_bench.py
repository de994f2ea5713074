"""The JAX side of the benchmark: the trainer's own jitted step and sampler."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import Case, time_repeats, timed
from ddpm_recipe.schedule import linear_schedule
from ddpm_recipe.settings import Config
from unet_jax import devices
from unet_jax.model import COMPUTE_DTYPES, Unet, init_variables
from unet_jax.sample import generate
from unet_jax.step import create_state, jit_train_steps, make_optimizer, new_accumulator


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """float32 matmul GFLOP/s on the default backend: the roofline the train step is held to.

    Measured both on one device (XLA's intra-op threads) and as one matmul per device, in
    parallel; the larger is the machine's peak.
    """
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    single = jax.jit(lambda x: x @ x)
    best = _gflops(lambda: single(a), 2 * n**3, repeats)
    count = len(jax.devices())
    if count > 1:
        mesh = jax.sharding.Mesh(jax.devices(), ("data",))
        stacked = jax.device_put(jnp.stack([a] * count), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
        batched = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x))
        best = max(best, _gflops(lambda: batched(stacked), 2 * n**3 * count, repeats))
    return best


def _gflops(fn, flops, repeats):
    out = [None]
    timing = time_repeats(lambda: out.__setitem__(0, fn()), lambda: jax.block_until_ready(out[0]), warmup=2,
                          repeats=repeats)
    return flops / timing["median_s"] / 1e9


def train_program(images_u8: np.ndarray, batch: int, dtype: str, mesh, steps_per_dispatch: int, conv="xla"):
    """The trainer's jitted, state-donating program on ``mesh`` and fresh inputs for it.

    Returns (program, (state, acc, images, keys)): ``steps_per_dispatch`` steps per call, as
    the trainer's ``--steps-per-dispatch``.
    """
    config = Config(batch_size=batch, warmup_steps=0)
    tx = make_optimizer(config)
    state = jax.device_put(create_state(init_variables(jax.random.key(0))["params"], tx), devices.replicated(mesh))
    acc = jax.device_put(new_accumulator(), devices.replicated(mesh))
    images = jax.device_put(images_u8, devices.replicated(mesh))
    keys = tuple(jax.random.split(jax.random.key(1)))
    program = jit_train_steps(steps_per_dispatch, model=Unet(conv=conv, dtype=COMPUTE_DTYPES[dtype]), tx=tx, schedule=linear_schedule(),
                              batch_size=batch, ema_decay=config.ema_decay, sharding=devices.batch_sharding(mesh))
    return program, (state, acc, images, keys)


def direct_flops(images_u8: np.ndarray, batch: int, dtype: str) -> float | None:
    """XLA's FLOP count per train step with XLA's own convolutions: the work of the direct form,
    used for every lowering and dispatch size so that GFLOP/s compare like with like. Counted on
    a one-step program: several steps per dispatch do that step's work as many times."""
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    program, args = train_program(images_u8, batch, dtype, mesh, 1, "xla")
    return _flops(program.lower(*args))  # of the whole, unpartitioned program


def train_step_case(images_u8: np.ndarray, batch: int, dtype: str, *, all_devices: bool, steps_per_repeat: int,
                    steps_per_dispatch: int = 1, conv="xla", direct_flops: float | None = None) -> Case:
    """The trainer's own program, compiled and warmed up: its compile time and the FLOPs of a
    direct-convolution step go with it.

    ``steps_per_repeat`` is rounded to a multiple of ``steps_per_dispatch``.
    """
    mesh = devices.data_mesh(batch) if all_devices else jax.sharding.Mesh(jax.devices()[:1], ("data",))
    program, (state, acc, images, keys) = train_program(images_u8, batch, dtype, mesh, steps_per_dispatch, conv)
    compiled, compile_s = timed(program.lower(state, acc, images, keys).compile)
    holder = {"state": state, "acc": acc}
    dispatches = max(1, round(steps_per_repeat / steps_per_dispatch))

    wait = devices.needs_one_dispatch_in_flight(mesh)  # as the trainer does, see unet_jax/train.py

    def run():
        for _ in range(dispatches):
            holder["state"], holder["acc"] = compiled(holder["state"], holder["acc"], images, keys)
            if wait:
                jax.block_until_ready(holder["acc"])

    def sync():
        jax.block_until_ready(holder["acc"])

    run()  # the warm-up: first touches of memory, finished before the next case compiles
    sync()
    return Case(run, sync, dispatches * steps_per_dispatch,
                {"compile_s": compile_s, "flops": direct_flops, "devices": mesh.devices.size})


def sample_case(num: int, sampler: str, steps: int, *, conv="xla") -> Case:
    """One compiled sampler program, warmed up: a repeat draws a batch of ``num`` images."""
    params = init_variables(jax.random.key(0))["params"]
    mesh = devices.data_mesh(num)
    params = jax.device_put(params, devices.replicated(mesh))
    kwargs = dict(model=Unet(conv=conv), num=num, sampler=sampler, steps=steps, sharding=devices.batch_sharding(mesh))
    _, compile_s = timed(lambda: generate.lower(params, jax.random.key(0), **kwargs).compile())
    out = [None]

    def run():
        out[0] = generate(params, jax.random.key(0), **kwargs)

    def sync():
        jax.block_until_ready(out[0])

    run()
    sync()
    return Case(run, sync, 1, {"compile_s": compile_s, "devices": mesh.devices.size})


def _flops(stage) -> float | None:
    analysis = stage.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    return float(analysis["flops"]) if analysis and "flops" in analysis else None
