"""A workdir's checkpoints (Orbax) and the configuration that owns them.

``WORKDIR/config.json`` records the settings that define a run (seed, batch size,
optimiser, data, ...). A workdir whose checkpoints came from different settings is refused,
never overwritten: resuming it would silently splice two different runs together.
"""

import json
import os

import jax
import orbax.checkpoint as ocp

from unet_jax.layers import ConvPlan

CONFIG_FILE = "config.json"
CONV_PLAN_FILE = "conv_plan.json"
CHECKPOINT_DIR = "checkpoints"


class IncompatibleWorkdirError(RuntimeError):
    """The workdir holds checkpoints of a run with other settings."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def manager(workdir: str, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def read_config(workdir: str) -> dict | None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_config(workdir: str, config: dict) -> None:
    _write_json(os.path.join(workdir, CONFIG_FILE), config)


def _write_json(path: str, obj) -> None:
    """Atomically (a crash never leaves half a file)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


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
    _write_json(os.path.join(workdir, CONV_PLAN_FILE), plan.to_json())


def has_checkpoints(workdir: str) -> bool:
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return False
    mgr = ocp.CheckpointManager(directory)
    try:
        return mgr.latest_step() is not None
    finally:
        mgr.close()


def check_compatible(workdir: str, identity: dict, mgr: ocp.CheckpointManager) -> None:
    """Raise if ``workdir`` has checkpoints (in ``mgr``, its manager) whose identity differs from ``identity``.

    Takes the run's manager rather than opening one: in a multi-process run every process
    must open managers in the same order, since opening one is a barrier.
    """
    if mgr.latest_step() is None:
        return
    saved = read_config(workdir) or {}
    differences = [f"  {key}: the workdir has {saved.get(key)!r}, this run asks for {value!r}"
                   for key, value in identity.items() if saved.get(key) != value]
    if differences:
        raise IncompatibleWorkdirError(
            f"{workdir} holds checkpoints of a different run, so it will not be resumed or overwritten:\n"
            + "\n".join(differences)
            + "\nUse another --workdir, or the workdir's own settings (see its config.json)."
        )


def restore_latest_params(workdir: str) -> tuple[dict, dict]:
    """(config, {'step', 'params', 'ema_params'}) from the workdir's latest checkpoint."""
    config = read_config(workdir)
    directory = checkpoint_dir(workdir)
    mgr = ocp.CheckpointManager(directory) if config is not None and os.path.isdir(directory) else None
    try:
        step = mgr.latest_step() if mgr else None
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}: train first with python -m unet_jax.train --workdir {workdir}")
        # Onto this process's first device, whatever devices the checkpoint was written from.
        restored = mgr.restore(step, args=ocp.args.StandardRestore(
            fallback_sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])))
    finally:
        if mgr:
            mgr.close()
    return config, {"step": step, "params": restored["params"], "ema_params": restored["ema_params"]}
