"""What a benchmark ran on: CPU or GPU, cores, library versions, and a file name for it."""

import platform
import re

import jax

from ddpm_recipe.weights import TorchNotInstalledError, import_torch
from unet_jax import devices
from unet_jax.autotune import cpu_flags, cpu_name, cpuinfo


def machine() -> dict:
    text = cpuinfo()
    info = {"cpu": cpu_name(text), "cores": devices.usable_cores(), "backend": jax.default_backend(),
            "jax_devices": len(jax.devices()), "jax": jax.__version__, "torch": _torch_version(),
            "python": platform.python_version(), "cpu_bfloat16": cpu_has_bfloat16(), "cpu_kind": cpu_vector_kind()}
    # A virtual machine may name its CPU only "AMD EPYC"; the x86 family and model tell its
    # generations apart (two of them, both AVX-512, differ twofold in matmul peak).
    family, model = (re.search(rf"^{field}\s*:\s*(\d+)$", text, re.M) for field in ("cpu family", "model"))
    if family and model:
        info["cpu_family"], info["cpu_model"] = int(family.group(1)), int(model.group(1))
    if jax.default_backend() == "gpu":
        info["gpu"] = jax.devices()[0].device_kind
    return info


def _torch_version() -> str | None:
    """torch's version (its build tag included), None without torch: benchmarks.scaling times the JAX trainer alone."""
    try:
        return import_torch("the benchmark's record of torch's version").__version__
    except TorchNotInstalledError:
        return None


def cpu_has_bfloat16() -> bool:
    """Whether the CPU computes in bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16)."""
    return bool(cpu_flags(cpuinfo()) & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_vector_kind() -> str:
    """The widest x86 vector extension the CPU has (avx512, avx2), or the machine's architecture.

    Results are kept per kind: XLA:CPU's convolutions behave very differently on the two.
    """
    flags = cpu_flags(cpuinfo())
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return platform.machine().lower()


def describe(info: dict) -> str:
    """The machine in words for a results table: 'AMD EPYC (avx512, x86 family 26 model 2)'."""
    if info.get("gpu"):
        return info["gpu"]
    details = [info.get("cpu_kind", "")]
    if "cpu_family" in info:
        details.append(f"x86 family {info['cpu_family']} model {info['cpu_model']}")
    return f"{info['cpu']} ({', '.join(d for d in details if d)})"


def machine_name(info: dict) -> str:
    """The results file's name: the GPU's, or the CPU's cores, name, vector kind and x86 family and model."""
    label = info.get("gpu") or f"cpu-{info['cores']}core-{info['cpu']}-{info.get('cpu_kind', '')}"
    if not info.get("gpu") and "cpu_family" in info:
        label += f"-family{info['cpu_family']}-model{info['cpu_model']}"
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
