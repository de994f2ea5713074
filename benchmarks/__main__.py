"""python -m benchmarks: jit-compiled JAX against eager torch and torch.compile, side by side.

One run times, on this machine: the train step (forward, backward, Adam, EMA; same loss,
same real digits) at several batch sizes, the trainer's program with the 3x3 conv lowerings
it would choose (``--conv auto``) and with each lowering alone, and DDIM-100 / DDPM-1000
sampling; GFLOP/s count the direct convolution's FLOPs (XLA's count of the ``xla``
lowering) whatever the lowering, so Winograd may pass the matmul peak; with
warm-up and compilation excluded (compile time reported apart), clocks read after a sync,
the implementations of a case timed in turns, one repeat each per round, medians of the
repeats with min-max spread, torch given the same threads, TF32 off on both
sides on GPU. Writes benchmarks/results/<machine>.json and .md (the machine's name says its
CPU kind, e.g. ...-avx2) and prints the table.
"""

import argparse
import sys

from unet_jax import devices

devices.use_all_cpu_cores()  # before JAX creates its backends

import jax  # noqa: E402

from ddpm_recipe.weights import TorchNotInstalledError, import_torch  # noqa: E402

try:
    torch = import_torch("python -m benchmarks (it times torch beside JAX)")
except TorchNotInstalledError as error:
    raise SystemExit(f"error: {error}") from None

from benchmarks import jax_bench, torch_bench  # noqa: E402
from benchmarks.machine import cpu_has_bfloat16, describe, machine, machine_name  # noqa: E402
from benchmarks.results_folder import RESULTS, writable_folder, write_results  # noqa: E402
from benchmarks.timing import time_in_turns  # noqa: E402
from ddpm_recipe.settings import non_negative, positive  # noqa: E402
from unet_jax import autotune, data  # noqa: E402
from unet_jax.train import Config  # noqa: E402

STEPS_PER_DISPATCH = Config().steps_per_dispatch


def run(args) -> dict:
    gpu = torch.cuda.is_available() and jax.default_backend() == "gpu"
    device = "cuda" if gpu else "cpu"
    torch.set_num_threads(devices.usable_cores())
    if gpu:  # like with like: full float32 on both sides
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        jax.config.update("jax_default_matmul_precision", "highest")
    images = data.load_bundled("train").images
    dtypes = args.dtypes or (["float32", "bfloat16"] if gpu or cpu_has_bfloat16() else ["float32"])
    compile_modes = ["max-autotune", "reduce-overhead"] if gpu else ["default"]
    rows = []

    peak = jax_bench.matmul_peak_gflops()
    print(f"float32 matmul peak: {peak:.0f} GFLOP/s", flush=True)

    for dtype in dtypes:
        for batch in args.batches:
            steps = max(1, args.images_per_repeat // batch)
            # The trainer's own program: Config().steps_per_dispatch steps per dispatch, all devices,
            # the 3x3 conv lowerings that --conv auto picks for this batch (measured or cached).
            mesh = devices.data_mesh(batch)
            plan = autotune.resolve("auto", batch // mesh.devices.size, "train", mesh=mesh, dtype=dtype)
            print(f"3x3 conv lowerings, train, batch {batch}: {plan.describe()}", flush=True)
            common = dict(steps_per_repeat=steps)
            one = dict(common, direct_flops=jax_bench.direct_flops(images, batch, dtype))
            program = dict(one, steps_per_dispatch=STEPS_PER_DISPATCH)
            cases = [("jax-jit", lambda: jax_bench.train_step_case(
                images, batch, dtype, all_devices=True, conv=plan, **program))]
            if dtype == "float32" and batch in args.conv_batches:  # each lowering alone
                cases += [(f"jax-jit conv={name}", lambda name=name: jax_bench.train_step_case(
                    images, batch, dtype, all_devices=True, conv=name, **program))
                          for name in args.conv if name != "auto"]
            if dtype == "float32":  # what the dispatch size and the per-core devices each bring
                cases.append(("jax-jit 1 step/dispatch", lambda: jax_bench.train_step_case(
                    images, batch, dtype, all_devices=True, conv=plan, **one)))
                if not gpu and len(jax.devices()) > 1:
                    single = jax.sharding.Mesh(jax.devices()[:1], ("data",))
                    single_plan = autotune.resolve("auto", batch, "train", mesh=single)
                    cases.append(("jax-jit 1 step/dispatch, 1 device", lambda: jax_bench.train_step_case(
                        images, batch, dtype, all_devices=False, conv=single_plan, **one)))
            cases.append(("torch eager", lambda: torch_bench.train_step_case(images, batch, dtype, compiled=None, device=device, **common)))
            for mode in compile_modes:
                if not args.skip_compile:
                    cases.append((f"torch.compile {mode}", lambda mode=mode: torch_bench.train_step_case(
                        images, batch, dtype, compiled=mode, device=device, **common)))
            rows += _measure("train step", batch, dtype, cases, args.repeats, peak)

    for sampler, steps, num in (("ddim", 100, args.ddim_images), ("ddpm", 1000, args.ddpm_images)):
        if num == 0:
            continue
        mesh = devices.data_mesh(num)
        plan = autotune.resolve("auto", num // mesh.devices.size, "sample", mesh=mesh)
        cases = [("jax-jit", lambda: jax_bench.sample_case(num, sampler, steps, conv=plan))]
        if plan != autotune.ConvPlan("xla"):
            cases.append(("jax-jit conv=xla", lambda: jax_bench.sample_case(num, sampler, steps, conv="xla")))
        cases.append(("torch eager",
                      lambda: torch_bench.sample_case(num, sampler, steps, compiled=None, device=device)))
        if not args.skip_compile:
            cases += [(f"torch.compile {m}", lambda m=m: torch_bench.sample_case(num, sampler, steps, compiled=m, device=device))
                      for m in compile_modes]
        rows += _measure(f"{sampler.upper()}-{steps} sampling", num, "float32", cases, args.sample_repeats, peak)
    return {"machine": machine(), "matmul_peak_gflops": peak, "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
            "rows": rows}


def _measure(case: str, batch: int, dtype: str, cases, repeats: int, peak: float) -> list[dict]:
    """Rows of one case: every implementation compiled and warmed up first, then timed in turns."""
    prepared = {}
    for impl, prepare in cases:
        prepared[impl] = prepare()
        print(f"{case:>22} b={batch:<4} {dtype:9} {impl:34} compiled in {prepared[impl].info['compile_s']:.1f} s",
              flush=True)
    rows = []
    for impl, result in time_in_turns(prepared, repeats).items():
        row = {"case": case, "impl": impl, "batch": batch, "dtype": dtype, **result,
               "images_per_s": batch / (result["ms"] / 1e3)}
        if result.get("flops"):
            row["gflops"] = result["flops"] / (result["ms"] / 1e3) / 1e9
            row["frac_of_peak"] = row["gflops"] / peak
        rows.append(row)
        print(f"{case:>22} b={batch:<4} {dtype:9} {impl:34} {result['ms']:9.1f} ms", flush=True)
    eager = next((r["ms"] for r in rows if r["impl"] == "torch eager"), None)
    for row in rows:
        row["speedup_vs_eager"] = eager / row["ms"] if eager else None
    return rows


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {describe(m)}, {m['cores']} cores, JAX {m['jax']} ({m['backend']}, "
             f"{m['jax_devices']} device(s)), torch {m['torch']}, Python {m['python']}. "
             f"float32 matmul peak measured in the same run: {result['matmul_peak_gflops']:.0f} GFLOP/s. "
             f"Command: `{result['command'].strip()}`. GFLOP/s: the FLOPs of a direct-convolution step (XLA's "
             "count with its own convolutions) over the time, for every lowering.", "",
             "| case | batch | dtype | implementation | ms (median) | spread (min-max) | images/s | × eager torch | GFLOP/s (% of peak) | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        flops = f"{r['gflops']:.0f} ({100 * r['frac_of_peak']:.0f}%)" if r.get("gflops") else ""
        speed = f"{r['speedup_vs_eager']:.2f}×" if r.get("speedup_vs_eager") else ""
        lines.append(f"| {r['case']} | {r['batch']} | {r['dtype']} | {r['impl']} | {r['ms']:.1f} | "
                     f"{r['ms_min']:.1f}-{r['ms_max']:.1f} | {r['images_per_s']:.0f} | {speed} | {flops} | {r.get('compile_s', 0):.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=positive(int), nargs="+", default=[32, 128, 512])
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=None,
                        help="train-step dtypes (default: float32, and bfloat16 where the GPU or CPU has it)")
    parser.add_argument("--repeats", type=positive(int), default=5)
    parser.add_argument("--images-per-repeat", type=positive(int), default=256,
                        help="train steps per timed repeat = this // batch (JAX rows: rounded to whole dispatches)")
    parser.add_argument("--ddim-images", type=non_negative, default=64, help="0 skips DDIM-100")
    parser.add_argument("--ddpm-images", type=non_negative, default=None, help="0 skips DDPM-1000 (default: 256 on GPU, 16 on CPU)")
    parser.add_argument("--sample-repeats", type=positive(int), default=3)
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--out", type=writable_folder, default=RESULTS, help="folder for <machine>.json and .md")
    parser.add_argument("--conv", nargs="+", choices=autotune.CHOICES, default=list(autotune.CHOICES),
                        help="3x3 conv lowerings to time the train step with, each alone (auto is always timed)")
    parser.add_argument("--conv-batches", type=positive(int), nargs="+", default=[32, 128],
                        help="the batches at which each --conv lowering gets its own row (default %(default)s)")
    args = parser.parse_args(argv)
    if args.ddpm_images is None:
        args.ddpm_images = 256 if torch.cuda.is_available() else 16
    result = run(args)
    text = table(result)
    print("\n" + text, flush=True)
    write_results(args.out, machine_name(result["machine"]), result, text)


if __name__ == "__main__":
    main()
