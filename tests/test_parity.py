"""The torch reference and the Flax port agree on every intermediate and every gradient."""

import jax
import pytest
import torch

from parity.__main__ import main
from parity.compare import ACTIVATIONS, TOLERANCES, build_torch_model, compare


def _assert_all_pass(rows):
    failed = [(r.name, r.max_abs, r.max_rel) for r in rows if not r.passed]
    assert not failed, failed


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch", [1, 7, 32])
def test_float64_everything_agrees(seed, batch):
    with jax.enable_x64(True):
        rows = compare(build_torch_model(seed, "float64"), seed=seed, batch=batch, dtype="float64")
    assert not any(r.skipped for r in rows)
    assert [r.name for r in rows[: len(ACTIVATIONS)]] == list(ACTIVATIONS)
    assert len(rows) == len(ACTIVATIONS) + 43  # 43 parameter tensors
    _assert_all_pass(rows)
    assert max(r.max_abs for r in rows if r.metric == "abs") <= TOLERANCES["float64"][0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch", [1, 7, 32])
def test_float32_activations_agree(seed, batch):
    rows = compare(build_torch_model(seed, "float32"), seed=seed, batch=batch, dtype="float32")
    _assert_all_pass([r for r in rows if r.metric == "abs"])


@pytest.mark.parametrize("seed,batch", [(0, 1), (1, 1), (2, 1), (0, 7), (1, 7), (2, 7), (0, 8)])
def test_float32_gradients_agree(seed, batch):
    rows = compare(build_torch_model(seed, "float32"), seed=seed, batch=batch, dtype="float32")
    assert not any(r.skipped for r in rows), "this batch has a max-pool near-tie; pick one without"
    _assert_all_pass(rows)


@pytest.mark.parametrize("conv", ["tapgrad", "im2col", "winograd_tapgrad"])
def test_every_conv_lowering_agrees_through_the_whole_network(conv):
    # Each lowering held to torch through the whole UNet, every intermediate and every parameter
    # gradient (tests/test_layers.py holds them layer by layer); Winograd's transforms add rounding
    # that grows with depth, so its forward is held to float32's tolerances there too (on a batch
    # without a max-pool near-tie). `winograd` has winograd_tapgrad's forward; its autodiff
    # gradients, which no plan picks for training, are held layer by layer.
    with jax.enable_x64(True):
        rows = compare(build_torch_model(1, "float64"), seed=1, batch=2, dtype="float64", conv=conv)
    assert not any(r.skipped for r in rows)
    _assert_all_pass(rows)
    if conv.startswith("winograd"):
        rows = compare(build_torch_model(1, "float32"), seed=1, batch=2, dtype="float32", conv=conv)
        assert not any(r.skipped for r in rows), "this batch has a max-pool near-tie; pick one without"
        _assert_all_pass(rows)


def test_reference_layers_agree_too():
    with jax.enable_x64(True):
        rows = compare(build_torch_model(3, "float64"), seed=3, batch=4, dtype="float64", fast=False)
    _assert_all_pass(rows)


def test_float32_near_tie_skips_only_the_gradients_it_can_reach(capsys):
    # Seed 0 at batch 32 has a max-pool window whose two largest entries differ by 6e-8.
    rows = compare(build_torch_model(0, "float32"), seed=0, batch=32, dtype="float32")
    grads = [r for r in rows if r.name.startswith("grad")]
    skipped = [r for r in grads if r.skipped]
    assert skipped and all("near-tie in encoder.down" in r.skipped for r in skipped)
    assert all(r.name.startswith(("grad encoder.initial_features", "grad encoder.down")) for r in skipped)
    compared = [r for r in grads if not r.skipped]
    assert any(r.name.startswith("grad decoder.") for r in compared)
    assert any(r.name.startswith("grad time_embedding_layer.") for r in compared)
    assert all(r.passed for r in compared) and not any(r.passed for r in skipped)  # a skip is not a pass
    assert main(["--dtype", "float32", "--batch", "32", "--seed", "0"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert any(line == f"{len(rows) - len(skipped)} passed, 0 failed, {len(skipped)} skipped" for line in summary)


def test_cli_passes_in_float64_and_prints_the_table(capsys):
    assert main(["--dtype", "float64", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "| eps_hat | (2, 28, 28, 1) |" in out and "54 passed, 0 failed, 0 skipped" in out


def test_cli_fails_on_a_mismatch(monkeypatch, capsys):
    monkeypatch.setitem(TOLERANCES, "float32", (1e-12, 1e-12))
    assert main(["--dtype", "float32", "--batch", "2"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--seed", "-1"], ["--batch", "0"]])
def test_cli_refuses_a_seed_or_batch_it_cannot_use(flags, capsys):
    with pytest.raises(SystemExit) as info:
        main(flags)
    assert info.value.code == 2 and f"argument {flags[0]}: expected " in capsys.readouterr().err


def test_cli_takes_weights(tmp_path, capsys):
    import torch

    torch.save(build_torch_model(5, "float32").state_dict(), tmp_path / "w.pt")
    assert main(["--weights", str(tmp_path / "w.pt"), "--batch", "2"]) == 0
    # A torch.compile'd model's state_dict prefixes every key; the port strips it, and so does the reference.
    compiled = {"_orig_mod." + k: v for k, v in build_torch_model(5, "float32").state_dict().items()}
    torch.save(compiled, tmp_path / "compiled.pt")
    assert main(["--weights", str(tmp_path / "compiled.pt"), "--batch", "2"]) == 0


def test_compare_leaves_the_callers_model_as_it_was():
    model = build_torch_model(1, "float32")
    with jax.enable_x64(True):
        compare(model, seed=1, batch=2, dtype="float64")
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())
