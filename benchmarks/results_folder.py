"""Where a benchmark writes its results: the folder is made and checked when the flags are read,
before an hour of measuring, and the files are written after the table is printed."""

import argparse
import json
import os

from ddpm_recipe.run_folder import write_atomically

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def writable_folder(path: str) -> str:
    """--out's type: the folder, made now and writable, else argparse's one-line error."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot make the results folder {path} ({error.strerror or error})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write to the results folder {path}")
    return path


def write_results(folder: str, name: str, result: dict, table: str) -> None:
    """``<folder>/<name>.json`` and ``.md``, each whole or not at all. A failure here (a disk that
    filled during the run) is one line; the caller has printed the table already."""
    try:
        write_atomically(os.path.join(folder, name + ".json"), json.dumps(result, indent=2))
        write_atomically(os.path.join(folder, name + ".md"), table + "\n")
    except OSError as error:
        raise SystemExit(f"error: writing the results to {folder} failed ({error.strerror or error}); "
                         "the table above holds them") from None
