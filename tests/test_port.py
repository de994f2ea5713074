"""torch_to_flax / flax_to_torch: exactness, strictness, dtypes, files and their dangers."""

import os
import pickle
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from parity import CheckpointMismatchError, flax_to_torch, torch_to_flax
from parity.port import LAYERS, torch_shapes
from unet_jax import init_variables
from unet_torch import Unet as TorchUnet
from unet_torch.weights import load_state_dict


@pytest.fixture(scope="module")
def state_dict():
    torch.manual_seed(0)
    return TorchUnet().state_dict()


def test_table_covers_the_tutorials_state_dict_in_order(state_dict, tutorial_namespace):
    tutorial = tutorial_namespace["Unet"]().state_dict()
    assert list(state_dict) == list(tutorial)
    assert {k: tuple(v.shape) for k, v in tutorial.items()} == torch_shapes()
    assert len(LAYERS) == 22


def test_tutorial_state_dict_loads_strictly_both_ways(tutorial_namespace):
    tutorial_model = tutorial_namespace["Unet"]()
    ours = TorchUnet()
    ours.load_state_dict(tutorial_model.state_dict(), strict=True)
    tutorial_namespace["Unet"]().load_state_dict(ours.state_dict(), strict=True)
    ported_back = flax_to_torch(torch_to_flax(tutorial_model.state_dict()))
    tutorial_namespace["Unet"]().load_state_dict(ported_back, strict=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_round_trip_is_bit_identical(state_dict, dtype):
    with jax.enable_x64(True):
        source = {k: v.to(dtype) for k, v in state_dict.items()}
        variables = torch_to_flax(source)
        assert all(leaf.dtype == np.dtype(ml_dtypes.bfloat16 if dtype == torch.bfloat16 else str(dtype)[6:])
                   for leaf in jax.tree.leaves(variables))
        back = flax_to_torch(variables)
    assert list(back) == list(source)
    for key in source:
        assert back[key].dtype == dtype
        assert torch.equal(back[key].view(torch.uint8) if dtype != torch.float32 else back[key],
                           source[key].view(torch.uint8) if dtype != torch.float32 else source[key]), key


def test_float64_becomes_float32_without_x64(state_dict):
    variables = torch_to_flax({k: v.double() for k, v in state_dict.items()})
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {np.dtype("float32")}


def test_numpy_state_dict_and_tree_shape(state_dict):
    variables = torch_to_flax({k: v.numpy() for k, v in state_dict.items()})
    expected = jax.tree.map(lambda a: a.shape, init_variables(jax.random.key(0)))
    assert jax.tree.map(lambda a: a.shape, variables) == expected
    np.testing.assert_array_equal(variables["params"]["decoder"]["up2"]["model_0"]["kernel"],
                                  state_dict["decoder.up2.model.0.weight"].numpy().transpose(2, 3, 1, 0))


def test_mismatches_are_listed_together(state_dict):
    broken = dict(state_dict)
    del broken["decoder.out.bias"]
    broken["decoder.extra.weight"] = torch.zeros(3)
    broken["encoder.down1.model.0.block.0.weight"] = torch.zeros(64, 64, 5, 5)
    with pytest.raises(CheckpointMismatchError) as info:
        torch_to_flax(broken)
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "missing: decoder.out.bias (expected shape (1,))" in message
    assert "unexpected: decoder.extra.weight (shape (3,))" in message
    assert "wrong shape: encoder.down1.model.0.block.0.weight: expected (64, 64, 3, 3), found (64, 64, 5, 5)" in message


def test_flax_side_is_strict_too(state_dict):
    params = torch_to_flax(state_dict)["params"]
    params["decoder"]["out"]["kernel"] = np.zeros((3, 3, 64, 1), np.float32)
    with pytest.raises(CheckpointMismatchError, match=r"wrong shape: decoder/out/kernel: expected \(3, 3, 128, 1\)"):
        flax_to_torch({"params": params})


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_wrapper_prefixes_are_stripped(state_dict, prefix):
    wrapped = {prefix + k: v for k, v in state_dict.items()}
    back = flax_to_torch(torch_to_flax(wrapped))
    assert all(torch.equal(back[k], state_dict[k]) for k in state_dict)


def test_training_checkpoint_gets_a_hint(state_dict):
    with pytest.raises(CheckpointMismatchError, match=r"pass checkpoint\['state_dict'\]"):
        torch_to_flax({"state_dict": state_dict, "epoch": 3})


def test_pt_and_safetensors_files(state_dict, tmp_path):
    torch.save(state_dict, tmp_path / "model.pt")
    save_file(dict(state_dict), str(tmp_path / "model.safetensors"))
    for name in ("model.pt", "model.safetensors"):
        back = flax_to_torch(torch_to_flax(tmp_path / name))
        assert all(torch.equal(back[k], state_dict[k]) for k in state_dict)




class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"encoder.initial_features.0.weight": _Exploit(marker)}, f)
    torch.save({"payload": _Exploit(marker)}, tmp_path / "evil_zip.pt")
    for p in (path, tmp_path / "evil_zip.pt"):
        with pytest.raises(ValueError, match="refusing to load"):
            load_state_dict(p)
    assert not marker.exists()


def test_ci_fails_rather_than_skips_without_the_tutorial(tmp_path):
    """The checks against the tutorial's own code may skip on a user's clone, never in CI. The fixture is
    run from this suite's conftest by a one-line test of its own, in a pytest that imports neither torch nor JAX."""
    assert "export UNET_JAX_REQUIRE_TUTORIAL=1" in open(os.path.join(os.path.dirname(__file__), "..", ".ci", "run")).read()
    (tmp_path / "test_uses_the_tutorial.py").write_text("def test_it(tutorial_namespace):\n    pass\n")
    base = dict(os.environ, UNET_JAX_TUTORIAL=str(tmp_path / "missing.txt"))
    base.pop("UNET_JAX_REQUIRE_TUTORIAL", None)
    for env, outcome in ((base, "1 skipped"), (dict(base, UNET_JAX_REQUIRE_TUTORIAL="1"), "1 error")):
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "-p", "conftest",
                               "--rootdir", str(tmp_path), str(tmp_path)], env=env, capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=300)
        assert outcome in done.stdout and "missing.txt" in done.stdout, done.stdout[-2000:]
