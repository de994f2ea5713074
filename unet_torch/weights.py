"""Read a state_dict from a ``.pt``/``.pth`` or ``.safetensors`` file as torch tensors."""

import os
import pickle
from collections.abc import Mapping

import torch

from ddpm_recipe.errors import first_line
from ddpm_recipe.weights import WeightsFileError, check_weights_file, unreadable_safetensors


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.pt``/``.pth`` (never executing pickled code) or ``.safetensors``.

    Raises WeightsFileError, naming the file, for anything that is not a readable state_dict.
    """
    path = check_weights_file(path)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as error:
            raise unreadable_safetensors(path, error) from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _refusal_reason(error)
        if not reason and not _is_pickle(path):  # an HTML page, a text file, a renamed .safetensors
            raise WeightsFileError(f"cannot read {path!r} as a torch checkpoint: it is not a torch.save file, "
                                   "or a damaged one") from None
        raise WeightsFileError(
            f"refusing to load {path!r}: it holds Python objects other than tensors, and loading "
            "them could run arbitrary code (torch.load with weights_only=True refused it). "
            "Save a plain state_dict (torch.save(model.state_dict(), path))." + (f" Details: {reason}" if reason else "")
        ) from None
    except Exception as error:  # torch.load fails on a damaged file with any of a dozen exception types
        raise WeightsFileError(f"cannot read {path!r} as a torch checkpoint ({type(error).__name__}: "
                               f"{first_line(error)}); it may be truncated or not a torch.save file") from None
    if not isinstance(loaded, Mapping):
        raise WeightsFileError(f"expected {path!r} to hold a state_dict (a dict of tensors), got {type(loaded).__name__}")
    return dict(loaded)


def _refusal_reason(error: Exception) -> str:
    """torch's line naming the Python object (a "global") that it refused to load, without its advice
    to load it with weights_only=False, which would run the code; "" where it met none (bytes that are
    no pickle of objects at all)."""
    for line in str(error).splitlines():
        if "global" in line.lower() and "weights_only" not in line:
            return line.strip().removeprefix("WeightsUnpickler error:").strip().split(". ")[0]
    return ""


def _is_pickle(path: str) -> bool:
    """A bare pickle of protocol 2 to 5 (what pickle.dump writes), whose objects torch may not name."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5
