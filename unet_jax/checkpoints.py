"""A workdir's checkpoints (Orbax) and the configuration that owns them.

``WORKDIR/config.json`` records the settings that define a run (seed, batch size,
optimiser, data, ...). A workdir whose checkpoints came from different settings is refused,
never overwritten: resuming it would silently splice two different runs together.
"""

import json
import os
import shutil
import sys
import time
import traceback

import jax
import orbax.checkpoint as ocp

from ddpm_recipe.errors import first_line
from ddpm_recipe.run_folder import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    TORCH_CHECKPOINT_FILE,
    TORCH_MODEL_FILE,
    RecordError,
    identity_differences,
    read_record,
    write_json,
)
from unet_jax.layers import ConvPlan

CONV_PLAN_FILE = "conv_plan.json"
SET_ASIDE_DIR = "checkpoints.unreadable"  # outside CHECKPOINT_DIR, so Orbax never lists what is moved there


class IncompatibleWorkdirError(RuntimeError):
    """The workdir holds another run (one with other settings, or the torch trainer's), or an
    unreadable record of its 3x3 conv lowerings."""


class NoReadableCheckpointError(RuntimeError):
    """The workdir has checkpoints, and none of them restores."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the run stops rather than train on without one."""


# What reading a trained run can raise on a user's workdir (sample, export and evaluate say it in one line).
UNREADABLE_RUN = (FileNotFoundError, IncompatibleWorkdirError, NoReadableCheckpointError, RecordError)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def manager(workdir: str, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def write_config(workdir: str, config: dict) -> None:
    write_json(os.path.join(workdir, CONFIG_FILE), config)


def read_conv_plan(workdir: str) -> ConvPlan | None:
    """The 3x3 conv lowerings the run in ``workdir`` used, if it recorded them."""
    path = os.path.join(workdir, CONV_PLAN_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return ConvPlan.from_json(json.load(f))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise IncompatibleWorkdirError(f"{path} is not a record of 3x3 conv lowerings ({error}); delete it, "
                                       "or choose with --conv") from None


def write_conv_plan(workdir: str, plan: ConvPlan) -> None:
    write_json(os.path.join(workdir, CONV_PLAN_FILE), plan.to_json())


def committed_steps(workdir: str) -> list[int]:
    """The steps whose checkpoint is complete on disk, read from the folder without Orbax.

    Orbax writes a step into a temporary folder and renames it to the bare step number when
    every process has finished, so a numeric folder name means a committed checkpoint.
    """
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def restore_newest_readable(mgr: ocp.CheckpointManager, args_for_step, *, set_aside: bool, log=print):
    """(step, restored) from the newest checkpoint in ``mgr`` that restores; (None, None) if it has none.

    A checkpoint that fails to restore (truncated, a file missing) is skipped with a message and,
    with ``set_aside``, moved to ``WORKDIR/checkpoints.unreadable/`` (never deleted) so that the run
    goes on from the one before. Raises NoReadableCheckpointError if none restores.
    """
    steps = sorted(mgr.all_steps(), reverse=True)
    unreadable = []
    _quiet_reads_left_by_a_failed_restore()  # before: the stray reads may come before the failure is raised
    for step in steps:
        try:
            restored = mgr.restore(step, args=args_for_step(step))
        except Exception as error:  # a damaged checkpoint fails in Orbax, TensorStore or msgpack alike
            reason = first_line(error)
            unreadable.append((step, reason[:200]))
            log(f"warning: checkpoint step {step} in {mgr.directory} cannot be restored ({reason[:200]})")
            continue
        if unreadable and set_aside:
            _set_aside(mgr, [s for s, _ in unreadable], log)
        return step, restored
    if unreadable:
        listed = "; ".join(f"step {s}: {r}" for s, r in unreadable)
        raise NoReadableCheckpointError(f"no checkpoint in {mgr.directory} can be restored ({listed}); they are "
                                        "left as they are: use another --workdir, or move them away to start over")
    return None, None


def _quiet_reads_left_by_a_failed_restore() -> None:
    """Keep the one-line warning of a damaged checkpoint one line.

    When one read of a restore fails, the reads still in flight finish on TensorStore's threads
    and hand their results to the asyncio loop that Orbax has already closed; Python prints each
    as an ignored "Event loop is closed" traceback, several of them amid the run's output, some
    before the failure reaches the caller; so this is installed before the first restore. Only
    that exception, raised in asyncio's own ``call_soon_threadsafe``, is dropped; every other
    unraisable exception goes to the hook that was there before. Called from the main thread only.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_callbacks_into_a_closed_loop", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        into_closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed" and any(
            frame.f_code.co_name == "call_soon_threadsafe" and frame.f_globals.get("__name__") == "asyncio.base_events"
            for frame, _ in traceback.walk_tb(unraisable.exc_traceback))
        if not into_closed_loop:
            previous(unraisable)

    hook.drops_callbacks_into_a_closed_loop = True
    sys.unraisablehook = hook


def _set_aside(mgr: ocp.CheckpointManager, steps: list[int], log) -> None:
    """Move unreadable step folders out of the manager's view (process 0 moves, every process waits)."""
    directory = os.fspath(mgr.directory)
    aside = os.path.join(os.path.dirname(directory), SET_ASIDE_DIR)
    if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        for step in steps:
            target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(os.path.join(directory, str(step)), target)
            log(f"moved the unreadable checkpoint step {step} to {target}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("unet_jax: unreadable checkpoints set aside")
    mgr.reload()


def refuse_a_torch_run(workdir: str) -> None:
    """Raise if ``workdir`` is the torch trainer's run folder: training there would rewrite its
    config.json and trim its metrics.jsonl to this run's steps."""
    if os.path.exists(os.path.join(workdir, TORCH_CHECKPOINT_FILE)):
        raise IncompatibleWorkdirError(f"{workdir} holds a torch training run (its {TORCH_CHECKPOINT_FILE}); give the "
                                       "JAX trainer a --workdir of its own")


def check_compatible(workdir: str, identity: dict, mgr: ocp.CheckpointManager) -> None:
    """Raise if ``workdir`` has checkpoints (in ``mgr``, its manager) whose identity differs from ``identity``
    (the data by its fingerprint, the --init-from weights by path and where it moved by content:
    ``identity_differences``).

    Takes the run's manager rather than opening one: in a multi-process run every process
    must open managers in the same order, since opening one is a barrier.
    """
    if mgr.latest_step() is None:
        return
    saved = read_record(workdir)
    if saved is None:
        raise IncompatibleWorkdirError(
            f"{workdir} holds checkpoints but no {CONFIG_FILE} (the record of the settings that made them), so "
            "this run cannot check that they are its own. If these flags are that run's settings, add --adopt "
            f"to write {CONFIG_FILE} from them and resume; else use another --workdir.")
    differences = identity_differences(saved, identity)
    if differences:
        raise IncompatibleWorkdirError(
            f"{workdir} holds checkpoints of a different run, so it will not be resumed or overwritten:\n"
            + "\n".join(differences)
            + "\nUse another --workdir, or the workdir's own settings (see its config.json)."
        )


def restore_latest_params(workdir: str) -> tuple[dict, dict]:
    """(config, {'step', 'params', 'ema_params'}) from the workdir's newest readable checkpoint."""
    config = read_record(workdir)
    directory = checkpoint_dir(workdir)
    if not committed_steps(workdir):
        if os.path.exists(os.path.join(workdir, TORCH_CHECKPOINT_FILE)):
            n_T = f" --n-T {config['n_T']}" if config and "n_T" in config else ""
            raise FileNotFoundError(f"no checkpoint of the JAX trainer in {workdir}: it holds a torch training run, whose "
                                    f"EMA weights ({TORCH_MODEL_FILE}, a torch state_dict) python -m unet_jax.evaluate "
                                    f"--torch-checkpoint {os.path.join(workdir, TORCH_MODEL_FILE)}{n_T} samples and scores")
        raise FileNotFoundError(f"no checkpoint in {workdir}: train first with python -m unet_jax.train --workdir {workdir}")
    if config is None:
        raise FileNotFoundError(f"{workdir} has checkpoints but no {CONFIG_FILE}, which says how they were trained: "
                                f"run python -m unet_jax.train --workdir {workdir} --adopt with the run's flags "
                                "to write it")
    mgr = ocp.CheckpointManager(directory)
    try:
        # Onto this process's first device, whatever devices the checkpoint was written from.
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        step, restored = restore_newest_readable(
            mgr, lambda _: ocp.args.StandardRestore(fallback_sharding=single), set_aside=False)
    finally:
        mgr.close()
    return config, {"step": step, "params": restored["params"], "ema_params": restored["ema_params"]}


class ConfirmedSaves:
    """The run's asynchronous checkpoint saves, each confirmed on disk before the next.

    Orbax logs a failed background write and carries on, which would leave the run without
    checkpoints; so each save is waited for and looked for on disk before the next one starts.
    """

    def __init__(self, mgr: ocp.CheckpointManager, workdir: str, primary: bool):
        self.mgr, self.workdir, self.primary = mgr, workdir, primary
        self.in_flight = None  # the step of the save not yet confirmed on disk
        self.waiting_is_futile = False

    def last_committed_step(self) -> int | None:
        steps = committed_steps(self.workdir)
        return steps[-1] if steps else None

    def last_committed(self) -> str:
        step = self.last_committed_step()
        return f"step {step}" if step is not None else "none (no checkpoint was completed)"

    def save(self, step: int, state) -> None:
        self.confirm()
        try:
            self.mgr.save(step, args=ocp.args.StandardSave(state))
        except Exception as error:
            raise self._failed(step, first_line(error)) from error
        self.in_flight = step

    def wait(self) -> None:
        """Let the save in flight finish (or fail) without checking it, before the run stops for another reason."""
        self.mgr.wait_until_finished()

    def confirm(self) -> None:
        """Wait for the save in flight and check that it reached the disk."""
        if self.in_flight is None:
            return
        step, self.in_flight = self.in_flight, None
        try:
            self.mgr.wait_until_finished()
        except Exception as error:  # Orbax reports a failed write from any layer (OS, TensorStore, its own)
            raise self._failed(step, first_line(error)) from error
        # Process 0 commits a checkpoint (renames its folder) once every process has written its share.
        if self.primary and step not in committed_steps(self.workdir):
            raise self._failed(step, "it never reached the disk; see Orbax's log above")

    def abandon(self) -> None:
        """Never wait for the save in flight: another process of the run is gone, and Orbax finishes a
        save at a barrier with every process, which then only fails, and JAX aborts the process."""
        self.waiting_is_futile = True

    def _failed(self, step: int, reason: str) -> CheckpointSaveError:
        self.waiting_is_futile = True
        return CheckpointSaveError(f"saving the checkpoint of step {step} in {self.workdir} failed ({reason}); "
                                   f"stopping. The last complete checkpoint is {self.last_committed()}.")

    def close(self) -> None:
        # After a failed save, or with a process gone, Orbax's wait (close waits too) only waits out its timeouts.
        if not self.waiting_is_futile:
            self.mgr.wait_until_finished()
            self.mgr.close()
