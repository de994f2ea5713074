"""The trainer's device program: one Adam and EMA update, K of them per dispatch, and the log window;
and, on the host, which steps go in each dispatch.

The program is pure and runs under ``jax.jit``: the batch is gathered on the device from the
uint8 training set by ``data.epoch_order`` and ``data.batch_in_order`` (functions of the step),
the noise comes from ``fold_in(key, step)``, and the loss and any non-finite step are folded into
a device-side log window, so no step waits for the host. ``describe_nonfinite`` reads that window
once fetched; ``steps_in_dispatch`` and ``program_changes`` plan the dispatches of a run and of its
resume. ``unet_jax.train`` runs the loop.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from ddpm_recipe.schedule import Schedule
from ddpm_recipe.settings import PROGRAM, Config, SettingsError
from unet_jax import data
from unet_jax.diffusion import draw_timesteps_and_noise, noise_prediction_loss
from unet_jax.layers import as_plan
from unet_jax.model import Unet, conv_layers

NONFINITE_LOSS, NONFINITE_GRADIENTS, NONFINITE_PARAMETERS = 1, 2, 4
_NONFINITE_NAMES = ((NONFINITE_LOSS, "loss"), (NONFINITE_GRADIENTS, "gradients"), (NONFINITE_PARAMETERS, "parameters"))


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    ema_params: dict
    opt_state: optax.OptState


def run_keys(seed: int):
    """The run's four keys, all from ``seed``: (init, data order, noise, samples)."""
    return tuple(jax.random.split(jax.random.key(seed), 4))


def learning_rate(config: Config):
    """Linear warm-up from 0 over warmup_steps, then constant, or cosine decay to 0 over decay_steps.

    Written out rather than taken from optax.schedules, whose values are float32 even under
    jax_enable_x64: float64 training must match torch's float64 Adam to 1e-9.
    """
    warmup, decay = config.warmup_steps, config.decay_steps

    def schedule(count):
        step = jnp.asarray(count, jnp.result_type(float))
        factor = jnp.minimum(step / warmup, 1.0) if warmup else jnp.ones_like(step)
        if decay:
            progress = jnp.clip((step - warmup) / decay, 0.0, 1.0)
            factor = jnp.where(step < warmup, factor, 0.5 * (1 + jnp.cos(jnp.pi * progress)))
        return config.lr * factor

    return schedule


def make_optimizer(config: Config) -> optax.GradientTransformation:
    # torch.optim.Adam's defaults; eps sits outside the square root in both.
    return optax.adam(learning_rate(config), b1=0.9, b2=0.999, eps=1e-8)


def ema_decay_at(step, max_decay: float):
    """A warm-up EMA: min(max_decay, (1 + n) / (10 + n)), so short runs are not dominated by the init."""
    return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))


def create_state(params, tx: optax.GradientTransformation) -> TrainState:
    ema_params = jax.tree.map(jnp.copy, params)  # its own buffers: the step donates both
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params, opt_state=tx.init(params))


def loss_and_grads(params, x0, t_B, noise, *, model: Unet, schedule: Schedule):
    def loss_fn(params):
        return noise_prediction_loss(lambda x, t: model.apply({"params": params}, x, t), schedule, x0, t_B, noise)

    return jax.value_and_grad(loss_fn)(params)


def apply_update(state: TrainState, x0, t_B, noise, *, model: Unet, tx, schedule: Schedule, ema_decay: float,
                 sharding=None):
    """One Adam step on the noise-prediction loss of (x0, t, noise).

    With ``sharding`` (a batch-axis NamedSharding) each device differentiates its own slice of
    the batch and the devices average: equal slices, so the batch's mean loss and gradient.
    Written per device (shard_map) rather than left to XLA's partitioner, which would gather
    the whole batch onto every device for a layer that loops over images.

    Returns (state, metrics): metrics holds the step, its loss, and ``nonfinite``, a bit set of
    what was not finite: NONFINITE_LOSS, NONFINITE_GRADIENTS, NONFINITE_PARAMETERS (a finite loss
    and finite gradients can still produce infinite parameters, from a huge learning rate).
    """
    grad_fn = functools.partial(loss_and_grads, model=model, schedule=schedule)
    if sharding is not None:
        axis = sharding.spec[0]
        per_device = grad_fn
        # check_vma=False: each device's gradient stays its own until the explicit pmean (with
        # the check, JAX would sum the replicated parameters' gradients over devices itself).
        grad_fn = jax.shard_map(lambda *args: pmean_flat(per_device(*args), axis), mesh=sharding.mesh,
                                in_specs=(P(), P(axis), P(axis), P(axis)), out_specs=P(), check_vma=False)
    loss, grads = grad_fn(state.params, x0, t_B, noise)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, ema_decay)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)
    nonfinite = (jnp.where(jnp.isfinite(loss), 0, NONFINITE_LOSS)
                 | jnp.where(_all_finite(grads), 0, NONFINITE_GRADIENTS)
                 | jnp.where(_all_finite(params), 0, NONFINITE_PARAMETERS))
    return TrainState(state.step + 1, params, ema_params, opt_state), {"step": state.step, "loss": loss,
                                                                        "nonfinite": nonfinite}


def pmean_flat(tree, axis: str):
    """``lax.pmean`` of a pytree with each dtype's leaves in one flat buffer: the same numbers
    (each element is averaged alone), but XLA:CPU all-reduces one long array much faster than a
    tuple of dozens of small ones."""
    leaves, treedef = jax.tree.flatten(tree)
    out = list(leaves)
    for dtype in dict.fromkeys(leaf.dtype for leaf in leaves):  # first-seen order: the same program everywhere
        group = [i for i, leaf in enumerate(leaves) if leaf.dtype == dtype]
        flat = jax.lax.pmean(jnp.concatenate([jnp.ravel(leaves[i]) for i in group]), axis)
        offsets = np.cumsum([0] + [leaves[i].size for i in group])
        for i, start, stop in zip(group, offsets[:-1], offsets[1:]):
            out[i] = flat[start:stop].reshape(leaves[i].shape)
    return jax.tree.unflatten(treedef, out)


def _all_finite(tree):
    """Every element finite (a norm could overflow where every element is finite)."""
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]))


def train_step(state: TrainState, images_u8, keys, *, model, tx, schedule, batch_size: int, ema_decay: float,
               sharding=None, order=None):
    """Batch ``state.step`` of the on-device data, fresh noise from fold_in(key, step), one update.

    With ``sharding`` (a batch-axis NamedSharding), each device differentiates its slice of the
    batch and the gradients are averaged over the devices (``apply_update``); the numbers are the
    same batch's whatever the device count.
    ``order``: the step's (epoch, order) from ``data.epoch_order``, where the caller has it.
    """
    data_key, noise_key = keys
    if order is None:
        order = data.epoch_order(data_key, state.step, images_u8.shape[0], batch_size)
    idx = data.batch_in_order(order, state.step, images_u8.shape[0], batch_size)
    x0 = data.to_model_range(images_u8[idx])
    t_B, noise = draw_timesteps_and_noise(jax.random.fold_in(noise_key, state.step), x0, schedule.n_T)
    if sharding is not None:
        x0, t_B, noise = jax.lax.with_sharding_constraint((x0, t_B, noise), sharding)
    return apply_update(state, x0, t_B, noise, model=model, tx=tx, schedule=schedule, ema_decay=ema_decay,
                        sharding=sharding)


def new_accumulator(previous=None) -> dict:
    """Device-side log window: loss sum and count, and the first non-finite step, its loss and what was
    not finite (kept across windows)."""
    def kept(name, initial):
        return jnp.copy(previous[name]) if previous else initial

    return {"loss_sum": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.int32),
            "first_bad_step": kept("first_bad_step", jnp.full((), -1, jnp.int32)),
            "bad_loss": kept("bad_loss", jnp.zeros((), jnp.float32)),
            "bad_what": kept("bad_what", jnp.zeros((), jnp.int32))}


def train_and_accumulate(state: TrainState, acc: dict, images_u8, keys, **step_kwargs):
    """``train_step``, folding its metrics into the log window in the same program.

    The metrics fold in inside the step's own program: interleaving a second small
    multi-device program between the steps' all-reduces has stalled XLA:CPU's collectives until
    their rendezvous timed out.
    """
    state, metrics = train_step(state, images_u8, keys, **step_kwargs)
    return state, accumulate(acc, metrics)


def train_steps(state: TrainState, acc: dict, images_u8, keys, *, steps: int, **step_kwargs):
    """``steps`` of ``train_and_accumulate`` in one program: a loop, or unrolled where the model
    needs it (``loops_at_full_speed``).

    One dispatch for several steps saves launches on GPU, and on a CPU it takes less time per
    step too: one program reuses its buffers, where each new dispatch first touches fresh
    memory (the `1 step/dispatch` rows of ``python -m benchmarks``). Its steps carry their
    epoch's order of the data from one to the next (``data.epoch_order``), so the dataset is
    shuffled once per dispatch and epoch rather than once per step.
    """
    if steps == 1:
        return train_and_accumulate(state, acc, images_u8, keys, **step_kwargs)

    def order_at(step, known=None):  # each step's epoch order, sorted again only when a new epoch starts
        return data.epoch_order(keys[0], step, images_u8.shape[0], step_kwargs["batch_size"], known)

    def body(carry, _):
        state, acc, order = carry
        order = order_at(state.step, order)
        state, acc = train_and_accumulate(state, acc, images_u8, keys, order=order, **step_kwargs)
        return (state, acc, order), None

    unroll = not loops_at_full_speed(step_kwargs["model"])
    (state, acc, _), _ = jax.lax.scan(body, (state, acc, order_at(state.step)), None, length=steps, unroll=unroll)
    return state, acc


def loops_at_full_speed(model: Unet) -> bool:
    """Whether the model's train step runs as fast inside a while loop as unrolled.

    Inside a loop XLA:CPU runs the weight gradients of ``lax.conv`` on a naive path
    (jax-ml/jax#12868), many times slower: the 3x3 lowering ``xla`` and the plain transposed
    convolutions (``fast=False``) need the steps unrolled. Every other lowering's weight
    gradient is matmuls, which a loop runs as fast; and a loop compiles once where unrolled
    steps compile once each. The lowerings are recorded with a run, so a resumed run makes
    the same choice.
    """
    plan = as_plan(model.conv)
    return model.fast and all(plan.lowering(shape) != "xla" for shape in conv_layers())


def jit_train_steps(steps: int, **step_kwargs):
    """``train_steps`` jitted as the trainer runs it: (state, acc) donated, ``steps`` per call."""
    return jax.jit(functools.partial(train_steps, steps=steps, **step_kwargs), donate_argnums=(0, 1))


def accumulate(acc: dict, metrics: dict) -> dict:
    """Fold one step's metrics into the window, on the device: no host sync per step."""
    newly_bad = (acc["first_bad_step"] < 0) & (metrics["nonfinite"] != 0)
    return {"loss_sum": acc["loss_sum"] + metrics["loss"].astype(jnp.float32), "count": acc["count"] + 1,
            "first_bad_step": jnp.where(newly_bad, metrics["step"], acc["first_bad_step"]),
            "bad_loss": jnp.where(newly_bad, metrics["loss"].astype(jnp.float32), acc["bad_loss"]),
            "bad_what": jnp.where(newly_bad, metrics["nonfinite"].astype(jnp.int32), acc["bad_what"])}


def describe_nonfinite(host_acc: dict) -> str:
    """'non-finite gradients at step 4 (loss 1.67e+21)' from a fetched accumulator with a bad step."""
    what = [name for bit, name in _NONFINITE_NAMES if int(host_acc["bad_what"]) & bit]
    what = " and ".join(what) if len(what) < 3 else f"{what[0]}, {what[1]} and {what[2]}"
    return (f"non-finite {what} at step {int(host_acc['first_bad_step'])} "
            f"(loss {float(host_acc['bad_loss']):.3g})")


# ------------------------------------------------------------------ which steps go in one dispatch

def steps_in_dispatch(config: Config, step: int) -> int:
    """steps_per_dispatch, or 1 where that many would run past a log, checkpoint, sample or the end."""
    boundary = config.steps
    for every in (config.log_every, config.ckpt_every, config.sample_every):
        if every:
            boundary = min(boundary, (step // every + 1) * every)
    return config.steps_per_dispatch if step + config.steps_per_dispatch <= boundary else 1


def program_changes(recorded: dict | None, program: dict, start: int, steps: int) -> list[str]:
    """What differs between the programs an uninterrupted run (``recorded``) would run from ``start``
    to ``steps`` and those this one (``program``) will: the dispatch sizes, the device count, the JAX
    version. A changed --log-every that groups the steps the same way changes nothing."""
    if not recorded or not set(PROGRAM) <= set(recorded):
        return []
    changed = [f"{k} {recorded[k]} -> {program[k]}" for k in ("devices", "jax") if recorded.get(k) != program[k]]

    def dispatches(settings):
        config = Config(steps=steps, **{k: settings[k] for k in PROGRAM})
        sizes, step = [], start
        while step < steps:
            sizes.append(steps_in_dispatch(config, step))
            step += sizes[-1]
        return sizes

    try:
        before = dispatches(recorded)
    except SettingsError:  # a config.json edited by hand
        return changed + ["the record of the run's device programs in its config.json is unreadable"]
    if before != dispatches(program):
        changed += [f"{k.replace('_', '-')} {recorded[k]} -> {program[k]}" for k in PROGRAM if recorded[k] != program[k]]
    return changed
