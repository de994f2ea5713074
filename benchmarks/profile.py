"""python -m benchmarks.profile: where one device's train step spends its time, by kind of XLA op and by layer.

Runs the trainer's jitted program (``--steps-per-dispatch`` steps per dispatch) under
``jax.profiler`` on ``--devices`` host devices (one by default; the trainer takes one per core,
whose waits for each other at the gradients' all-reduce only show there), and sums the executed
XLA ops, per device, by kind: library-fused
convolutions and matmuls, layout copies, elementwise and reduction fusions,
concatenations; and by the model layer whose code made them (the compiled program's op
metadata names the Flax module path), forward and backward apart. Loops and conditionals
are left out of the sums: the ops inside them are counted themselves. It also counts the
process's minor page faults per step: memory touched for the first time, which a program
that gets fresh buffers each dispatch pays again.
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

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.jax_bench import train_program
from ddpm_recipe.settings import non_negative, positive
from unet_jax import autotune, data, devices
from unet_jax.model import IMAGE_SHAPE, Unet

# Executed ops are named after their HLO instruction; the name's stem says what kind it is.
KINDS = (
    ("library calls: convolutions, matmuls (and a few reductions)", r"^(ynn|xnn|onednn)_fusion|^(convolution|conv_general_dilated|dot)"),
    ("layout copies (transposes, copies)", r"transpose|copy"),
    ("concatenations", r"^concatenate"),
    ("all-reduce, and waiting there for the other devices", r"^(all-reduce|psum|Rendezvous)"),
    ("elementwise and reduction fusions (GroupNorm, ReLU, Adam, ...)", r"fusion|^(reduce|add|multiply|select|maximum|broadcast)"),
)


# Ops that only run others (a loop's body, a branch), which the trace also times one by one.
CONTAINERS = ("while", "conditional", "call")
OUTSIDE_MODEL = "outside the model: data, loss, all-reduce, Adam, EMA"
NOT_AN_OP = "the runtime's own work and waits (no op of the program)"


def kind_of(op_name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, op_name):
            return kind
    return "other"


def instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (opcode, the JAX op_name in its metadata) of a compiled program's text.

    An instruction that XLA adds itself (a layout copy, a transpose that feeds a library call)
    has no op_name; it takes that of the value it copies, its first operand's, so that its time
    counts for the layer that made the value rather than outside the model.
    """
    found, first_operand = {}, {}
    for line in hlo_text.splitlines():
        # name = TYPE (which may be a tuple) opcode(%first_operand, ...
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\((?:%([\w.\-]+))?", line)
        if m:
            op_name = re.search(r'op_name="([^"]*)"', line)
            found[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "")
            first_operand[m.group(1)] = m.group(3)
    for name, (opcode, op_name) in found.items():
        source, seen = name, {name}
        while not op_name and first_operand.get(source) in found and first_operand[source] not in seen:
            source = first_operand[source]
            seen.add(source)
            op_name = found[source][1]
        found[name] = (opcode, op_name)
    return found


def model_layers() -> dict[str, str]:
    """Every module path of the Unet ('encoder/down1/model_0/block_0') -> its class name."""
    layers = {}

    def record(next_fun, args, kwargs, context):
        layers["/".join(context.module.path)] = type(context.module).__name__
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(Unet().init, jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)), jnp.zeros((1,)))
    return layers


def layer_of(op_name: str, layers: dict[str, str]) -> tuple[str, str]:
    """(the innermost module path in ``op_name``, 'forward' or 'backward'); outside the Unet, OUTSIDE_MODEL."""
    m = re.search(r"Unet(?:\.\w+)?/(.*)", op_name)
    if not m:
        return OUTSIDE_MODEL, ""
    parts, path = m.group(1).split("/"), ""
    for i in range(len(parts), 0, -1):
        if "/".join(parts[:i]) in layers:
            path = "/".join(parts[:i])
            break
    return path, "backward" if "transpose(jvp(" in op_name else "forward"


def profile_step(batch: int, steps_per_dispatch: int, dispatches: int, trace_dir: str, conv="auto",
                 device_count: int = 1) -> tuple[int, str]:
    """Trace ``dispatches`` programs of ``steps_per_dispatch`` steps at ``batch`` per device on
    ``device_count`` devices; returns the minor page faults in them and the compiled program's text."""
    if len(jax.devices()) < device_count:
        raise SystemExit(f"error: --devices {device_count}: this process has {len(jax.devices())} "
                         f"{jax.default_backend()} device(s)")
    mesh = jax.sharding.Mesh(jax.devices()[:device_count], ("data",))
    conv = autotune.resolve(conv, batch, "train", mesh=mesh)
    print(f"3x3 conv lowerings: {conv.describe()}")
    program, (state, acc, images, keys) = train_program(data.load_bundled("train").images, batch * device_count,
                                                        "float32", mesh, steps_per_dispatch, conv)
    program = program.lower(state, acc, images, keys).compile()
    for _ in range(2):  # warm up outside the trace
        state, acc = program(state, acc, images, keys)
    jax.block_until_ready(acc)
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(dispatches):
        state, acc = program(state, acc, images, keys)
        jax.block_until_ready(acc)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    jax.profiler.stop_trace()
    return faults, program.as_text()


def op_times(trace_dir: str, program: dict[str, tuple[str, str]] | None = None) -> collections.Counter:
    """Microseconds per executed XLA op, summed over the trace (an asynchronous op's "end: NAME"
    under NAME); with ``program`` (``instructions``), its loops and conditionals are left out,
    since the ops inside them are timed too."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    times = collections.Counter()
    for event in events:
        name = event.get("name", "").removeprefix("end: ")
        # Complete events; leave out Python frames ($...) and the executor's own spans.
        if event.get("ph") == "X" and not name.startswith(("$", "Thunk", "Pjit", "CommonPjRt", "Wait", "Parse")):
            if program and program.get(name, ("", ""))[0] in CONTAINERS:
                continue
            times[name] += event.get("dur", 0)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive(int), default=64, help="per device: 64 is batch 128 over two devices")
    parser.add_argument("--devices", type=positive(int), default=1,
                        help="host devices to run on, as the trainer's one per core (default %(default)s); "
                             "the times are per device")
    parser.add_argument("--steps-per-dispatch", type=positive(int), default=1)
    parser.add_argument("--dispatches", type=positive(int), default=3)
    autotune.add_conv_flag(parser)
    parser.add_argument("--top", type=non_negative, default=10, help="also list this many of the slowest single ops")
    args = parser.parse_args(argv)
    flags = os.environ.get("XLA_FLAGS", "")
    if devices.DEVICE_COUNT_FLAG not in flags:  # before JAX starts its backend; a count the user set stands
        os.environ["XLA_FLAGS"] = f"{flags} {devices.DEVICE_COUNT_FLAG}={args.devices}".strip()
    with tempfile.TemporaryDirectory() as trace_dir:
        faults, hlo_text = profile_step(args.batch, args.steps_per_dispatch, args.dispatches, trace_dir, args.conv,
                                        args.devices)
        program = instructions(hlo_text)
        # Every device's ops are in the trace: per device, each takes its share.
        times = collections.Counter({name: micros / args.devices for name, micros in op_times(trace_dir, program).items()})
    steps = args.steps_per_dispatch * args.dispatches
    by_kind = collections.Counter()
    for name, micros in times.items():
        by_kind[kind_of(name)] += micros
    total = sum(by_kind.values())
    print(f"train step, batch {args.batch} per device on {args.devices} {jax.default_backend()} device(s), "
          f"{args.steps_per_dispatch} per dispatch: {total / steps / 1e3:.0f} ms of XLA ops per device and {faults / steps:.0f} minor page faults "
          f"({faults / steps * resource.getpagesize() / 1e6:.0f} MB first touched) per step\n")
    print("| kind of op | ms per step | share |")
    print("|---|---|---|")
    for kind, micros in by_kind.most_common():
        print(f"| {kind} | {micros / steps / 1e3:.1f} | {100 * micros / total:.0f} % |")
    layers = model_layers()
    def where(name):
        return layer_of(program[name][1], layers) if name in program else (NOT_AN_OP, "")

    by_layer = collections.defaultdict(collections.Counter)
    for name, micros in times.items():
        path, direction = where(name)
        by_layer[path][direction] += micros
    print("\n| layer | module | ms per step | forward | backward | share |")
    print("|---|---|---|---|---|---|")
    for path, split in sorted(by_layer.items(), key=lambda item: -item[1].total()):
        if split.total() < 50 * steps:  # under 0.05 ms per step
            continue
        ms = {direction: f"{micros / steps / 1e3:.1f}" for direction, micros in split.items()}
        print(f"| {path or 'Unet'} | {layers.get(path, '')} | {split.total() / steps / 1e3:.1f} | "
              f"{ms.get('forward', '')} | {ms.get('backward', '')} | {100 * split.total() / total:.0f} % |")
    print("\n| slowest ops | ms per step | layer |")
    print("|---|---|---|")
    for name, micros in times.most_common(args.top):
        print(f"| {name} | {micros / steps / 1e3:.1f} | {' '.join(where(name)).strip()} |")


if __name__ == "__main__":
    main()
