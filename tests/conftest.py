import atexit
import gzip
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np
import pytest

# One XLA compilation cache for the whole session, subprocesses included: the tests compile the
# same few programs (the tiny train step, the samplers) dozens of times, in-process and in the
# trainer's subprocesses. A cached executable is the one XLA would build again, so no test sees
# other numbers; it only skips the compile. Set here, at import, because JAX reads it when imported.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="unet-jax-test-xla-cache-")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

# torch's OpenMP threads spin after each parallel region by default, waiting for the next one. In
# the suite two workers share the cores, and that spinning takes cycles from the other worker and
# from XLA's threads in the same process; sleeping instead changes no number, only who runs. Set
# before torch is imported (its OpenMP reads it when loaded); subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SEED_TUTORIAL = pathlib.Path(os.environ.get(
    "UNET_JAX_TUTORIAL",
    pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "seeds" / "000_ea2f922525bcfbec.txt"))


def pytest_collection_modifyitems(items):
    """Modules with slow tests first: `make test` hands whole modules to its workers in this order,
    and the longest going first keeps one worker from being left alone with one at the end."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)  # stable: within a module, file order


@pytest.fixture(scope="session", autouse=True)
def autotune_cache(tmp_path_factory):
    """The conv autotuner's cache in a folder of the test session's own (subprocesses inherit it), never ~/.cache."""
    os.environ["UNET_JAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("autotune-cache"))


@pytest.fixture(autouse=True)
def keep_xla_flags(monkeypatch):
    """The CLIs' mains ask for a device per core through XLA_FLAGS (JAX has started by then, so this
    process keeps its own); undo it after each test, or the subprocesses of later tests inherit it."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))


@pytest.fixture
def stop_in(monkeypatch):
    """``stop_in(module, name, run)``: ``run()`` stopped as a Ctrl-C (or a kill) stops it when it calls
    ``module.name``: KeyboardInterrupt there, which must reach the caller."""
    def run_until(module, name: str, run) -> None:
        def stopped(*args, **kwargs):
            raise KeyboardInterrupt

        with monkeypatch.context() as patch:
            patch.setattr(module, name, stopped)
            with pytest.raises(KeyboardInterrupt):
                run()

    return run_until


@pytest.fixture
def warm_autotune_cache():
    """A function that writes an autotune cache holding ``train`` and ``sample`` plans (a lowering's
    name or a ConvPlan) for every toy batch per device (or ``batches``) and device count, as a second
    run on this machine finds it, and returns the environment that points a subprocess at it.
    Measuring is tests/test_autotune.py's; elsewhere it would only add compiles."""
    from unet_jax import autotune, devices
    from unet_jax.layers import as_plan

    def write(folder, train, sample, batches=(1, 2, 4)) -> dict:
        entries = {autotune.machine_key(batch, mode, count): {"plan": as_plan(plan).to_json(), "ms": {}, "measured": "-"}
                   for mode, plan in (("train", train), ("sample", sample))
                   for count in range(1, devices.usable_cores() + 1) for batch in batches}
        with pytest.MonkeyPatch.context() as patch:  # the cache's own writer: its format is written in one place
            patch.setenv("UNET_JAX_CACHE_DIR", str(folder))
            autotune._write_cache(autotune.cache_path(), entries)
        return dict(os.environ, UNET_JAX_CACHE_DIR=str(folder))

    return write


@pytest.fixture(scope="session")
def tutorial_namespace():
    """The tutorial's own model code (cells 2, 5, 8 and 11), executed from its text."""
    if not SEED_TUTORIAL.exists():
        # CI sets UNET_JAX_REQUIRE_TUTORIAL: there, these checks against the tutorial itself must run.
        message = (f"the tutorial text is not at {SEED_TUTORIAL} (../shared/seeds/ beside the clone); "
                   "the tests against the tutorial's own code need it")
        if os.environ.get("UNET_JAX_REQUIRE_TUTORIAL"):
            pytest.fail(message)
        pytest.skip(message)
    text = SEED_TUTORIAL.read_text()
    cells = dict(re.findall(r"In \[(\d+)\]:\n(.*?)(?=\nIn \[\d+\]:|\Z)", text, flags=re.S))
    namespace: dict = {}
    exec("import torch\nimport torch.nn as nn\n", namespace)
    for cell in ("2", "5", "8", "11"):
        exec(cells[cell], namespace)
    return namespace


def _write_idx(path, array, magic, compress):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if compress else open
    with opener(path + (".gz" if compress else ""), "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def write_idx():
    """The IDX file writer (MNIST's format): ``write_idx(path, array, magic, compress)``."""
    return _write_idx


@pytest.fixture
def write_mnist_root():
    """A function that writes the bundled digits into a folder in torchvision's MNIST layout, as IDX files."""
    from unet_jax import data

    def write(root: pathlib.Path) -> pathlib.Path:
        raw = root / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for split, prefix in (("train", "train"), ("test", "t10k")):
            digits = data.load("bundled", split)
            _write_idx(str(raw / f"{prefix}-images-idx3-ubyte"), digits.images[..., 0], 2051, compress=False)
            _write_idx(str(raw / f"{prefix}-labels-idx1-ubyte"), digits.labels, 2049, compress=False)
        return root

    return write
