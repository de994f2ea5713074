"""The JAX trainer's command line: the flags both trainers share (``ddpm_recipe.settings``) and JAX's own.

JAX's own flags choose how the run is computed, not what it computes: the device program
(``--steps-per-dispatch``), the 3x3 conv lowering (``--conv``) and the processes of a
multi-process run. ``python -m unet_jax.train --help`` lists them all.
"""

import argparse

from ddpm_recipe import settings
from ddpm_recipe.settings import Config, non_negative, positive
from unet_jax import autotune, devices

DESCRIPTION = "DDPM training of the tutorial UNet in JAX: ``python -m unet_jax.train``."


def address(text: str) -> str:
    """HOST:PORT (an IPv6 host in brackets), the port a number from 1 to 65535."""
    host, _, port = text.rpartition(":")
    if not (host.strip("[]") and port.isdigit() and 0 < int(port) < 65536):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port from 1 to 65535, got {text}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The flags both trainers share (``ddpm_recipe.settings``), and those only JAX has."""
    d = Config()
    p = settings.build_parser("python -m unet_jax.train", DESCRIPTION)
    p.add_argument("--adopt", action="store_true",
                   help="the workdir's checkpoints lost their config.json: write it from these flags and resume")
    autotune.add_conv_flag(p, d.conv, more="; a run resumed with 'auto' keeps the lowerings it recorded "
                                            "(WORKDIR/conv_plan.json), so that it stays bit-identical")
    p.add_argument("--steps-per-dispatch", type=positive(int), default=d.steps_per_dispatch, metavar="K",
                   help="K train steps in one device program (default %(default)s): a loop, or K unrolled steps (K times the "
                        "compile) where a layer keeps XLA's own convolution")
    g = p.add_argument_group("multi-process runs",
                             "every process runs the same command; see benchmarks/README.md, Scaling out")
    g.add_argument("--coordinator", type=address, default=None, metavar="HOST:PORT",
                   help="process 0's address, reachable by all")
    g.add_argument("--num-processes", type=positive(int), default=None)
    g.add_argument("--process-id", type=non_negative, default=None)
    g.add_argument("--distributed", action="store_true",
                   help="detect the processes from SLURM, Open MPI or the TPU VM (jax.distributed.initialize())")
    g.add_argument("--heartbeat-timeout", type=positive(int), default=devices.Cluster.heartbeat_timeout_s,
                   help="seconds after which a silent process counts as dead and the run stops (default %(default)s)")
    g.add_argument("--init-timeout", type=positive(int), default=devices.Cluster.init_timeout_s,
                   help="seconds the processes wait for each other to start (default %(default)s)")
    return p


def parse_config(parser: argparse.ArgumentParser, argv=None) -> tuple[Config, devices.Cluster, dict]:
    """Flags -> (Config, Cluster, options), with the checks argparse cannot make alone.

    options: {'download': bool, 'adopt': bool}, what the flags ask for besides the run itself.
    """
    config, others = settings.parse_flags(parser, argv)
    options = {"download": others.pop("download"), "adopt": others.pop("adopt", False)}
    cluster = devices.Cluster(coordinator=others.pop("coordinator", None),
                              num_processes=others.pop("num_processes", None),
                              process_id=others.pop("process_id", None), detect=others.pop("distributed", False),
                              heartbeat_timeout_s=others.pop("heartbeat_timeout", devices.Cluster.heartbeat_timeout_s),
                              init_timeout_s=others.pop("init_timeout", devices.Cluster.init_timeout_s))
    explicit = (cluster.coordinator, cluster.num_processes, cluster.process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            parser.error("--coordinator, --num-processes and --process-id go together: give all three")
        if cluster.detect:
            parser.error("--distributed detects the processes itself; drop it, or drop the explicit flags")
        if cluster.process_id >= cluster.num_processes:
            parser.error(f"--process-id {cluster.process_id} must be below --num-processes {cluster.num_processes}")
    return config, cluster, options
