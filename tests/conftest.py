import os
import pathlib
import re

import pytest

SEED_TUTORIAL = pathlib.Path(os.environ.get(
    "UNET_JAX_TUTORIAL",
    pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "seeds" / "000_ea2f922525bcfbec.txt"))


@pytest.fixture(scope="session", autouse=True)
def autotune_cache(tmp_path_factory):
    """The conv autotuner's cache in a folder of the test session's own (subprocesses inherit it), never ~/.cache."""
    os.environ["UNET_JAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("autotune-cache"))


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
