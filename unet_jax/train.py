"""DDPM training of the tutorial UNet in JAX: ``python -m unet_jax.train``.

The default run trains on the 4,500 bundled MNIST digits and writes, under ``--workdir``:
``metrics.jsonl``, ``loss.png``, ``samples/step_N.png`` (EMA weights) and Orbax
checkpoints in ``checkpoints/``. Running the same command again resumes from the latest
checkpoint; a larger ``--steps`` continues the run to it.

Everything a step needs lives on the device: the uint8 training set, the batch order (a
permutation per epoch keyed by the epoch) and the noise (``fold_in(key, step)``), so a run
is a function of its flags, and a killed run resumes to the very same parameters.
"""

import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from ddpm_recipe.errors import first_line
from ddpm_recipe.run_folder import (
    METRICS_FILE,
    RecordError,
    WorkdirBusyError,
    WorkdirError,
    WorkdirLock,
    make_writable_folders,
    read_record,
    recorded_identity,
    run_identity,
    save_grid,
    trim_metrics,
)
from ddpm_recipe.schedule import linear_schedule
from ddpm_recipe.settings import PROGRAM, Config, SettingsError, check_batch_fits, due
from ddpm_recipe.weights import flag_error
from unet_jax import autotune, checkpoints, data, devices
from unet_jax.flags import build_parser, parse_config
from unet_jax.layers import ConvPlan
from unet_jax.model import COMPUTE_DTYPES, Unet, init_variables
from unet_jax.sample import generate
from unet_jax.step import (
    TrainState,
    create_state,
    describe_nonfinite,
    jit_train_steps,
    make_optimizer,
    new_accumulator,
    program_changes,
    run_keys,
    steps_in_dispatch,
)

# ------------------------------------------------------------------------------------ the run

class InitFromError(ValueError):
    """--init-from names a file that is not the tutorial Unet's float weights."""


def _prepare_workdir(workdir: str) -> None:
    """The workdir and its samples and checkpoints folders, made and checked to take a file."""
    make_writable_folders(workdir, os.path.join(workdir, "samples"), checkpoints.checkpoint_dir(workdir))


def _init_from_weights(config: Config):
    """The --init-from weights as float32 Flax params, or None without --init-from."""
    if not config.init_from:
        return None
    from parity import CheckpointMismatchError, WeightsFileError, torch_to_flax  # the torch boundary

    try:
        ported = torch_to_flax(config.init_from)["params"]
    except (WeightsFileError, CheckpointMismatchError) as error:
        raise InitFromError(flag_error("--init-from", config.init_from, error)) from None
    # Training keeps float32 parameters whatever the checkpoint's dtype (fp16, bf16, f64).
    return jax.tree.map(lambda a: a.astype(jnp.float32), ported)


def _write_loss_curve(workdir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(workdir, METRICS_FILE)) as f:
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


class PeerReadError(RuntimeError):
    """Another process of a multi-process run could not read its copy of the data or --init-from weights."""


def train(config: Config, *, adopt: bool = False) -> TrainState:
    """Run (or resume) ``config`` to ``config.steps``; returns the final state.

    Every process of a multi-process run calls this with the same config; process 0 alone
    logs and writes samples, and all of them write their share of each checkpoint. Process 0
    holds the workdir's lock for the whole run, so a second trainer on it is refused.
    ``adopt``: the workdir's checkpoints lost their config.json; take this config as theirs.
    """
    primary = devices.is_primary()
    checkpoints.refuse_a_torch_run(config.workdir)
    # Read the data and --init-from before writing anything: a bad file must leave no trace in the
    # workdir. Each process reads its own copies; where one cannot, for any reason, every process
    # stops, rather than leave the others waiting at the next collective for one that has left.
    images, initial, failed = None, None, None
    try:
        images = data.load(config.data, "train")
        check_batch_fits(config.batch_size, len(images.images))
        if not checkpoints.committed_steps(config.workdir):
            initial = _init_from_weights(config)
    except Exception as error:  # re-raised below, as it is: a bug keeps its traceback
        failed = error
    if not devices.everywhere(failed is None):
        raise failed or PeerReadError("another process of the run could not use its --data or --init-from; "
                                      "see its error")
    _prepare_workdir(config.workdir)
    lock, busy = None, None
    if primary:
        try:
            lock = WorkdirLock(config.workdir)
        except (WorkdirBusyError, WorkdirError) as error:  # held by another trainer, or no lock file can be made
            busy = error
    # Process 0 alone takes the lock; the others learn its outcome rather than wait at a barrier for it.
    if not devices.agree(busy is None):
        raise busy or WorkdirBusyError(f"process 0 found {config.workdir} in use by another trainer")
    try:
        return _train(config, adopt, images, initial, run_keys(config.seed))
    finally:
        if lock is not None:
            lock.release()


def _train(config: Config, adopt: bool, images, initial, keys_of_the_run) -> TrainState:
    primary = devices.is_primary()
    init_key, data_key, noise_key, sample_key = keys_of_the_run
    mesh = devices.training_mesh(config.batch_size)
    mgr = checkpoints.manager(config.workdir)
    try:
        recorded_program, program = _claim_workdir(config, adopt, images, mesh, mgr)
        plan = _conv_plan(config, mesh, resuming=mgr.latest_step() is not None)
        model = Unet(conv=plan, dtype=COMPUTE_DTYPES[config.dtype])
        tx = make_optimizer(config)
        state = _restore(config, mgr, functools.partial(_fresh_state, initial, tx=tx), init_key, mesh,
                         recorded_program, program)
    except (checkpoints.IncompatibleWorkdirError, checkpoints.NoReadableCheckpointError):
        mgr.close()
        raise
    start = int(devices.fetch(state.step))
    if start >= config.steps:
        if primary:
            print(f"{config.workdir} is already at step {start} (--steps {config.steps}); nothing to do")
        mgr.close()
        return state

    if primary:
        print(f"training on {mesh.devices.size} {jax.default_backend()} device(s) in {jax.process_count()} "
              f"process(es), batch {config.batch_size} split over them")
        if note := _dtype_note(config.dtype, jax.default_backend()):
            print(note)
    # Every process holds the uint8 training set; each device gathers only its rows of a batch.
    images_u8 = jax.device_put(images.images, devices.replicated(mesh))
    keys = (data_key, noise_key)
    replicate = functools.partial(jax.device_put, device=devices.replicated(mesh))
    acc = replicate(new_accumulator())
    programs = _programs(config, model, tx, mesh, start, (state, acc, images_u8, keys))
    # XLA:CPU runs the per-core devices' programs on one small thread pool. With several
    # programs queued, threads blocked in one's all-reduce can starve the other device, and
    # the rendezvous times out and aborts the process (benchmarks/README.md, Speed against torch).
    # So on a multi-device CPU mesh each dispatch is waited for before the next one.
    one_dispatch_in_flight = devices.needs_one_dispatch_in_flight(mesh)

    saves = checkpoints.ConfirmedSaves(mgr, config.workdir, primary)
    metrics = _MetricsLog(os.path.join(config.workdir, METRICS_FILE) if primary else None, config.batch_size,
                          tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stdout,
                               disable=not primary), saves)
    step = start
    try:
        while step < config.steps:
            count = steps_in_dispatch(config, step)
            state, acc = programs[count](state, acc, images_u8, keys)
            if one_dispatch_in_flight:
                jax.block_until_ready(acc)
            metrics.write_pending()  # the window before: read one dispatch late, the host never waits on it
            step += count
            metrics.advance(count)
            if due(config.log_every, step, config.steps):
                metrics.end_window(step, acc)
                acc = replicate(new_accumulator(acc))  # fresh buffers: the ended window is read later
            checkpoint = due(config.ckpt_every, step, config.steps)
            sample = due(config.sample_every, step, config.steps)
            if checkpoint or sample:  # never save, nor draw from, parameters that a non-finite step produced
                metrics.write_pending()
                _stop_if_nonfinite(devices.fetch(acc), saves)
            # The grid before the checkpoint: a run stopped between the two redoes the steps since the
            # checkpoint before, grid included, where the other order would leave a finished run without it.
            if sample:
                _sample_and_plot(config, model, state, mesh, sample_key, step)
            if checkpoint:
                saves.save(step, state)
        saves.confirm()
    except (jax.errors.JaxRuntimeError, ValueError) as error:
        if jax.process_count() == 1 or not _is_lost_peer(error):
            raise
        saves.abandon()
        raise _peer_lost(error, step, saves) from error
    finally:
        metrics.close()
        saves.close()
    return state


def _dtype_note(dtype: str, backend: str) -> str | None:
    """What a user asking for bfloat16 on a CPU should know: XLA:CPU converts bfloat16 convolutions,
    and dots with a bfloat16 result, to float32 and back, so the run is slower than in float32, on
    CPUs with bfloat16 instructions too (benchmarks/README.md has the measurements)."""
    if dtype == "bfloat16" and backend == "cpu":
        return ("note: --dtype bfloat16 on a CPU: XLA computes its matmuls and convolutions in float32 there, "
                "so this run is slower than --dtype float32 (benchmarks/README.md, Speed against torch)")
    return None


def _programs(config: Config, model: Unet, tx, mesh, start: int, args: tuple) -> dict:
    """The jitted step programs by steps per dispatch, the first one the run needs compiled now
    (``args``: its state, accumulator, images and keys); the others compile when first used.

    K-step chunks never cross a log, checkpoint or sample boundary; where one would, single
    steps fill in, so ``programs[1]`` is there too.
    """
    step_kwargs = dict(model=model, tx=tx, schedule=linear_schedule(config.n_T), batch_size=config.batch_size,
                       ema_decay=config.ema_decay, sharding=devices.batch_sharding(mesh))
    programs = {k: jit_train_steps(k, **step_kwargs) for k in {1, config.steps_per_dispatch}}
    misaligned = [f"--{name.replace('_', '-')} {getattr(config, name)}"
                  for name in ("log_every", "ckpt_every", "sample_every") if getattr(config, name) % config.steps_per_dispatch]
    if misaligned and devices.is_primary():
        print(f"note: {', '.join(misaligned)} not a multiple of --steps-per-dispatch {config.steps_per_dispatch}: "
              "the steps before those boundaries run one per dispatch (slower, and a second program to compile)")
    first = steps_in_dispatch(config, start)
    t0 = time.perf_counter()
    programs[first] = programs[first].lower(*args).compile()
    if devices.is_primary():
        print(f"compiled the train step ({first} per dispatch) in {time.perf_counter() - t0:.1f} s", flush=True)
    return programs


def _peer_lost(error: Exception, step: int, saves: checkpoints.ConfirmedSaves) -> PeerLostError:
    return PeerLostError(
        f"process {jax.process_index()} of {jax.process_count()} stopped at step {step}: {first_line(error).rstrip('.')}. "
        "A process that dies (killed, out of memory, preempted) shows up like this in the others. "
        f"The last complete checkpoint in {saves.workdir} is {saves.last_committed()}; run the same command "
        "on every process again to resume from it.")


def _claim_workdir(config: Config, adopt: bool, images, mesh, mgr) -> tuple[dict | None, dict]:
    """Refuse a workdir whose run had other settings, and record this run's.

    Returns the programs recorded by the run before (None for a new run) and this run's: what
    decides its rounding (dispatch sizes, device count, JAX version), compared on resume.
    """
    identity = run_identity(config, data.fingerprint(images))
    saved = read_record(config.workdir)
    refused = None
    if not (adopt and saved is None):
        try:
            checkpoints.check_compatible(config.workdir, identity, mgr)
        except checkpoints.IncompatibleWorkdirError as error:
            refused = error
    # Each process compares its own data and weights files; and every process has read the record
    # before process 0 rewrites it.
    if not devices.everywhere(refused is None):
        raise refused or checkpoints.IncompatibleWorkdirError(f"another process of the run found that {config.workdir} "
                                                              "holds checkpoints of a different run; see its error")
    program = {k: getattr(config, k) for k in PROGRAM} | {"devices": int(mesh.devices.size), "jax": jax.__version__}
    if devices.is_primary():
        record = recorded_identity(saved, identity, resuming=mgr.latest_step() is not None)
        checkpoints.write_config(config.workdir, record | {"program": program})
    return (saved or {}).get("program"), program


def _fresh_state(initial, init_key, *, tx) -> TrainState:
    """A new run's state: the --init-from weights, else freshly initialised ones."""
    return create_state(initial if initial is not None else init_variables(init_key)["params"], tx)


def _restore(config: Config, mgr, fresh_state, init_key, mesh, recorded_program, program) -> TrainState:
    """The newest readable checkpoint, else ``fresh_state(init_key)``, replicated over the mesh; ``metrics.jsonl``
    trimmed to match. A checkpoint restores into that layout whatever device count wrote it.

    A resumed run needs only the state's shapes, so its initial weights are never computed (that
    would compile and run the initialisers' program for nothing). The key goes into
    ``jax.eval_shape`` as an argument: traced, ``init_variables`` is only traced, where a key
    closed over would have it compile and run its own program.
    """
    primary = devices.is_primary()
    replicated = devices.replicated(mesh)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          jax.eval_shape(fresh_state, init_key))
    latest, state = checkpoints.restore_newest_readable(
        mgr, lambda _: ocp.args.StandardRestore(target), set_aside=True, log=print if primary else (lambda *_: None))
    if latest is None:
        state = jax.device_put(fresh_state(init_key), replicated)
    else:
        if primary:
            print(f"resumed {config.workdir} from step {latest}")
        changed = program_changes(recorded_program, program, latest, config.steps)
        if changed and primary:
            print(f"note: {', '.join(changed)}: the steps run in other device programs than before, so from here the "
                  "numbers differ from an uninterrupted run's by float32 rounding (resume with the run's own settings "
                  "to keep it bit-identical)")
    if primary:
        trim_metrics(os.path.join(config.workdir, METRICS_FILE), latest or 0)  # rows past it are about to be redone
    return state


def _stop_if_nonfinite(host_acc: dict, saves: checkpoints.ConfirmedSaves) -> None:
    """Stop the run at a window with a non-finite step: its parameters are never saved."""
    if host_acc["first_bad_step"] >= 0:
        saves.wait()
        kept = saves.last_committed_step()
        raise FloatingPointError(f"{describe_nonfinite(host_acc)}; stopping. " + (
            f"The last complete checkpoint in {saves.workdir} is step {kept}, and it is kept." if kept is not None
            else f"No checkpoint of the run in {saves.workdir} was completed before it."))


class _MetricsLog:
    """metrics.jsonl and the progress bar. A window's device-side accumulator is read after the next
    dispatch is queued, so the host never waits on the step it just started; every window is checked
    for a non-finite step as it is read."""

    def __init__(self, path: str | None, batch_size: int, bar, saves: checkpoints.ConfirmedSaves):
        self.file = open(path, "a") if path else None  # process 0 alone writes
        self.batch_size, self.bar, self.saves = batch_size, bar, saves
        self.pending = None  # (step, accumulator, seconds) of an ended window not yet read
        self.window_start = time.perf_counter()

    def advance(self, steps: int) -> None:
        self.bar.update(steps)

    def end_window(self, step: int, acc: dict) -> None:
        now = time.perf_counter()
        self.pending, self.window_start = (step, acc, now - self.window_start), now

    def write_pending(self) -> None:
        if self.pending is None:
            return
        (step, acc, seconds), self.pending = self.pending, None
        host = devices.fetch(acc)
        _stop_if_nonfinite(host, self.saves)
        if self.file is None:
            return
        row = {"step": step, "loss": float(host["loss_sum"] / host["count"]),
               "images_per_s": float(host["count"]) * self.batch_size / seconds, "time": time.time()}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()



# What a collective reports when a peer process died: gloo's closed connection, or the
# coordination service's missing heartbeat.
_LOST_PEER_MARKERS = ("connection closed by peer", "connection reset", "broken pipe", "heartbeat", "unavailable",
                      "gloo", "coordination service", "task died", "socket closed", "deadline_exceeded",
                      "barrier timed out")


def _is_lost_peer(error: Exception) -> bool:
    text = str(error).lower()
    return any(marker in text for marker in _LOST_PEER_MARKERS)


def _conv_plan(config: Config, mesh, *, resuming: bool) -> ConvPlan:
    """The run's 3x3 conv lowerings: with --conv auto, those a resumed run recorded, so that it
    computes bit for bit what it would have; else measured (or cached) for this machine, and a
    resume that changes them is told that its numbers will differ. A new run (no checkpoint yet)
    measures afresh whatever an earlier start recorded."""
    recorded = checkpoints.read_conv_plan(config.workdir) if config.conv == "auto" and resuming else None
    if recorded is not None:
        plan, source = recorded, f"as recorded in {config.workdir}"
    else:
        replaced = _recorded_conv_plan_if_readable(config.workdir) if resuming else None
        local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        local_mesh = jax.sharding.Mesh(np.array(local), ("data",))
        log = print if devices.is_primary() else (lambda *_: None)
        if config.conv == "auto" and not devices.is_primary():
            plan = ConvPlan("xla")  # replaced by process 0's: timing here too would skew its timings on a shared host
        else:
            plan = autotune.resolve(config.conv, config.batch_size // mesh.devices.size, "train", mesh=local_mesh,
                                    dtype=config.dtype, log=log)
        plan = autotune.agree_across_processes(plan)
        source = "autotuned for this machine" if config.conv == "auto" else "--conv"
        if replaced is not None and replaced != plan and devices.is_primary():
            print(f"note: --conv {config.conv} replaces the 3x3 conv lowerings the run recorded "
                  f"({replaced.describe()}), so from here the numbers differ from an uninterrupted run's by "
                  "float32 rounding (resume with --conv auto to keep it bit-identical)")
    if devices.is_primary():
        print(f"3x3 conv lowerings ({source}): {plan.describe()}")
        checkpoints.write_conv_plan(config.workdir, plan)
    return plan


def _recorded_conv_plan_if_readable(workdir: str) -> ConvPlan | None:
    try:
        return checkpoints.read_conv_plan(workdir)
    except checkpoints.IncompatibleWorkdirError:  # an explicit --conv is the way past a damaged record
        return None


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
USER_ERRORS = (data.MnistError, checkpoints.IncompatibleWorkdirError, WorkdirBusyError,
               checkpoints.NoReadableCheckpointError, devices.BatchSplitError, devices.RollCallError,
               FloatingPointError, WorkdirError, InitFromError, checkpoints.CheckpointSaveError, SettingsError,
               RecordError, PeerReadError, devices.ClusterError)


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
        if isinstance(error, checkpoints.CheckpointSaveError) or jax.process_count() > 1:
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
