"""The files both trainers keep in a run's folder, and how each reads them back.

``config.json`` records the settings that define the run (``settings.IDENTITY``);
``metrics.jsonl`` one row per log window; ``samples/step_N.png`` grids of digits. The JAX
trainer keeps its checkpoints in ``checkpoints/``, the torch trainer in ``checkpoint.pt``,
so each can tell the other's folder from its own; ``.lock`` is held by the trainer running in it.
Also how every tool writes a file: checked writable before the work that makes it, then
written whole or not at all.
"""

import contextlib
import errno
import hashlib
import json
import os
import socket

import numpy as np
from PIL import Image

from ddpm_recipe.settings import IDENTITY

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"  # the JAX trainer's
TORCH_CHECKPOINT_FILE = "checkpoint.pt"  # the torch trainer's
TORCH_MODEL_FILE = "model.pt"  # the torch trainer's EMA weights, a state_dict beside each checkpoint
LOCK_FILE = ".lock"  # held by the trainer running in the folder


class WorkdirError(RuntimeError):
    """The workdir, or a folder of it, cannot be written."""


class WorkdirBusyError(RuntimeError):
    """Another trainer holds the workdir."""


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
            _make_and_probe(folder)
        except OSError as error:
            reason = error.strerror or error
            raise WorkdirError(f"cannot write to {folder!r} (of --workdir {workdir}): {reason}") from None


def check_writable(*paths: str) -> None:
    """Make each path's folder and check that the path can be written there, before the work that
    makes it; else an OSError whose ``filename`` is the path (its folder takes no file, a folder
    has its name, or a file by its name is read-only)."""
    for path in paths:
        try:
            _make_and_probe(os.path.dirname(os.path.abspath(path)))
        except OSError as error:
            raise OSError(error.errno, error.strerror or str(error), path) from None
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)


def _make_and_probe(folder: str) -> None:
    if os.path.exists(folder) and not os.path.isdir(folder):  # makedirs would say "File exists"
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), folder)
    os.makedirs(folder, exist_ok=True)
    probe = os.path.join(folder, f".write-test-{os.getpid()}")  # one per process: several may share it
    with open(probe, "w") as f:
        f.write("ok")
    os.remove(probe)


def file_fingerprint(path: str | None) -> str | None:
    """A short hash of a file's bytes (the --init-from weights); None without a path, or for a file
    that cannot be read now."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()[:16]
    except OSError:
        return None


def run_identity(config, data_fingerprint: str) -> dict:
    """The settings that define a run (``settings.IDENTITY``), and the fingerprints of its data and
    of its --init-from weights, as both trainers record and compare them."""
    return ({k: getattr(config, k) for k in IDENTITY}
            | {"data_fingerprint": data_fingerprint, "init_from_fingerprint": file_fingerprint(config.init_from)})


def identity_differences(saved: dict, identity: dict) -> list[str]:
    """One line per setting in ``identity`` that the folder's record ``saved`` holds otherwise.

    The data is compared by its fingerprint: the same digits read from a folder moved, or spelled
    otherwise, are the same run's (a record from before fingerprints were kept compares the path).
    The --init-from weights matter only when a run begins, so a resume compares their path, and
    where the path moved, what the file there holds: the same weights elsewhere are the same run's.
    """
    if "data_fingerprint" not in saved:
        identity = {k: v for k, v in identity.items() if k != "data_fingerprint"}
    elif saved["data_fingerprint"] == identity.get("data_fingerprint") and "data" in identity:
        saved = saved | {"data": identity["data"]}
    weights_now = identity.get("init_from_fingerprint")
    identity = {k: v for k, v in identity.items() if k != "init_from_fingerprint"}
    if weights_now is not None and weights_now == saved.get("init_from_fingerprint") and "init_from" in identity:
        saved = saved | {"init_from": identity["init_from"]}
    return [f"  {key}: the workdir has {saved.get(key)!r}, this run asks for {value!r}"
            for key, value in identity.items() if saved.get(key) != value]


def recorded_identity(saved: dict | None, identity: dict, *, resuming: bool) -> dict:
    """``identity`` as the folder records it. A resumed run keeps the fingerprint of the weights it
    began with, whatever its --init-from path holds now; where its record has none (a run from
    before fingerprints were kept), it records none, so that its path alone stays compared: the
    file there now may not hold the weights it began with. A new run, or one adopting checkpoints
    without a record, records the file at its path."""
    if not resuming or saved is None:
        return identity
    return identity | {"init_from_fingerprint": saved.get("init_from_fingerprint")}


def write_atomically(path: str, data: bytes | str) -> None:
    """Write ``path`` beside itself, then rename it into place: a crash never leaves half a file, and
    processes writing the same file (a shared cache) each rename a whole one of their own."""
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"  # hosts sharing a folder may reuse a pid
    try:
        with open(tmp, "w" if isinstance(data, str) else "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:  # a full disk, or an interrupt: no temp file is left behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON, atomically (``write_atomically``)."""
    write_atomically(path, json.dumps(obj, indent=2, sort_keys=True))


class WorkdirLock:
    """An exclusive hold on a workdir for one trainer, released when the process ends, however it ends.

    An advisory ``flock`` on ``WORKDIR/.lock``: the kernel drops it when the holder exits, so a
    lock left by a killed run never blocks its resume. The file names the holder (pid, host).
    """

    def __init__(self, workdir: str):
        import fcntl

        self.path = os.path.join(workdir, LOCK_FILE)
        try:
            self._file = open(self.path, "a+")
        except OSError as error:  # a folder by that name, or another user's file
            raise WorkdirError(f"cannot open the workdir's lock file {self.path}: {error.strerror or error}") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "an unknown process"
            self._file.close()
            raise WorkdirBusyError(f"{workdir} is in use by another trainer ({holder}); wait for it to end or stop "
                                   "it, or use another --workdir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing the file drops the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


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
    write_atomically(path, "".join(rows))


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
