"""The files both trainers keep in a run's folder, and how each reads them back.

``config.json`` records the settings that define the run (``settings.IDENTITY``);
``metrics.jsonl`` one row per log window; ``samples/step_N.png`` grids of digits. The JAX
trainer keeps its checkpoints in ``checkpoints/``, the torch trainer in ``checkpoint.pt``,
so each can tell the other's folder from its own.
"""

import hashlib
import json
import os

import numpy as np
from PIL import Image

from ddpm_recipe.settings import IDENTITY

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"  # the JAX trainer's
TORCH_CHECKPOINT_FILE = "checkpoint.pt"  # the torch trainer's

# Settings named by a path, each beside the fingerprint of what it held when the run began.
MOVABLE = (("data", "data_fingerprint"), ("init_from", "init_from_fingerprint"))


class WorkdirError(RuntimeError):
    """The workdir, or a folder of it, cannot be written."""


class RecordError(RuntimeError):
    """A run folder's config.json is there but is not a readable record of its settings."""


def read_record(workdir: str) -> dict | None:
    """The settings recorded in ``workdir``'s config.json; None if it has none."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as error:
        raise RecordError(f"{path} is not a readable record of the run's settings ({error}); restore it, or use "
                          "another --workdir") from None
    if not isinstance(record, dict):
        raise RecordError(f"{path} is not a record of the run's settings (it holds a {type(record).__name__}, not "
                          "an object); restore it, or use another --workdir")
    return record


def make_writable_folders(workdir: str, *folders: str) -> None:
    """Make ``workdir`` and ``folders`` (paths inside it), and check that each takes a file.

    Checked before any training: a save that fails later would cost the steps before it.
    """
    for folder in (workdir, *folders):
        try:
            os.makedirs(folder, exist_ok=True)
            probe = os.path.join(folder, f".write-test-{os.getpid()}")  # one per process: several may share it
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as error:
            reason = error.strerror or error
            raise WorkdirError(f"cannot write to {folder!r} (of --workdir {workdir}): {reason}") from None


def file_fingerprint(path: str | None) -> str | None:
    """A short hash of a file's bytes (the --init-from weights); None without a path, or for a file
    that cannot be read now: a resumed run takes its weights from its checkpoint, not from there."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:
        return None


def run_identity(config, data_fingerprint: str) -> dict:
    """The settings that define a run (``settings.IDENTITY``), and the fingerprints of its data and
    of its --init-from weights, as both trainers record and compare them."""
    return ({k: getattr(config, k) for k in IDENTITY}
            | {"data_fingerprint": data_fingerprint, "init_from_fingerprint": file_fingerprint(config.init_from)})


def identity_differences(saved: dict, identity: dict) -> list[str]:
    """One line per setting in ``identity`` that the folder's record ``saved`` holds otherwise.

    The data and the --init-from weights are compared by their fingerprints: the same digits or
    weights read from a folder moved, or spelled otherwise, are the same run's. Where a side has
    no fingerprint (a record from before they were kept, a weights file no longer there), the
    paths are compared.
    """
    for path_key, fingerprint_key in MOVABLE:
        if saved.get(fingerprint_key) is None or identity.get(fingerprint_key) is None:
            identity = {k: v for k, v in identity.items() if k != fingerprint_key}
        elif saved[fingerprint_key] == identity[fingerprint_key] and path_key in identity:
            saved = saved | {path_key: identity[path_key]}
    return [f"  {key}: the workdir has {saved.get(key)!r}, this run asks for {value!r}"
            for key, value in identity.items() if saved.get(key) != value]


def recorded_identity(saved: dict | None, identity: dict) -> dict:
    """``identity`` as the folder records it: a fingerprint that cannot be taken now (the weights
    file gone from the path the run began with) keeps the one the record holds."""
    kept = {key: saved[key] for _, key in MOVABLE if identity.get(key) is None and (saved or {}).get(key) is not None}
    return identity | kept


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


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels."""
    return np.round((np.asarray(images, np.float32) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def save_grid(images, path: str, *, columns: int = 8, scale: int = 2) -> None:
    """Tile (N, 28, 28, 1) images in [-1, 1] into one PNG, 2 px apart."""
    pixels = to_uint8(images)[..., 0]
    n = len(pixels)
    rows = -(-n // columns)
    grid = np.full((rows * 30 + 2, columns * 30 + 2), 255, np.uint8)
    for i, image in enumerate(pixels):
        r, c = divmod(i, columns)
        grid[2 + r * 30: 2 + r * 30 + 28, 2 + c * 30: 2 + c * 30 + 28] = image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
