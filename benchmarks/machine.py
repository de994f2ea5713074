"""What a benchmark ran on: CPU or GPU, cores, library versions, and a file name for it."""

import os
import platform
import re

import jax
import torch

from unet_jax import devices


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        match = re.search(r"model name\s*:\s*(.+)", open("/proc/cpuinfo").read())
        cpu = match.group(1).strip() if match else cpu
    info = {"cpu": cpu, "cores": devices.usable_cores(), "backend": jax.default_backend(),
            "jax_devices": len(jax.devices()), "jax": jax.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "cpu_bfloat16": cpu_has_bfloat16(), "cpu_kind": cpu_vector_kind()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_has_bfloat16() -> bool:
    """Whether the CPU computes in bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16)."""
    if not os.path.exists("/proc/cpuinfo"):
        return False
    with open("/proc/cpuinfo") as f:
        found = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", f.read(), re.M)
    return bool(found and set(found.group(1).split()) & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_vector_kind() -> str:
    """The widest x86 vector extension the CPU has (avx512, avx2), or the machine's architecture.

    Results are kept per kind: XLA:CPU's convolutions behave very differently on the two.
    """
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", f.read(), re.M)
        flags = set(found.group(1).split()) if found else set()
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return platform.machine().lower()


def machine_name(info: dict) -> str:
    label = info.get("gpu") or f"cpu-{info['cores']}core-{info['cpu']}-{info.get('cpu_kind', '')}"
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
