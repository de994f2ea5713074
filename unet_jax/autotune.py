"""Pick each 3x3 convolution's lowering by timing them on this machine: ``python -m unet_jax.autotune``.

No lowering of the 3x3 convolution is fastest everywhere (see ``unet_jax/layers.py``), so, as
cuDNN's autotuner does, the candidate lowerings (``CANDIDATES``) are timed side by side on the
network's real layer shapes at the run's per-device batch (``MAX_MEASURED_BATCH`` at most), over
the devices the run will use: for training, forward and gradients (the kernel's alone for the
layer that reads the image, as in the train step); for sampling, forward alone. The fastest
per shape makes a ``ConvPlan``.

The plan is cached per machine (CPU model and flags, backend, JAX version, device count,
per-device batch, mode, compute dtype) in ``$UNET_JAX_CACHE_DIR`` or ``~/.cache/unet_jax``: a warm cache
measures nothing. A corrupt or foreign cache file is ignored with a warning and rewritten.
GPUs and TPUs take XLA's own convolution without measuring: their libraries autotune already.
"""

import argparse
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ddpm_recipe.run_folder import write_json
from ddpm_recipe.settings import DTYPES, positive
from unet_jax import devices
from unet_jax.layers import CONV_LOWERINGS, ConvPlan
from unet_jax.model import conv_layers, image_conv_shapes

CHOICES = ("auto", *CONV_LOWERINGS)
MODES = ("train", "sample")
# Raised when the lowerings, the candidates or the rule that picks among them change: no cached plan outlives them.
CACHE_VERSION = 11
# The lowerings worth timing. Training: `winograd`'s autodiff runs the transposes of its strided
# tile slices, so `winograd_tapgrad` (the same forward) is never slower. Sampling runs forward
# alone, where `tapgrad` is `xla` and `winograd_tapgrad` is `winograd`.
CANDIDATES = {
    "train": ("tapgrad", "winograd_tapgrad", "im2col", "xla"),
    "sample": ("winograd", "im2col", "xla"),
}
# A candidate that takes this many times the fastest in the first round is not timed further:
# loose enough that one call slowed by the shared machine's load does not drop the best.
CUTOFF = 2.0
# The fewest rounds, whatever a call takes: with fewer, one round's outlier (a burst of load, the
# page faults a slower candidate left behind) has made a lowering that loses the whole step look
# the fastest.
MIN_ROUNDS = 3
# Nor one whose warm-up call took this many times the fastest warm-up, if that call was long
# (over ``min_seconds``): at large batches a call of the slowest lowerings takes seconds. The bar
# is looser than CUTOFF because a first call also pays one-time costs (memory touched first).
WARM_UP_CUTOFF = 3.0
# In training, a plan without `xla` is taken if its convolutions, all layers counted, take within
# this share of the fastest plan's: one `xla` layer makes the trainer unroll its steps
# (step.loops_at_full_speed), which compiles the program several times longer, and XLA's
# convolution costs the whole step more than it takes timed alone: layer timings that put a
# plan with `xla` a fifth ahead have gone with whole steps no faster than the plan without it
# (benchmarks/README.md, "Fast, exact layers").
XLA_MARGIN = 0.3
# Larger per-device batches are timed at this one. Past it each lowering's time grows with the
# batch alike, so the choice holds, and the slowest candidates' calls (XLA's weight-gradient
# convolution on some CPUs: seconds per call) would otherwise make measuring minutes long.
MAX_MEASURED_BATCH = 64


def parse_shape(key: str) -> tuple[int, int, int, int]:
    h, w, in_ch, out_ch = map(int, re.fullmatch(r"(\d+)x(\d+) (\d+)->(\d+)", key).groups())
    return h, w, in_ch, out_ch


def _inputs(key: str, batch: int, mode: str, mesh, dtype: str = "float32") -> tuple:
    """Random (x, kernel[, dy]) in ``dtype`` for one layer shape, x and dy split over the mesh as a batch is."""
    h, w, in_ch, out_ch = parse_shape(key)
    rng = np.random.default_rng(0)
    batch_sharding, replicated = devices.batch_sharding(mesh), devices.replicated(mesh)

    # One random image, repeated over the batch: a convolution's time does not depend on the
    # values, and drawing a large batch's worth took longer than timing it.
    def images(channels):
        one = rng.standard_normal((1, h, w, channels)).astype(jnp.dtype(dtype))
        return jax.device_put(np.broadcast_to(one, (batch, h, w, channels)), batch_sharding)

    x = images(in_ch)
    kernel = jax.device_put((0.05 * rng.standard_normal((3, 3, in_ch, out_ch))).astype(jnp.dtype(dtype)), replicated)
    if mode == "sample":
        return x, kernel
    return x, kernel, images(out_ch)


def _compile(lowering: str, args: tuple, mode: str, mesh, *, input_gradient: bool = True):
    """One layer's program as the trainer and the sampler run it: forward alone under XLA's
    partitioner (sample), or forward and gradients on each device's slice of the batch, the
    kernel's gradient summed over devices (train; ``step.apply_update`` averages, at the same
    cost). A layer that reads the image has no input gradient in training (``input_gradient=False``).

    A training program returns the forward's output with the gradients: the gradients of a
    convolution do not read it, so a program without it would leave the forward out, and the
    lowerings differ in their forwards as much as in their gradients."""
    fn = CONV_LOWERINGS[lowering]
    if mode == "sample":
        return jax.jit(fn).lower(*args).compile()

    def per_device(x, kernel, dy):
        if not input_gradient:
            y, vjp = jax.vjp(lambda k: fn(x, k), kernel)
            (dkernel,) = vjp(dy)
            return y, jax.lax.psum(dkernel, "data")
        y, vjp = jax.vjp(fn, x, kernel)
        dx, dkernel = vjp(dy)
        return y, dx, jax.lax.psum(dkernel, "data")

    batch = P("data")
    program = jax.shard_map(per_device, mesh=mesh, in_specs=(batch, P(), batch),
                            out_specs=(batch, batch, P()) if input_gradient else (batch, P()), check_vma=False)
    return jax.jit(program).lower(*args).compile()


def _time_side_by_side(programs: dict, args: tuple, *, min_seconds: float = 0.2, min_rounds: int = MIN_ROUNDS,
                       max_rounds: int = 10) -> dict[str, float]:
    """Seconds per call of each program, the best of the rounds in which each runs once in turn.

    Taking turns makes a burst of load on a shared machine fall on every candidate alike, where
    timing one after another would hand it to whichever ran then; every other round runs in
    reverse order, so that no candidate always runs right after the same other one (a slow,
    memory-hungry call leaves the next one page faults and cold caches). After a warm-up call
    each, rounds run while fewer than ``min_rounds`` have run or the fastest's runs add up to
    under ``min_seconds`` (at most ``max_rounds``): the shortest layers are the noisiest and get
    the most rounds. A program that takes CUTOFF times the fastest in the first round is not
    timed further; one whose warm-up took over ``min_seconds`` and WARM_UP_CUTOFF times the
    fastest warm-up is not timed at all, and its warm-up is what is reported for it.
    """
    warm_up = {}
    for name, program in programs.items():
        start = time.perf_counter()
        jax.block_until_ready(program(*args))
        warm_up[name] = time.perf_counter() - start
    too_slow = max(WARM_UP_CUTOFF * min(warm_up.values()), min_seconds)
    timed, spent = [name for name in programs if warm_up[name] <= too_slow], 0.0
    best = {name: np.inf if name in timed else warm_up[name] for name in programs}
    for done in range(max_rounds):
        if done >= min_rounds and spent >= min_seconds:
            break
        for name in (timed if done % 2 == 0 else timed[::-1]):
            start = time.perf_counter()
            jax.block_until_ready(programs[name](*args))
            best[name] = min(best[name], time.perf_counter() - start)
        if done == 0:
            timed = [name for name in timed if best[name] <= CUTOFF * min(best.values())]
        spent += min(best.values())
    return best


def measure(batch: int, mode: str, mesh, *, dtype: str = "float32", log=print) -> tuple[ConvPlan, dict]:
    """Time every candidate lowering on every layer shape; returns (the fastest per shape, {shape: {lowering: ms}}).

    ``batch`` is the global batch, split over ``mesh``; ``dtype`` the run's compute dtype. The
    programs compile first, on every core at once, so that no compile runs beside a timing.
    """
    shapes, reads_image = list(conv_layers()), image_conv_shapes()
    inputs = {key: _inputs(key, batch, mode, mesh, dtype) for key in shapes}
    jobs = [(key, lowering) for key in shapes for lowering in CANDIDATES[mode]]

    def compile_job(job):
        key, lowering = job
        return _compile(lowering, inputs[key], mode, mesh, input_gradient=key not in reads_image)

    with concurrent.futures.ThreadPoolExecutor(devices.usable_cores()) as pool:
        programs = dict(zip(jobs, pool.map(compile_job, jobs)))
    table: dict[str, dict[str, float]] = {}
    for key in shapes:
        seconds = _time_side_by_side({lowering: programs[key, lowering] for lowering in CANDIDATES[mode]}, inputs[key])
        row = table[key] = {lowering: 1e3 * s for lowering, s in seconds.items()}
        log(f"  {key:>16}: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in row.items()))
    counts = {key: len(paths) for key, paths in conv_layers().items()}
    return ConvPlan("xla", tuple(sorted(choose(table, mode, counts).items()))), table


def choose(table: dict[str, dict[str, float]], mode: str, counts: dict[str, int]) -> dict[str, str]:
    """The lowering of each layer shape from its timings: the fastest; in training, the fastest
    other than ``xla`` on every layer if their sum over the network's layers (``counts`` of each
    shape) is within XLA_MARGIN of the fastest plan's. Only a plan without ``xla`` lets the
    trainer's steps run as a loop, so a small layer's near win is worth giving up for it; the
    whole step is what a user waits for, so the margin is on the sum, not on each layer."""
    fastest = {key: min(row, key=row.get) for key, row in table.items()}
    if mode != "train":
        return fastest
    without_xla = {key: min((name for name in row if name != "xla"), key=row.get, default="xla")
                   for key, row in table.items()}

    def total(plan):
        return sum(counts[key] * table[key][name] for key, name in plan.items())

    if total(without_xla) <= (1 + XLA_MARGIN) * total(fastest):
        return without_xla
    return fastest


# ----------------------------------------------------------------------------------- the cache

def cache_path() -> str:
    root = os.environ.get("UNET_JAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "unet_jax")
    return os.path.join(root, "conv_autotune.json")


def cpuinfo() -> str:
    """The text of /proc/cpuinfo, or "" where there is none (macOS)."""
    if not os.path.exists("/proc/cpuinfo"):
        return ""
    with open("/proc/cpuinfo") as f:
        return f.read()


def cpu_name(text: str) -> str:
    """The CPU's model name in ``cpuinfo()``'s text, else what Python's platform module says."""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return model.group(1).strip() if model else (platform.processor() or platform.machine())


def cpu_flags(text: str) -> set[str]:
    """The CPU's feature flags in ``cpuinfo()``'s text (x86 "flags", Arm "Features")."""
    found = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.M)
    return set(found.group(1).split()) if found else set()


def machine_key(batch: int, mode: str, device_count: int, dtype: str = "float32") -> str:
    """What a measurement depends on: the CPU (model and flags), backend, JAX, devices, batch, mode, dtype."""
    text = cpuinfo()
    cpu = cpu_name(text)
    flag_hash = hashlib.sha256(" ".join(sorted(cpu_flags(text))).encode()).hexdigest()[:12]
    return (f"{cpu} (flags {flag_hash}) | {jax.default_backend()} | jax {jax.__version__} | {device_count} device(s) "
            f"| batch {batch} per device | {mode} | {dtype}")


def _read_cache(path: str, then: str | None = "measuring again") -> dict:
    """The cache's entries; a missing file is empty, an unreadable or foreign one is ignored with a
    warning that says what ``then`` happens (none where ``then`` is None)."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            cache = json.load(f)
        if not isinstance(cache, dict) or cache.get("version") != CACHE_VERSION or not isinstance(cache.get("entries"), dict):
            raise ValueError(f"not a version-{CACHE_VERSION} unet_jax conv autotune cache")
        for entry in cache["entries"].values():  # every plan must load, every table be one
            ConvPlan.from_json(entry["plan"])
            if not isinstance(entry.get("ms", {}), dict):
                raise ValueError("an entry's timings are not a table")
        return cache["entries"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        if then is not None:
            warnings.warn(f"ignoring the conv autotune cache {path} ({error}); {then}", stacklevel=3)
        return {}


def _write_cache(path: str, entries: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, {"version": CACHE_VERSION, "entries": entries})
    except OSError as error:  # a read-only home must not stop a run: the plan is still used
        warnings.warn(f"could not write the conv autotune cache {path}: {error.strerror or error}", stacklevel=3)


def _add_to_cache(path: str, key: str, entry: dict) -> None:
    """``entry`` under ``key``, beside what other runs wrote meanwhile: the cache is read again and
    rewritten under a lock, so that two runs that measured at once both keep their entries."""
    with contextlib.ExitStack() as held:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            lock = held.enter_context(open(path + ".lock", "a"))
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        except OSError:
            pass  # no lock where no file can be made: _write_cache says why it cannot write either
        entries = _read_cache(path, then=None)  # an unreadable one was named when first read
        entries[key] = entry
        _write_cache(path, entries)


def measured_batch(batch: int) -> int:
    """The per-device batch at which a run of ``batch`` per device times the lowerings (and caches the plan)."""
    return min(batch, MAX_MEASURED_BATCH)


def autotune(batch: int, mode: str = "train", *, mesh=None, dtype: str = "float32", remeasure: bool = False,
             log=print) -> ConvPlan:
    """The fastest lowering per layer shape at ``batch`` per device in ``dtype``: cached, or measured and cached.

    ``mesh`` is the devices the run uses (default: every local device); the measured batch is
    ``measured_batch(batch)`` on each of them.
    """
    plan, _, _ = autotune_with_timings(batch, mode, mesh=mesh, dtype=dtype, remeasure=remeasure, log=log)
    return plan


def autotune_with_timings(batch: int, mode: str = "train", *, mesh=None, dtype: str = "float32",
                          remeasure: bool = False, log=print) -> tuple[ConvPlan, dict, bool]:
    """``autotune``'s plan, the timings it was chosen by ({shape: {lowering: ms}}; none off the
    CPU), and whether they came from the cache."""
    if mode not in MODES:
        raise ValueError(f"expected mode in {MODES}, got {mode!r}")
    if jax.default_backend() != "cpu":
        return ConvPlan("xla"), {}, False
    mesh = mesh or jax.sharding.Mesh(jax.local_devices(), ("data",))
    count, timed = mesh.devices.size, measured_batch(batch)
    path, key = cache_path(), machine_key(timed, mode, count, dtype)
    entries = _read_cache(path)
    if key in entries and not remeasure:
        return ConvPlan.from_json(entries[key]["plan"]), entries[key].get("ms", {}), True
    standing_in = "" if timed == batch else f", standing in for {batch}"
    log(f"timing the 3x3 conv lowerings ({mode}, {dtype}, batch {timed} per device{standing_in} on {count} device(s)); "
        f"cached in {path}")
    start = time.perf_counter()
    plan, table = measure(timed * count, mode, mesh, dtype=dtype, log=log)
    log(f"  chose in {time.perf_counter() - start:.1f} s: {plan.describe()}")
    _add_to_cache(path, key, {"plan": plan.to_json(), "ms": table, "measured": time.strftime("%Y-%m-%d %H:%M:%S")})
    return plan, table, False


def resolve(conv: str, batch: int, mode: str = "train", *, mesh=None, dtype: str = "float32", log=print) -> ConvPlan:
    """``--conv``: 'auto' autotunes (or reads the cache) in the run's compute ``dtype``; a lowering's
    name is used for every layer."""
    if conv not in CHOICES:
        raise ValueError(f"expected --conv in {CHOICES}, got {conv!r}")
    if conv == "auto":
        return autotune(batch, mode, mesh=mesh, dtype=dtype, log=log)
    return ConvPlan(conv)


def agree_across_processes(plan: ConvPlan) -> ConvPlan:
    """Process 0's plan on every process: all processes must compile the same program."""
    if jax.process_count() == 1:
        return plan
    from jax.experimental import multihost_utils

    keys = sorted(conv_layers())
    names = sorted(CONV_LOWERINGS)
    codes = np.array([names.index(plan.lowering(k)) for k in keys], np.int32)
    chosen = [names[int(c)] for c in np.asarray(multihost_utils.broadcast_one_to_all(codes))]
    if len(set(chosen)) == 1:  # one lowering everywhere: the plan that names it, as --conv NAME makes
        return ConvPlan(chosen[0])
    return ConvPlan("xla", tuple(zip(keys, chosen)))


def add_conv_flag(parser: argparse.ArgumentParser, default: str = "auto", *, more: str = "") -> None:
    parser.add_argument("--conv", choices=CHOICES, default=default,
                        help="3x3 conv lowering: 'auto' times them on this machine once and caches the choice"
                             f"{more} (default %(default)s)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unet_jax.autotune", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive(int), default=32, help="the run's global batch (default %(default)s, the trainer's)")
    parser.add_argument("--mode", choices=MODES, default="train", help="train: forward and gradients; sample: forward")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the run's compute dtype (default %(default)s)")
    parser.add_argument("--remeasure", action="store_true", help="measure even if the cache has this machine")
    args = parser.parse_args(argv)
    devices.use_all_cpu_cores(args.batch)  # as the trainer: a device per core that splits the batch
    mesh = devices.data_mesh(args.batch)
    per_device = args.batch // mesh.devices.size
    timed = measured_batch(per_device)
    plan, table, cached = autotune_with_timings(per_device, args.mode, mesh=mesh, dtype=args.dtype,
                                                remeasure=args.remeasure)
    layers = conv_layers()
    timed_at = "" if timed == per_device else f" (timed at {timed})"
    print(f"\n3x3 conv lowerings on {jax.default_backend()}, {args.mode}, {args.dtype}, batch {per_device} per device{timed_at} on "
          f"{mesh.devices.size} device(s); ms per call{', from the cache' if cached else ''}:\n")
    names = CANDIDATES[args.mode]
    print("| layer shape | layers | " + " | ".join(names) + " | chosen |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for key, paths in layers.items():
        ms = table.get(key, {})
        cells = [f"{ms[n]:.1f}" if n in ms else "" for n in names]
        print(f"| {key} | {', '.join(paths)} | " + " | ".join(cells) + f" | {plan.lowering(key)} |")


if __name__ == "__main__":
    main()
