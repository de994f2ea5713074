"""python -m benchmarks.scaling: the trainer's throughput on 1, 2 and 8 devices, and in 2 processes.

Each configuration is the real ``python -m unet_jax.train`` in subprocesses, started the way
"Scaling out" in benchmarks/README.md does it (simulated host devices through XLA_FLAGS, two
processes joined through a coordinator on 127.0.0.1). Throughput is the median images/s
of the trainer's own log windows after the first. On a CPU this shows that the code paths
work and what they cost, not how a cluster scales: the simulated devices share the cores.
Writes benchmarks/results/scaling-<machine>.json and .md.
"""

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.machine import describe, machine, machine_name
from benchmarks.results_folder import RESULTS, writable_folder, write_results
from ddpm_recipe.settings import positive

CONFIGS = (("1 device", 1, 1), ("2 devices", 1, 2), ("8 devices", 1, 8), ("2 processes × 1 device", 2, 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ScalingRunError(RuntimeError):
    """One configuration's training run failed or ran past its time."""


def train_throughput(processes: int, device_count: int, flags: list[str], timeout_s: int) -> list[float]:
    """images/s of each log window of one run (every process runs the same command)."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "unet_jax.train", "--workdir", workdir, *flags]
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count}")
        if processes > 1:
            port = _free_port()
            commands = [[*command, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                         "--process-id", str(i)] for i in range(processes)]
        else:
            commands = [command]
        # Into files, not pipes: a pipe left unread while another process is waited for would
        # block a process that printed more than it holds, and with it the whole run.
        with contextlib.ExitStack() as files:
            logs = [files.enter_context(tempfile.TemporaryFile(mode="w+")) for _ in commands]
            procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=log)
                     for c, log in zip(commands, logs)]
            what = f"the trainer in {processes} process(es) x {device_count} device(s)"
            deadline = time.monotonic() + timeout_s
            try:
                for p in procs:
                    p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise ScalingRunError(f"{what} did not finish within --timeout {timeout_s} s") from None
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            errors = []
            for log in logs:
                log.seek(0)
                errors.append(log.read())
        failed = [(p.returncode, e) for p, e in zip(procs, errors) if p.returncode != 0]
        if failed:  # the trainer's own one-line error where it gave one, else what it printed last (a bug's traceback)
            rc, stderr = failed[0]
            said = [line for line in stderr.splitlines() if line.startswith("error: ")]
            raise ScalingRunError(f"{what} failed (rc {rc}): " + (said[-1] if said else "\n" + stderr[-3000:]))
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [json.loads(line)["images_per_s"] for line in f]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=positive(int), default=32,
                        help="the global batch: a multiple of 8 splits over every configuration")
    parser.add_argument("--steps", type=positive(int), default=200)
    parser.add_argument("--log-every", type=positive(int), default=20)
    parser.add_argument("--timeout", type=positive(int), default=900, help="seconds per configuration")
    parser.add_argument("--out", type=writable_folder, default=RESULTS)
    args = parser.parse_args(argv)
    if args.steps < 2 * args.log_every:  # the first window holds the compile and is left out
        parser.error(f"--steps {args.steps} must cover at least two --log-every {args.log_every} windows")
    most = max(processes * count for _, processes, count in CONFIGS)
    if args.batch_size % most:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of {most}, to split over every configuration")
    flags = ["--batch-size", str(args.batch_size), "--steps", str(args.steps), "--log-every", str(args.log_every),
             "--sample-every", "0", "--ckpt-every", "0", "--num-samples", "8", "--sample-steps", "2"]
    rows = []
    for label, processes, device_count in CONFIGS:
        try:
            windows = train_throughput(processes, device_count, flags, args.timeout)[1:]  # the first holds warm-up
        except ScalingRunError as error:  # the rows above stay printed
            raise SystemExit(f"error: {error}") from None
        rows.append({"config": label, "processes": processes, "devices_per_process": device_count,
                     "images_per_s": statistics.median(windows), "min": min(windows), "max": max(windows)})
        print(f"{label:26} {rows[-1]['images_per_s']:7.1f} images/s", flush=True)
    base = rows[0]["images_per_s"]
    for row in rows:
        row["vs_1_device"] = row["images_per_s"] / base
    info = machine()
    result = {"machine": info, "command": "python -m benchmarks.scaling " + " ".join(sys.argv[1:]),
              "batch_size": args.batch_size, "steps": args.steps, "rows": rows}
    lines = [f"Machine: {describe(info)}, {info['cores']} cores, JAX {info['jax']}. "
             f"Global batch {args.batch_size}, {args.steps} steps, median of the log windows after the first. "
             f"Command: `{result['command'].strip()}`.", "",
             "| configuration | images/s (median) | spread (min-max) | × 1 device |", "|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['images_per_s']:.0f} | {r['min']:.0f}-{r['max']:.0f} | {r['vs_1_device']:.2f}× |"
              for r in rows]
    print("\n" + "\n".join(lines), flush=True)
    write_results(args.out, "scaling-" + machine_name(info), result, "\n".join(lines))


if __name__ == "__main__":
    main()
