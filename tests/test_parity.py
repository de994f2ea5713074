"""The torch reference and the Flax port agree on every intermediate and every gradient."""

import jax
import numpy as np
import pytest
import torch

from parity.__main__ import main
from parity.compare import ACTIVATIONS, TOLERANCES, build_torch_model, compare, decisions_that_differ, upstream_of


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
def test_float32_everything_agrees_where_both_sides_decide_alike(seed):
    # Batch 32 has ReLU inputs and max-pool windows within float32 rounding of their kinks (seed 2,
    # a ReLU input of 2e-7 in decoder.up4; seed 0, two window entries 6e-8 apart), which one side may
    # decide otherwise than the other: those gradients may be skipped, naming the layer; every
    # activation and every other gradient is held. (Batches 1 and 7: test_float32_gradients_agree.)
    rows = compare(build_torch_model(seed, "float32"), seed=seed, batch=32, dtype="float32")
    _assert_all_pass([r for r in rows if not r.skipped])
    assert not any(r.skipped for r in rows[: len(ACTIVATIONS)])
    assert all(r.skipped.startswith(("ReLU ", "max-pool ")) for r in rows if r.skipped)
    # A skipped gradient still differs only by what one element's other route adds: seed 2's ReLU
    # moved the skipped rows by 2.1e-4 of their norm at most; a wrong port moves them by order 1.
    assert all(r.max_rel <= 1e-2 for r in rows if r.skipped)
    assert not any(r.skipped for r in rows if r.name.startswith("grad decoder.out."))  # after every decision


@pytest.mark.parametrize("seed,batch", [(0, 1), (1, 1), (2, 1), (0, 7), (1, 7), (2, 7), (0, 8)])
def test_float32_gradients_agree(seed, batch):
    rows = compare(build_torch_model(seed, "float32"), seed=seed, batch=batch, dtype="float32")
    assert not any(r.skipped for r in rows), "a ReLU or max-pool decided otherwise here; pick another batch"
    _assert_all_pass(rows)


@pytest.mark.parametrize("conv", ["tapgrad", "im2col", "winograd_tapgrad"])
def test_every_conv_lowering_agrees_through_the_whole_network(conv):
    # Each lowering held to torch through the whole UNet, every intermediate and every parameter
    # gradient (tests/test_layers.py holds them layer by layer); Winograd's transforms add rounding
    # that grows with depth, so its forward is held to float32's tolerances there too (on a batch
    # where both sides decide every ReLU and max-pool alike). `winograd` has winograd_tapgrad's forward; its autodiff
    # gradients, which no plan picks for training, are held layer by layer.
    with jax.enable_x64(True):
        rows = compare(build_torch_model(1, "float64"), seed=1, batch=2, dtype="float64", conv=conv)
    assert not any(r.skipped for r in rows)
    _assert_all_pass(rows)
    if conv.startswith("winograd"):
        rows = compare(build_torch_model(1, "float32"), seed=1, batch=2, dtype="float32", conv=conv)
        assert not any(r.skipped for r in rows), "a ReLU or max-pool decided otherwise here; pick another batch"
        _assert_all_pass(rows)


def test_reference_layers_agree_too():
    with jax.enable_x64(True):
        rows = compare(build_torch_model(3, "float64"), seed=3, batch=4, dtype="float64", fast=False)
    _assert_all_pass(rows)


def test_a_decision_that_differs_is_found_and_named():
    rng = np.random.default_rng(0)
    relu_in = rng.standard_normal((2, 14, 14, 128))
    relu_in[1, 3, 4, 5] = 2e-7  # within float32 rounding of the kink
    pool_in = np.maximum(rng.standard_normal((2, 14, 14, 128)), 0)
    pool_in[0, 2:4, 6:8, 9] = [[0.5, 0.5 + 6e-8], [0.1, 0.2]]
    torch_inputs = {"encoder.down3.model.0.block.2": relu_in, "encoder.down2.model.1": pool_in}
    ours = {"encoder.down3.model.0.block.1": relu_in.copy(), "encoder.down2.model.0.block.1": pool_in.copy()}
    assert decisions_that_differ(torch_inputs, ours) == {}
    ours["encoder.down3.model.0.block.1"][1, 3, 4, 5] = -1e-7
    ours["encoder.down2.model.0.block.1"][0, 2, 7, 9] = 0.5 - 1e-8  # the first 0.5 wins instead
    differ = decisions_that_differ(torch_inputs, ours)
    assert differ == {
        "encoder.down3.model.0.block.2": "ReLU encoder.down3.model.0.block.2 takes 1 input(s) on the other side of 0 "
                                         "(torch's closest: 2.0e-07)",
        "encoder.down2.model.1": "max-pool encoder.down2.model.1 picks another winner in 1 window(s) "
                                 "(torch's closest two: 6.0e-08 apart)"}


def test_every_relu_and_max_pool_of_the_torch_model_is_a_decision_that_is_read():
    from parity.compare import POOL_AFTER, RELU_AFTER

    modules = dict(build_torch_model(0, "float32").named_modules())
    relus = {name for name, m in modules.items() if isinstance(m, torch.nn.ReLU)}
    pools = {name for name, m in modules.items() if isinstance(m, torch.nn.MaxPool2d)}
    assert relus - set(RELU_AFTER) == {"encoder.down4.1"} and pools == set(POOL_AFTER)  # down4.1: after an average
    assert all(isinstance(modules[gn], torch.nn.GroupNorm) for gn in [*RELU_AFTER.values(), *POOL_AFTER.values()])


def test_a_decision_reaches_the_gradients_of_its_stage_and_of_every_stage_before_it():
    names = list(build_torch_model(0, "float32").state_dict())
    encoder = upstream_of("encoder.down2.model.1", names)
    assert encoder == [n for n in names if n.startswith(("encoder.initial_features.", "encoder.down1.", "encoder.down2."))]
    decoder = upstream_of("decoder.up4.model.1.block.2", names)  # the encoder and time embedding feed the decoder
    assert set(names) - set(decoder) == {"decoder.out.weight", "decoder.out.bias"}


def test_a_skipped_gradient_is_reported_and_never_counted_as_passed(monkeypatch, capsys):
    from parity import compare as compare_module

    what = "max-pool encoder.down2.model.1 picks another winner in 1 window(s) (torch's closest two: 6.0e-08 apart)"
    monkeypatch.setattr(compare_module, "decisions_that_differ", lambda *args: {"encoder.down2.model.1": what})
    rows = compare(build_torch_model(1, "float32"), seed=1, batch=2, dtype="float32")
    skipped = [r.name.removeprefix("grad ") for r in rows if r.skipped]
    assert skipped == upstream_of("encoder.down2.model.1", [r.name.removeprefix("grad ") for r in rows[len(ACTIVATIONS):]])
    assert all(r.skipped == what and not r.passed and not r.failed for r in rows if r.skipped)
    assert main(["--dtype", "float32", "--batch", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{len(rows) - len(skipped)} passed, 0 failed, {len(skipped)} skipped" in out
    assert f"skip: {what}" in out


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
