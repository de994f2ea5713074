"""What can be wrong with a weights file or a state_dict, said the same way by every tool.

The readers live with their framework (``unet_torch.weights`` reads ``.pt`` and ``.safetensors``
as torch tensors, ``parity.port`` reads ``.safetensors`` as NumPy arrays without torch); the
errors, their wording and the checks that need neither framework live here.
"""

import os
from collections.abc import Mapping

import ml_dtypes
import numpy as np

# What a JAX-only install is told when it meets something only torch reads.
TORCH_EXTRA = "pip install 'unet-jax[torch]'"


class TorchNotInstalledError(ModuleNotFoundError):
    """A JAX-only install was asked for torch tensors or a .pt file; the message names the extra."""

    def __init__(self, what: str):
        super().__init__(f"{what} needs torch, which is not installed: {TORCH_EXTRA}")


def import_torch(what: str):
    """``torch``, or TorchNotInstalledError saying that ``what`` needs it."""
    try:
        import torch
    except ImportError:
        raise TorchNotInstalledError(what) from None
    return torch


# Wrappers that prefix every key: DataParallel / DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefix(state_dict: Mapping) -> dict:
    """Drop a prefix that DataParallel/DDP ('module.') or torch.compile ('_orig_mod.') put on every key."""
    state_dict = dict(state_dict)
    for prefix in WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


class CheckpointMismatchError(ValueError):
    """A state_dict or Flax tree whose names, shapes or dtypes are not the tutorial UNet's."""

    def one_line(self) -> str:
        """The first problem and how many there are: for a CLI's single line of error."""
        lines = str(self).splitlines()
        return lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}; first: {lines[1].strip()}"


class WeightsFileError(ValueError):
    """A weights file that cannot be read as a state_dict: missing, not a file, truncated, refused."""


def unreadable_safetensors(path: str, error: Exception) -> WeightsFileError:
    """What either reader says of a ``.safetensors`` file that safetensors cannot read."""
    return WeightsFileError(f"cannot read {path!r} as safetensors ({error}); it may be truncated: save or copy it again")


def flag_error(flag: str, path: str, error: WeightsFileError | CheckpointMismatchError) -> str:
    """A CLI's one line for the weights file given as ``flag``: a file error names the file itself;
    a mismatch names it here, with its first problem."""
    if isinstance(error, CheckpointMismatchError):
        return f"{flag} {path}: {error.one_line()}"
    return f"{flag}: {error}"


def check_weights_file(path: str | os.PathLike) -> str:
    """``path`` as a string if it names a readable, non-empty file; else WeightsFileError saying what it is."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsFileError(f"no weights file at {path!r}")
    if not os.path.isfile(path):
        raise WeightsFileError(f"{path!r} is a directory, not a weights file: give the .pt or .safetensors file in it")
    if not os.access(path, os.R_OK):
        raise WeightsFileError(f"cannot read {path!r}: permission denied")
    if os.path.getsize(path) == 0:
        raise WeightsFileError(f"{path!r} is empty (0 bytes): save the state_dict again")
    with open(path, "rb") as f:
        if f.read(len(_GIT_LFS_POINTER)) == _GIT_LFS_POINTER:
            raise WeightsFileError(f"{path!r} is a Git LFS pointer, not the weights: fetch them with `git lfs pull`")
    return path


_GIT_LFS_POINTER = b"version https://git-lfs"  # what a clone without git-lfs holds in place of a large file


def check_floating(state_dict: Mapping, what: str = "the state_dict") -> None:
    """Refuse integer, bool and complex tensors (torch or NumPy): cast into float parameters they
    would train as garbage."""
    bad = [f"{k} ({_dtype_name(v)})" for k, v in state_dict.items() if not _is_real_float(v)]
    if bad:
        raise CheckpointMismatchError(f"{what} holds {len(bad)} non-float tensor(s), expected float weights:\n"
                                      + "\n".join(f"  not float: {b}" for b in bad))


def _dtype_name(value) -> str:
    return str(getattr(value, "dtype", np.asarray(value).dtype)).removeprefix("torch.")


def _is_real_float(value) -> bool:
    if hasattr(value, "is_floating_point"):  # a torch tensor: complex and integer types are not floating point
        return bool(value.is_floating_point())
    dtype = np.asarray(value).dtype
    return dtype == ml_dtypes.bfloat16 or np.issubdtype(dtype, np.floating)
