"""python -m benchmarks.profile: where one device's train step spends its time, by kind of XLA op.

Runs the trainer's jitted program (``--steps-per-dispatch`` steps per dispatch) under
``jax.profiler`` on one device and sums the executed XLA ops by kind: library-fused
convolutions and matmuls, layout copies, elementwise and reduction fusions,
concatenations. It also counts the process's minor page faults per step: memory touched
for the first time, which a program that gets fresh buffers each dispatch pays again.
This is the measurement behind benchmarks/README.md's account of what bounds the train step on a CPU.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import tempfile

import jax

from benchmarks.jax_bench import train_program
from unet_jax import autotune, data

# Executed ops are named after their HLO instruction; the name's stem says what kind it is.
KINDS = (
    ("library calls: convolutions, matmuls (and a few reductions)", r"^(ynn|xnn|onednn)_fusion|^(convolution|conv_general_dilated|dot)"),
    ("layout copies (transposes, copies)", r"transpose|copy"),
    ("concatenations", r"^concatenate"),
    ("all-reduce", r"^all-reduce"),
    ("elementwise and reduction fusions (GroupNorm, ReLU, Adam, ...)", r"fusion|^(reduce|add|multiply|select|maximum|broadcast)"),
)


def kind_of(op_name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, op_name):
            return kind
    return "other"


def profile_step(batch: int, steps_per_dispatch: int, dispatches: int, trace_dir: str, conv="auto") -> int:
    """Trace ``dispatches`` programs of ``steps_per_dispatch`` steps; returns the minor page faults in them."""
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    conv = autotune.resolve(conv, batch, "train", mesh=mesh)
    print(f"3x3 conv lowerings: {conv.describe()}")
    program, (state, acc, images, keys) = train_program(data.load_bundled("train").images, batch, "float32", mesh,
                                                        steps_per_dispatch, conv)
    for _ in range(2):  # compile and warm up outside the trace
        state, acc = program(state, acc, images, keys)
    jax.block_until_ready(acc)
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(dispatches):
        state, acc = program(state, acc, images, keys)
        jax.block_until_ready(acc)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    jax.profiler.stop_trace()
    return faults


def op_times(trace_dir: str) -> collections.Counter:
    """Microseconds per executed XLA op, summed over the trace."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    times = collections.Counter()
    for event in events:
        name = event.get("name", "")
        # Complete events; leave out Python frames ($...) and the executor's own spans.
        if event.get("ph") == "X" and not name.startswith(("$", "Thunk", "Pjit", "CommonPjRt", "Wait", "Parse")):
            times[name] += event.get("dur", 0)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="per device: 64 is batch 128 over two devices")
    parser.add_argument("--steps-per-dispatch", type=int, default=1)
    parser.add_argument("--dispatches", type=int, default=3)
    autotune.add_conv_flag(parser)
    parser.add_argument("--top", type=int, default=10, help="also list this many of the slowest single ops")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as trace_dir:
        faults = profile_step(args.batch, args.steps_per_dispatch, args.dispatches, trace_dir, args.conv)
        times = op_times(trace_dir)
    steps = args.steps_per_dispatch * args.dispatches
    by_kind = collections.Counter()
    for name, micros in times.items():
        by_kind[kind_of(name)] += micros
    total = sum(by_kind.values())
    print(f"train step, batch {args.batch} on one {jax.default_backend()} device, {args.steps_per_dispatch} "
          f"per dispatch: {total / steps / 1e3:.0f} ms of XLA ops and {faults / steps:.0f} minor page faults "
          f"({faults / steps * resource.getpagesize() / 1e6:.0f} MB first touched) per step\n")
    print("| kind of op | ms per step | share |")
    print("|---|---|---|")
    for kind, micros in by_kind.most_common():
        print(f"| {kind} | {micros / steps / 1e3:.1f} | {100 * micros / total:.0f} % |")
    print("\n| slowest ops | ms per step |")
    print("|---|---|")
    for name, micros in times.most_common(args.top):
        print(f"| {name} | {micros / steps / 1e3:.1f} |")


if __name__ == "__main__":
    main()
