"""Strict two-way weight porting between the torch reference and the Flax mirror.

``LAYERS`` is the whole mapping: one row per layer, torch module name, Flax module path,
and the kind of layer, which says how each tensor is renamed and transposed. Every
transform is a pure axis permutation, so the round trip torch -> flax -> torch is
bit-identical in every dtype.
"""

import collections
import functools
import os
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ddpm_recipe.weights import (  # noqa: F401 (parity's API)
    TORCH_EXTRA,
    CheckpointMismatchError,
    WeightsFileError,
    check_floating,
    check_weights_file,
    import_torch,
    strip_wrapper_prefix,
    unreadable_safetensors,
)
from unet_jax.model import init_variables

# kind: torch tensor name -> (Flax parameter name, axis permutation torch -> Flax or None)
CONV = {"weight": ("kernel", (2, 3, 1, 0)), "bias": ("bias", None)}  # (O, I, kh, kw) -> (kh, kw, I, O)
# torch's (I, O, kh, kw) -> (kh, kw, O, I), the layout of nn.ConvTranspose(transpose_kernel=True).
CONV_TRANSPOSE = {"weight": ("kernel", (2, 3, 1, 0)), "bias": ("bias", None)}
GROUP_NORM = {"weight": ("scale", None), "bias": ("bias", None)}
LINEAR = {"weight": ("kernel", (1, 0)), "bias": ("bias", None)}  # (out, in) -> (in, out)
LINEAR_NO_BIAS = {"weight": ("kernel", (1, 0))}

LAYERS = (
    # torch module                        Flax module                                   kind
    ("encoder.initial_features.0",        "encoder/initial_features_0",                 CONV),
    ("encoder.initial_features.1",        "encoder/initial_features_1",                 GROUP_NORM),
    ("encoder.down1.model.0.block.0",     "encoder/down1/model_0/block_0",              CONV),
    ("encoder.down1.model.0.block.1",     "encoder/down1/model_0/block_1",              GROUP_NORM),
    ("encoder.down2.model.0.block.0",     "encoder/down2/model_0/block_0",              CONV),
    ("encoder.down2.model.0.block.1",     "encoder/down2/model_0/block_1",              GROUP_NORM),
    ("encoder.down3.model.0.block.0",     "encoder/down3/model_0/block_0",              CONV),
    ("encoder.down3.model.0.block.1",     "encoder/down3/model_0/block_1",              GROUP_NORM),
    ("decoder.up1.0",                     "decoder/up1_0",                              CONV_TRANSPOSE),
    ("decoder.up1.1",                     "decoder/up1_1",                              GROUP_NORM),
    ("decoder.up2.model.0",               "decoder/up2/model_0",                        CONV_TRANSPOSE),
    ("decoder.up2.model.1.block.0",       "decoder/up2/model_1/block_0",                CONV),
    ("decoder.up2.model.1.block.1",       "decoder/up2/model_1/block_1",                GROUP_NORM),
    ("decoder.up3.model.0",               "decoder/up3/model_0",                        CONV_TRANSPOSE),
    ("decoder.up3.model.1.block.0",       "decoder/up3/model_1/block_0",                CONV),
    ("decoder.up3.model.1.block.1",       "decoder/up3/model_1/block_1",                GROUP_NORM),
    ("decoder.up4.model.0",               "decoder/up4/model_0",                        CONV_TRANSPOSE),
    ("decoder.up4.model.1.block.0",       "decoder/up4/model_1/block_0",                CONV),
    ("decoder.up4.model.1.block.1",       "decoder/up4/model_1/block_1",                GROUP_NORM),
    ("decoder.out",                       "decoder/out",                                CONV),
    ("time_embedding_layer.lin1",         "time_embedding_layer/lin1",                  LINEAR_NO_BIAS),
    ("time_embedding_layer.lin2",         "time_embedding_layer/lin2",                  LINEAR),
)

def _rows():
    """(torch key, Flax path tuple, permutation) for every tensor, in torch's state_dict order."""
    for torch_module, flax_module, kind in LAYERS:
        for torch_leaf, (flax_leaf, perm) in kind.items():
            yield f"{torch_module}.{torch_leaf}", (*flax_module.split("/"), flax_leaf), perm


def _inverse(perm):
    return None if perm is None else tuple(int(i) for i in np.argsort(perm))


def _permute(array, perm):
    return array if perm is None else np.ascontiguousarray(np.transpose(array, perm))


@functools.cache
def flax_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """The Flax parameter shapes, read off the model itself (no FLOPs spent)."""
    variables = jax.eval_shape(init_variables, jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def torch_shapes() -> dict[str, tuple[int, ...]]:
    """The tutorial's state_dict shapes, derived from the Flax ones through the table."""
    shapes = flax_shapes()
    return {key: _permute_shape(shapes[path], _inverse(perm)) for key, path, perm in _rows()}


def _permute_shape(shape, perm):
    return tuple(shape) if perm is None else tuple(shape[i] for i in perm)


def _check(found: Mapping[str, tuple], expected: Mapping[str, tuple], what: str):
    """Raise one error listing every missing, unexpected or misshapen name."""
    problems = [f"  missing: {k} (expected shape {expected[k]})" for k in expected if k not in found]
    problems += [f"  unexpected: {k} (shape {found[k]})" for k in found if k not in expected]
    problems += [f"  wrong shape: {k}: expected {expected[k]}, found {found[k]}"
                 for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if problems:
        raise CheckpointMismatchError(
            f"{what} does not match the tutorial's Unet ({len(problems)} problem(s)):\n" + "\n".join(problems)
        )


# ---------------------------------------------------------------------------- torch side I/O
# torch is imported only where a torch tensor is made or a .pt file read, so that a JAX-only
# install ports .safetensors files and NumPy state_dicts.

def _to_numpy(value) -> np.ndarray:
    torch = sys.modules.get("torch")  # without torch imported, no value is a torch tensor
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16; keep the bits
            return value.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def _to_torch(array: np.ndarray):
    torch = import_torch("flax_to_torch (torch tensors)")
    array = np.array(array, copy=True, order="C")  # jax hands out read-only buffers; torch wants its own
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def read_weights(path: str | os.PathLike) -> dict:
    """A weights file's state_dict: ``.safetensors`` as NumPy arrays (no torch needed), ``.pt``/``.pth``
    as torch tensors through ``unet_torch.weights`` (pickled code never runs).

    Raises WeightsFileError, naming the file, for anything that is not a readable state_dict.
    """
    path = check_weights_file(path)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.flax import load_file  # the flax reader keeps bfloat16, which NumPy's drops

        try:
            return {k: np.asarray(v) for k, v in load_file(path).items()}
        except SafetensorError as error:
            raise unreadable_safetensors(path, error) from None
    try:
        from unet_torch.weights import load_state_dict
    except ImportError:
        raise WeightsFileError(f"{path!r} is a torch file, and reading it needs torch: {TORCH_EXTRA}; "
                               "or save the weights as .safetensors") from None
    return load_state_dict(path)


# ---------------------------------------------------------------------------- the two directions

def torch_to_flax(source) -> dict:
    """Port the tutorial Unet's weights to ``{'params': ...}`` for ``unet_jax.Unet``.

    Args:
      source: a state_dict (torch tensors or numpy arrays), or a path to a ``.pt``/``.pth``
        (loaded with ``weights_only=True``) or ``.safetensors`` file. A ``module.`` (DDP)
        or ``_orig_mod.`` (torch.compile) prefix on every key is stripped.

    Returns:
      ``{'params': nested dict of jax arrays}`` in the checkpoint's dtype. float64 stays
      float64 when ``jax_enable_x64`` is on, and becomes float32 when it is off.

    Raises:
      WeightsFileError: a path that is not a readable state_dict file.
      CheckpointMismatchError: listing every missing key, unexpected key, wrong shape and
        non-float tensor.
    """
    state_dict = read_weights(source) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a state_dict or a path, got {type(state_dict).__name__}")
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        raise CheckpointMismatchError(
            "this looks like a training checkpoint, not a state_dict: pass checkpoint['state_dict']"
        )
    arrays = {k: _to_numpy(v) for k, v in strip_wrapper_prefix(state_dict).items()}
    _check({k: a.shape for k, a in arrays.items()}, torch_shapes(), "the state_dict")
    check_floating(arrays)

    x64 = jax.config.jax_enable_x64
    params: dict = {}
    for key, path, perm in _rows():
        array = _permute(arrays[key], perm)
        if array.dtype == np.float64 and not x64:
            array = array.astype(np.float32)
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(array)
    return {"params": params}


def flax_to_torch(variables) -> collections.OrderedDict:
    """Port ``{'params': ...}`` of ``unet_jax.Unet`` to a state_dict for the tutorial's ``Unet``.

    The result loads into ``unet_torch.Unet`` (and the tutorial's own class) with
    ``strict=True``; tensors keep the parameters' dtype.
    """
    return collections.OrderedDict((k, _to_torch(a)) for k, a in flax_to_numpy(variables).items())


def flax_to_numpy(variables) -> collections.OrderedDict:
    """``flax_to_torch`` as NumPy arrays, with torch's names and layouts: what a .safetensors file holds."""
    params = variables["params"] if "params" in variables else variables
    flat = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    _check({"/".join(p): tuple(np.shape(a)) for p, a in flat.items()},
           {"/".join(p): s for p, s in flax_shapes().items()}, "the Flax parameters")
    state_dict = collections.OrderedDict()
    for key, path, perm in _rows():
        state_dict[key] = _permute(np.asarray(flat[path]), _inverse(perm))
    return state_dict
