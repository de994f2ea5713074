"""`python -m benchmarks` end to end, at toy sizes: every row is measured and the table is written."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from benchmarks.machine import describe, machine_name


@pytest.mark.slow
def test_bench_writes_its_json_and_table(tmp_path, warm_autotune_cache):
    # auto's plan is tapgrad, so the row of tapgrad alone is the same program, compiled once (and its
    # 5 steps compile as a loop; every lowering is compiled and checked in tests/test_layers.py).
    env = warm_autotune_cache(tmp_path / "autotune", train="tapgrad", sample="xla")
    command = [sys.executable, "-m", "benchmarks", "--batches", "4", "--repeats", "1", "--images-per-repeat", "4",
               "--ddim-images", "2", "--ddpm-images", "0", "--dtypes", "float32", "--skip-compile", "--out", str(tmp_path),
               "--conv", "tapgrad", "--conv-batches", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    if jax.default_backend() == "cpu":  # elsewhere auto is XLA's convolution without a cache
        assert "3x3 conv lowerings, train, batch 4: tapgrad" in done.stdout  # the cache's plan, not a measurement
        assert "timing the 3x3 conv lowerings" not in done.stdout
    (json_path,) = tmp_path.glob("*.json")
    result = json.loads(json_path.read_text())
    assert json_path.stem == machine_name(result["machine"])
    assert result["matmul_peak_gflops"] > 0
    rows = {(r["case"], r["impl"]): r for r in result["rows"]}
    expected = {("train step", "jax-jit"), ("train step", "jax-jit 1 step/dispatch"), ("train step", "torch eager"),
                ("train step", "jax-jit conv=tapgrad"),
                ("DDIM-100 sampling", "jax-jit"), ("DDIM-100 sampling", "torch eager")}
    if len(os.sched_getaffinity(0)) > 1:  # a device per core, and the one-device row beside it
        expected.add(("train step", "jax-jit 1 step/dispatch, 1 device"))
    assert set(rows) == expected
    assert result["machine"]["cpu_kind"] in json_path.stem  # avx2 and avx512 results never overwrite each other
    # Every train-step row counts the same direct-convolution FLOPs, whatever its lowering.
    jax_rows = [r for r in result["rows"] if r["case"] == "train step" and r["impl"].startswith("jax-jit")]
    assert len(jax_rows) >= 3
    assert all(r["flops"] == pytest.approx(jax_rows[0]["flops"], rel=1e-6) for r in jax_rows)  # per step, any program
    for row in result["rows"]:
        assert row["images_per_s"] > 0
        # The ratio is eager's time over the row's, in the same run and case (the table's headline).
        eager = rows[(row["case"], "torch eager")]
        assert row["speedup_vs_eager"] == pytest.approx(eager["ms"] / row["ms"], rel=0.01)
    assert rows[("train step", "jax-jit")]["gflops"] > 0  # from XLA's cost analysis
    table = json_path.with_suffix(".md").read_text()
    assert "| train step | 4 | float32 | jax-jit |" in table and table in done.stdout


def test_two_generations_of_one_named_cpu_keep_their_own_results_files():
    # A virtual machine names both AVX-512 EPYC generations "AMD EPYC"; their family and model differ.
    zen4 = {"cpu": "AMD EPYC", "cores": 2, "cpu_kind": "avx512", "cpu_family": 25, "cpu_model": 17}
    zen5 = {**zen4, "cpu_family": 26, "cpu_model": 2}
    assert machine_name(zen5) == "cpu-2core-amd-epyc-avx512-family26-model2" != machine_name(zen4)
    assert describe(zen5) == "AMD EPYC (avx512, x86 family 26 model 2)"
    # Results written before the family was recorded keep the names they were written under.
    older = {key: zen4[key] for key in ("cpu", "cores", "cpu_kind")}
    assert machine_name(older) == "cpu-2core-amd-epyc-avx512"


def test_the_rows_of_a_case_take_turns_and_report_ms_per_call(monkeypatch):
    from benchmarks import timing

    now, calls = [0.0], []

    def case(name, seconds_per_repeat, calls_per_repeat):
        def run():
            calls.append(name)
            now[0] += seconds_per_repeat.pop(0)
        return timing.Case(run, lambda: None, calls_per_repeat, {"compile_s": 1.0})

    monkeypatch.setattr(timing, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: now[0])}))
    # A burst of load in round two slows both rows alike: their ratio stays 2, and so do the medians'.
    cases = {"jax": case("jax", [0.5, 5.0, 0.6], 5), "torch": case("torch", [1.0, 10.0, 1.2], 5)}
    result = timing.time_in_turns(cases, repeats=3)
    assert calls == ["jax", "torch"] * 3
    assert result["jax"] == pytest.approx({"ms": 120.0, "ms_min": 100.0, "ms_max": 1000.0, "repeats": 3, "compile_s": 1.0})
    assert result["torch"]["ms"] == pytest.approx(2 * result["jax"]["ms"])


def _run(*args, env=None):
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_conv_microbenchmark_prints_its_rows():
    out = _run("benchmarks.conv", "--batch", "2", "--size", "8", "--channels", "8", "--repeats", "1")
    assert "| XLA, 1 cpu device |" in out and "| torch (oneDNN), 1 thread |" in out
    assert "| XLA, 1 cpu device, --conv tapgrad |" in out and "| XLA, 1 cpu device, --conv winograd |" in out


def test_an_op_that_xla_added_counts_for_the_layer_whose_value_it_copies():
    from benchmarks.profile import instructions

    made = "jit(train_steps)/transpose(jvp(Unet))/Unet.intermediates/encoder/down1/model_0/block_0/transpose"
    program = instructions(f"""
  %bitcast_transpose_fusion = f32[8,64,2,30,30]{{1,4,3,2,0}} fusion(%pad), kind=kLoop, metadata={{op_name="{made}"}}
  %wrapped_copy.2 = f32[8,64,2,30,30]{{4,3,2,1,0}} fusion(%bitcast_transpose_fusion), kind=kLoop
  %copy.3 = f32[8,64,2,30,30]{{4,3,2,1,0}} copy(%wrapped_copy.2)
  ROOT %tuple.1 = (f32[2]{{0}}, f32[2]{{0}}) tuple(%p.0, %p.1)
  %p.0 = f32[2]{{0}} parameter(0)""")
    assert program["wrapped_copy.2"] == ("fusion", made) and program["copy.3"] == ("copy", made)  # a chain of them too
    assert program["tuple.1"] == ("tuple", "")  # a parameter names no layer


def test_profile_sums_the_step_by_kind_of_op(tmp_path, warm_autotune_cache):
    env = warm_autotune_cache(tmp_path / "autotune", train="tapgrad", sample="xla")  # auto's plan, not measured
    # As the trainer runs: a device per core, whose all-reduce only a run on several shows; 5 steps per
    # dispatch, as the benchmark's jax-jit row above, whose program the compilation cache then holds.
    out = _run("benchmarks.profile", "--batch", "2", "--devices", "2", "--steps-per-dispatch", "5", "--dispatches", "1",
               "--top", "1000", env=dict(env, XLA_FLAGS=""))
    assert "3x3 conv lowerings: tapgrad" in out and "batch 2 per device on 2 cpu device(s)" in out
    assert "| all-reduce, and waiting there for the other devices |" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and line.endswith("% |")]
    shares = {row[0].lstrip("| "): float(row[2].rstrip(" %|")) for row in rows}
    # The convolutions are found (the trace format is read right).
    assert shares["library calls: convolutions, matmuls (and a few reductions)"] > 20
    assert "minor page faults" in out
    # By layer: the op metadata names the modules, forward and backward apart, and every op is
    # counted once (a loop's own time, which holds its body's ops, is left out).
    layers = {row[0].lstrip("| "): row for row in (line.split(" | ") for line in out.splitlines())
              if len(row) == 6 and row[-1].endswith("% |") and row[0] != "| layer"}
    conv = layers["encoder/down1/model_0/block_0"]
    assert conv[1] == "Conv3x3" and float(conv[3]) > 0 and float(conv[4]) > 0
    assert layers["decoder/up4/model_1/block_1"][1] == "GroupNorm"
    assert "outside the model: data, loss, all-reduce, Adam, EMA" in layers
    total = float(re.search(r"per dispatch: ([\d.]+) ms of XLA ops", out).group(1))
    assert sum(float(row[2]) for row in layers.values()) == pytest.approx(total, rel=0.05, abs=1)
    slowest = out.split("| slowest ops |")[1]
    assert "| ynn_fusion" in slowest and "| while" not in slowest  # the tap gradient's loop, left out


def test_profile_says_in_one_line_what_devices_it_cannot_have(tmp_path):
    from benchmarks import profile

    with pytest.raises(SystemExit) as info:
        profile.main(["--devices", "0"])
    assert info.value.code == 2
    too_many = len(jax.devices()) + 1
    with pytest.raises(SystemExit, match=rf"^error: --devices {too_many}: this process has {too_many - 1} cpu device"):
        profile.profile_step(2, 1, 1, str(tmp_path), "tapgrad", device_count=too_many)


def test_the_benchmarks_refuse_bad_flags_in_one_line_before_measuring(tmp_path, capsys):
    import importlib

    from benchmarks import profile, scaling

    bench = importlib.import_module("benchmarks.__main__")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for main, flags, message in (
            (bench.main, ["--out", str(blocker / "results")], f"cannot make the results folder {blocker / 'results'}"),
            (bench.main, ["--repeats", "0"], "argument --repeats: expected a positive finite number, got 0"),
            (bench.main, ["--batches", "32", "0"], "argument --batches: expected a positive finite number, got 0"),
            (scaling.main, ["--steps", "20"], "--steps 20 must cover at least two --log-every 20 windows"),
            (scaling.main, ["--batch-size", "12"], "--batch-size 12 must be a multiple of 8, to split over every"),
            (profile.main, ["--dispatches", "0"], "argument --dispatches: expected a positive finite number, got 0")):
        with pytest.raises(SystemExit) as info:
            main(flags)
        assert info.value.code == 2 and message in capsys.readouterr().err, flags


def test_a_scaling_run_that_fails_is_named_in_one_line(monkeypatch):
    from benchmarks import scaling

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the 4 devices are simulated host devices, on any machine
    # The trainer itself refuses the run: its own last line is quoted, not a traceback of the benchmark.
    with pytest.raises(scaling.ScalingRunError, match=r"^the trainer in 1 process\(es\) x 4 device\(s\) failed "
                                                      r"\(rc 1\): error: --batch-size 6 does not split evenly"):
        scaling.train_throughput(1, 4, ["--batch-size", "6", "--steps", "2"], timeout_s=120)


def test_results_that_cannot_be_written_end_in_one_line(tmp_path):
    from benchmarks.results_folder import write_results

    write_results(str(tmp_path), "machine", {"rows": []}, "| table |")
    assert json.loads((tmp_path / "machine.json").read_text()) == {"rows": []}
    assert (tmp_path / "machine.md").read_text() == "| table |\n"
    gone = tmp_path / "removed-during-the-run"
    with pytest.raises(SystemExit, match=f"^error: writing the results to {gone} failed .*; the table above holds them$"):
        write_results(str(gone), "machine", {"rows": []}, "| table |")
