"""The 3x3 conv autotuner: what it measures, its per-machine cache, and --conv overriding it."""

import json
import os

import jax
import numpy as np
import pytest

from unet_jax import autotune
from unet_jax.layers import CONV_LOWERINGS, ConvPlan
from unet_jax.model import conv_layers, image_conv_shapes, init_variables

FAKE_PLAN = ConvPlan("xla", (("28x28 64->64", "im2col"),))


def _lax_conv(x, kernel):
    """The independent reference: XLA's own same-padded convolution."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("UNET_JAX_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def counted_measure(monkeypatch):
    """autotune.measure replaced by a fast one that counts its calls (the cache logic is under test)."""
    calls = []

    def measure(batch, mode, mesh, dtype="float32", log=print):
        calls.append((batch, mode))
        return FAKE_PLAN, {"28x28 64->64": {"im2col": 1.0, "xla": 2.0}}

    monkeypatch.setattr(autotune, "measure", measure)
    return calls


def test_conv_layers_are_the_unets_convolutions():
    layers = conv_layers()
    assert layers["28x28 64->64"] == ["encoder/down1/model_0/block_0", "decoder/up4/model_1/block_0"]
    assert set(layers) == {"28x28 1->64", "28x28 64->64", "14x14 64->128", "7x7 128->128", "14x14 64->64",
                           "28x28 128->1"}
    # One entry per 3x3 kernel among the parameters but the 3x3 transposed convolution (decoder/up1_0),
    # and the shape key agrees with each kernel.
    params = init_variables(jax.random.key(0))["params"]
    kernels = {"/".join(str(k.key) for k in path[:-1]): leaf.shape
               for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if path[-1].key == "kernel" and leaf.shape[:2] == (3, 3) and len(leaf.shape) == 4}
    del kernels["decoder/up1_0"]
    found = {path: key for key, paths in layers.items() for path in paths}
    assert set(found) == set(kernels)
    for path, key in found.items():
        assert key.endswith(f"{kernels[path][2]}->{kernels[path][3]}")


def test_the_layer_that_reads_the_image_is_timed_without_an_input_gradient():
    # The train step differentiates the parameters, not the image: the first layer's input gradient never runs.
    assert image_conv_shapes() == {"28x28 1->64"}
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    args = autotune._inputs("28x28 1->64", 2, "train", mesh)
    for lowering in ("tapgrad", "im2col"):
        y, _, dkernel = autotune._compile(lowering, args, "train", mesh)(*args)
        y_kernel_only, kernel_only = autotune._compile(lowering, args, "train", mesh, input_gradient=False)(*args)
        assert kernel_only.shape == (3, 3, 1, 64)
        np.testing.assert_allclose(kernel_only, dkernel, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(y_kernel_only, _lax_conv(*args[:2]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lowering", ["xla", "tapgrad"])
def test_a_training_layer_is_timed_with_its_forward_and_both_gradients(lowering):
    # The gradients of a convolution do not read its output: a timed program that returned only
    # them would have XLA drop the forward, and time half the layer.
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    x, kernel, dy = args = autotune._inputs("14x14 64->128", 2, "train", mesh)
    program = autotune._compile(lowering, args, "train", mesh)
    y, vjp = jax.vjp(_lax_conv, x, kernel)
    for got, want in zip(program(*args), (y, *vjp(dy))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    if lowering == "xla":
        # Three convolutions' FLOPs: XLA counts each gradient's at a little under the forward's
        # (their zero border), so the two gradients alone come to under 2x the forward's.
        forward_flops = 2 * x.size * kernel.shape[-1] * 9
        cost = program.cost_analysis()
        assert (cost[0] if isinstance(cost, list) else cost)["flops"] >= 2.5 * forward_flops


# Sampling takes the fastest lowering per layer; training (what a fresh `make train` measures first)
# times each candidate's forward and gradients, and gives up `xla` within XLA_MARGIN of the sum.
@pytest.mark.parametrize("mode", ["sample", "train"])
def test_a_real_measurement_times_every_candidate_and_caches_its_choice(cache_dir, mode):
    plan = autotune.autotune(1, mode, log=lambda *_: None)
    (entry,) = json.loads((cache_dir / "conv_autotune.json").read_text())["entries"].values()
    assert set(entry["ms"]) == set(conv_layers())
    for key, row in entry["ms"].items():
        assert set(row) == set(autotune.CANDIDATES[mode]) and all(ms > 0 for ms in row.values())
        if mode == "sample":
            assert plan.lowering(key) == min(row, key=row.get)
    counts = {key: len(paths) for key, paths in conv_layers().items()}
    assert {key: plan.lowering(key) for key in counts} == autotune.choose(entry["ms"], mode, counts)
    assert ConvPlan.from_json(entry["plan"]) == plan


def test_candidates_are_lowerings_and_cover_each_mode():
    for mode in autotune.MODES:
        assert set(autotune.CANDIDATES[mode]) <= set(CONV_LOWERINGS) and "xla" in autotune.CANDIDATES[mode]
    # Every lowering is a candidate in one mode or the other: none is offered that is never timed.
    assert set(autotune.CANDIDATES["train"]) | set(autotune.CANDIDATES["sample"]) == set(CONV_LOWERINGS)


@pytest.fixture
def sleepers(monkeypatch):
    """Programs that each take a set time on a clock of the test's own: autotune's timings are
    exact, where real sleeps on a loaded machine overran enough to drop a candidate by chance."""
    now = [0.0]
    monkeypatch.setattr(autotune, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: now[0])}))

    def make(calls, **seconds):
        def program(name, s):
            def run():
                calls.append(name)
                now[0] += s
                return jax.numpy.zeros(())
            return run
        return {name: program(name, s) for name, s in seconds.items()}
    return make


def test_candidates_take_turns_and_a_far_slower_one_stops_after_the_first_round(sleepers):
    calls = []
    programs = sleepers(calls, quick=0.002, slow=0.1, close=0.002)
    # The slow one's warm-up (0.1 s) is under min_seconds, too short to skip it on.
    best = autotune._time_side_by_side(programs, (), min_seconds=0.2, max_rounds=3)
    # A warm-up each, then rounds in turn; the slow one (50x) is dropped after round one.
    assert calls[:6] == ["quick", "slow", "close", "quick", "slow", "close"]
    assert calls.count("slow") == 2 and calls.count("quick") == calls.count("close") == 4
    assert best == pytest.approx({"quick": 0.002, "slow": 0.1, "close": 0.002})


def test_a_candidate_within_the_cutoff_is_timed_every_round(sleepers):
    calls = []
    programs = sleepers(calls, quick=0.002, near=0.0039)  # 1.95x, under CUTOFF's 2x
    autotune._time_side_by_side(programs, (), min_seconds=0.2, max_rounds=3)
    assert calls.count("near") == calls.count("quick") == 4


def test_a_long_and_far_slower_warm_up_is_not_timed_again(sleepers):
    calls = []
    programs = sleepers(calls, quick=0.002, slow=0.1, close=0.002)
    best = autotune._time_side_by_side(programs, (), min_seconds=0.05, max_rounds=3)
    assert calls[:3] == ["quick", "slow", "close"] and calls.count("slow") == 1
    assert calls.count("quick") == calls.count("close") == 4
    assert best == pytest.approx({"quick": 0.002, "slow": 0.1, "close": 0.002})


def test_every_candidate_gets_min_rounds_in_orders_that_change(sleepers):
    # A large batch's layers, whose single calls outlast min_seconds, still get MIN_ROUNDS rounds:
    # with one, a burst of load on one call decided the plan. Every other round runs in reverse,
    # so that no candidate always runs right after the same other one.
    calls = []
    programs = sleepers(calls, long=0.06, longer=0.07, longest=0.08)
    best = autotune._time_side_by_side(programs, (), min_seconds=0.05, min_rounds=3)
    assert calls == ["long", "longer", "longest",  # the warm-ups
                     "long", "longer", "longest", "longest", "longer", "long", "long", "longer", "longest"]
    timed = calls[3:]
    for name in programs:
        before = {calls[i + 2] for i, called in enumerate(timed) if called == name}
        assert len(before) >= 2, name
    assert best == pytest.approx({"long": 0.06, "longer": 0.07, "longest": 0.08})
    calls.clear()
    autotune._time_side_by_side(programs, (), min_seconds=0.05, min_rounds=1)
    assert calls == ["long", "longer", "longest"] * 2


def test_one_slow_round_does_not_decide(monkeypatch):
    # tapgrad's first timed call is caught by a burst of load (+50 %); the later rounds find it ahead,
    # though one call outlasts min_seconds.
    now = [0.0]
    monkeypatch.setattr(autotune, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: now[0])}))
    durations = {"tapgrad": iter([0.22, 0.33, 0.22, 0.22]), "xla": iter([0.24, 0.24, 0.24, 0.24])}

    def program(name):
        def run():
            now[0] += next(durations[name])
            return jax.numpy.zeros(())
        return run

    best = autotune._time_side_by_side({name: program(name) for name in durations}, (), min_seconds=0.2)
    assert min(best, key=best.get) == "tapgrad" and best == pytest.approx({"tapgrad": 0.22, "xla": 0.24})


def test_training_gives_up_xla_where_the_whole_network_loses_little_by_it():
    # xla 3 % ahead on the 7x7 layer, as measured once: one xla layer would unroll the trainer's steps.
    near = {"tapgrad": 10.2, "winograd_tapgrad": 11.4, "im2col": 12.0, "xla": 9.9}
    clear = {"tapgrad": 5.0, "xla": 9.9}
    one_each = {"7x7": 1, "28x28": 1, "14x14": 1}
    assert autotune.choose({"7x7": near, "28x28": clear}, "train", one_each) == {"7x7": "tapgrad", "28x28": "tapgrad"}
    assert autotune.choose({"7x7": near}, "sample", one_each) == {"7x7": "xla"}  # forward alone loops at full speed
    # xla 19 % ahead on a small layer is 3 % of the network's convolutions: the loop is kept.
    small = {"tapgrad": 3.2, "im2col": 3.1, "xla": 2.6}
    big = {"tapgrad": 11.6, "winograd_tapgrad": 11.4, "xla": 11.6}
    assert autotune.choose({"7x7": small, "28x28": big}, "train", {"7x7": 2, "28x28": 2}) == {
        "7x7": "im2col", "28x28": "winograd_tapgrad"}
    # Where xla's lead adds up to more than XLA_MARGIN of the whole, it is kept, on that layer alone.
    far = {"tapgrad": 14.0, "im2col": 13.5, "xla": 8.0}
    assert autotune.choose({"7x7": near, "14x14": far}, "train", one_each) == {"7x7": "xla", "14x14": "xla"}
    assert autotune.choose({"28x28": clear, "14x14": far}, "train", one_each) == {"28x28": "tapgrad", "14x14": "xla"}


def test_training_keeps_the_loop_where_layer_timings_put_xla_a_fifth_ahead():
    # Measured on an AVX-512 EPYC at 16 per device (ms, forward and gradients): the plan with xla on
    # three shapes sums to 84.7 ms against 105.9 without it, yet whole steps of the two ran alike.
    table = {"28x28 1->64": {"tapgrad": 3.0, "winograd_tapgrad": 2.4, "im2col": 1.4, "xla": 5.6},
             "28x28 64->64": {"tapgrad": 32.7, "winograd_tapgrad": 33.1, "im2col": 91.1, "xla": 23.4},
             "14x14 64->128": {"tapgrad": 14.4, "winograd_tapgrad": 13.3, "im2col": 17.8, "xla": 13.4},
             "7x7 128->128": {"tapgrad": 7.6, "winograd_tapgrad": 11.6, "im2col": 12.2, "xla": 6.7},
             "14x14 64->64": {"tapgrad": 13.7, "winograd_tapgrad": 7.5, "im2col": 11.4, "xla": 6.7},
             "28x28 128->1": {"tapgrad": 3.1, "winograd_tapgrad": 15.7, "im2col": 4.1, "xla": 9.5}}
    counts = {key: len(paths) for key, paths in conv_layers().items()}
    assert set(table) == set(counts)
    plan = autotune.choose(table, "train", counts)
    assert "xla" not in plan.values() and plan["28x28 64->64"] == "tapgrad"


def test_a_warm_cache_measures_nothing(cache_dir, counted_measure):
    assert autotune.autotune(4, "train", log=lambda *_: None) == FAKE_PLAN
    assert autotune.autotune(4, "train", log=lambda *_: None) == FAKE_PLAN
    assert len(counted_measure) == 1
    autotune.autotune(8, "train", log=lambda *_: None)  # another batch is another measurement
    autotune.autotune(4, "sample", log=lambda *_: None)  # and so is another mode
    autotune.autotune(4, "train", dtype="bfloat16", log=lambda *_: None)  # and another compute dtype
    assert len(counted_measure) == 4


def test_a_batch_past_the_measured_one_is_timed_at_it_and_shares_its_cache_entry(cache_dir, counted_measure, capsys):
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    cap = autotune.MAX_MEASURED_BATCH
    assert autotune.autotune(4 * cap, "train", mesh=mesh) == FAKE_PLAN
    assert counted_measure == [(cap, "train")]  # the global batch measured: the cap on each device
    assert f"batch {cap} per device, standing in for {4 * cap} on 1 device(s)" in capsys.readouterr().out
    assert autotune.autotune(2 * cap, "train", mesh=mesh) == autotune.autotune(cap, "train", mesh=mesh) == FAKE_PLAN
    assert len(counted_measure) == 1  # every batch from the cap up reads the one entry
    autotune.autotune(cap - 1, "train", mesh=mesh, log=lambda *_: None)  # below it, each batch is its own
    assert counted_measure[1:] == [(cap - 1, "train")]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 99, "entries": {}}), json.dumps([1, 2]),
                                     json.dumps({"version": 1, "entries": {"k": {"plan": {"default": "fft"}}}}),
                                     json.dumps({"version": autotune.CACHE_VERSION,
                                                 "entries": {"k": {"plan": {"default": "xla"}, "ms": [1]}}})])
def test_a_corrupt_or_foreign_cache_is_ignored_with_a_warning_and_rewritten(cache_dir, counted_measure, content):
    cache_dir.mkdir()
    (cache_dir / "conv_autotune.json").write_text(content)
    with pytest.warns(UserWarning, match="ignoring the conv autotune cache .*; measuring again") as warned:
        assert autotune.autotune(4, "train", log=lambda *_: None) == FAKE_PLAN
    assert len(warned) == 1  # said once, when it was first read
    assert len(counted_measure) == 1
    cache = json.loads((cache_dir / "conv_autotune.json").read_text())
    assert cache["version"] == autotune.CACHE_VERSION and len(cache["entries"]) == 1


def test_an_unwritable_cache_warns_and_still_gives_the_plan_and_its_timings(tmp_path, monkeypatch, counted_measure,
                                                                             capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("UNET_JAX_CACHE_DIR", str(blocker / "cache"))  # a folder under a file
    with pytest.warns(UserWarning, match="could not write the conv autotune cache"):
        assert autotune.autotune(4, "train", log=lambda *_: None) == FAKE_PLAN
    with pytest.warns(UserWarning, match="could not write the conv autotune cache"):
        autotune.main(["--batch", "4"])  # the table shows what was measured, not what the cache holds
    assert "|  |  | 1.0 | 2.0 | im2col |" in capsys.readouterr().out


def test_two_runs_that_measure_at_once_both_keep_their_entries(cache_dir, monkeypatch):
    def measure_while_another_run_writes(batch, mode, mesh, dtype="float32", log=print):
        autotune._add_to_cache(autotune.cache_path(), "another run's key", {"plan": ConvPlan("xla").to_json(), "ms": {}})
        return FAKE_PLAN, {}

    monkeypatch.setattr(autotune, "measure", measure_while_another_run_writes)
    autotune.autotune(4, "train", log=lambda *_: None)
    entries = json.loads((cache_dir / "conv_autotune.json").read_text())["entries"]
    assert len(entries) == 2 and "another run's key" in entries


def test_the_cache_is_read_again_and_rewritten_under_a_lock(cache_dir):
    import fcntl
    import threading

    cache_dir.mkdir()
    path = autotune.cache_path()
    with open(path + ".lock", "a") as held:  # another run, in the middle of its own rewrite
        fcntl.flock(held, fcntl.LOCK_EX)
        writer = threading.Thread(target=autotune._add_to_cache, args=(path, "key", {"plan": {"default": "xla"}}))
        writer.start()
        writer.join(timeout=0.5)
        assert writer.is_alive() and not os.path.exists(path), "the cache was rewritten while another run held it"
    writer.join(timeout=30)
    assert not writer.is_alive() and "key" in json.loads(open(path).read())["entries"]


def test_conv_flag_overrides_the_cache(cache_dir, counted_measure):
    assert autotune.resolve("auto", 4, log=lambda *_: None) == FAKE_PLAN
    for name in CONV_LOWERINGS:
        assert autotune.resolve(name, 4) == ConvPlan(name)
    assert len(counted_measure) == 1
    with pytest.raises(ValueError, match="expected --conv in"):
        autotune.resolve("fft", 4)


def test_the_cache_key_names_the_machine_and_the_measurement():
    key = autotune.machine_key(64, "train", 2)
    assert f"jax {jax.__version__}" in key and "2 device(s)" in key and "batch 64 per device" in key
    assert "| cpu |" in key and "flags " in key
    assert autotune.machine_key(64, "sample", 2) != key and autotune.machine_key(32, "train", 2) != key
    assert key.endswith("| float32") and autotune.machine_key(64, "train", 2, "bfloat16") != key


def test_a_bfloat16_run_times_the_lowerings_in_bfloat16():
    # The lowerings rank differently in bfloat16 (XLA:CPU converts its convolution's, not the matmuls').
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    for mode, count in (("train", 3), ("sample", 2)):
        arrays = autotune._inputs("7x7 128->128", 2, mode, mesh, "bfloat16")
        assert len(arrays) == count and {a.dtype for a in arrays} == {jax.numpy.dtype("bfloat16")}


def test_autotune_cli_prints_the_table(cache_dir, counted_measure, capsys):
    autotune.main(["--batch", "4"])
    out = capsys.readouterr().out
    assert "| layer shape | layers | tapgrad | winograd_tapgrad | im2col | xla | chosen |" in out  # train's candidates
    assert "| 28x28 64->64 | encoder/down1/model_0/block_0, decoder/up4/model_1/block_0 |  |  | 1.0 | 2.0 | im2col |" in out
    assert os.path.exists(cache_dir / "conv_autotune.json") and "from the cache" not in out
    autotune.main(["--batch", "4"])
    assert "ms per call, from the cache:" in capsys.readouterr().out


def test_autotune_cli_refuses_a_batch_below_one(capsys):
    with pytest.raises(SystemExit) as info:
        autotune.main(["--batch", "0"])
    assert info.value.code == 2 and "argument --batch: expected a positive finite number, got 0" in capsys.readouterr().err
