"""Run the torch reference and the Flax mirror on the same inputs and compare everything.

One row per tensor the tutorial names (``x_f`` ... ``eps_hat``, plus ``temb``) and one row
per parameter gradient of an MSE loss against fixed noise. Activations are held to their
max absolute difference, divided by the tensor's max magnitude where that exceeds 1;
gradients to ‖Δ‖ / ‖g‖, the difference's norm relative to the gradient's own, since raw
gradients span many orders of magnitude across layers.

The network makes discrete decisions: each ReLU's sign (is its input above 0?) and each
max-pool window's winner. Where an input lies within float32 rounding of such a kink (a
ReLU input of 2e-7, two window entries 6e-8 apart), torch and XLA, whose forward values
differ by that rounding, may decide it differently, and route that element's gradient
differently: both are correct (sub)gradients, and the difference reaches every parameter
whose gradient passes back through that layer. So the decisions of both sides are read off
the very forward passes that gave the gradients (the torch modules' inputs; the Flax
GroupNorms' outputs, which the ReLUs take), and where one differs, the gradients of the
parameters of that layer's stage and of every stage before it (``upstream_of``) are
reported as skipped, naming the layer, rather than compared, and never counted as passed.
float64 has always decided alike, and is always compared.
"""

import copy
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from ddpm_recipe.schedule import N_T
from parity.port import (
    GROUP_NORM,
    LAYERS,
    CheckpointMismatchError,
    check_floating,
    flax_to_torch,
    strip_wrapper_prefix,
    torch_to_flax,
)
from unet_jax.layers import GroupNorm
from unet_jax.model import Unet
from unet_torch.weights import load_state_dict

ACTIVATIONS = ("x_f", "d1", "d2", "d3", "latent", "temb", "u1", "u2", "u3", "u4", "eps_hat")
# (activations: max |diff| / max(1, max |ref|); gradients: ||diff|| / ||grad||)
TOLERANCES = {"float32": (1e-5, 1e-4), "float64": (1e-12, 1e-10)}
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# The UNet's stages in forward order, by parameter-name prefix. The time embedding joins at the
# decoder's input, so no encoder decision reaches it.
STAGES = ("encoder.initial_features.", "encoder.down1.", "encoder.down2.", "encoder.down3.", "time_embedding_layer.",
          "decoder.up1.", "decoder.up2.", "decoder.up3.", "decoder.up4.", "decoder.out.")
# torch GroupNorm -> its Flax path: the input of the ReLU after it is that GroupNorm's output.
_GROUP_NORMS = {torch_name: flax_path for torch_name, flax_path, kind in LAYERS if kind is GROUP_NORM}
# The decisions: each ReLU after a GroupNorm, and each max-pool after a ConvBlock's ReLU, with that
# GroupNorm. (The ReLU after the encoder's average pool is left out: its input, an average of ReLU
# outputs, is 0 only where they all are, on both sides alike.)
RELU_AFTER = {"encoder.initial_features.2": "encoder.initial_features.1", "decoder.up1.2": "decoder.up1.1"} | {
    f"{block}.2": f"{block}.1" for block in ("encoder.down1.model.0.block", "encoder.down2.model.0.block",
                                             "encoder.down3.model.0.block", "decoder.up2.model.1.block",
                                             "decoder.up3.model.1.block", "decoder.up4.model.1.block")}
POOL_AFTER = {f"encoder.down{k}.model.1": f"encoder.down{k}.model.0.block.1" for k in (1, 2, 3)}


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    shape: tuple
    max_abs: float
    max_rel: float
    tolerance: float
    metric: str  # "abs" or "rel": which of the two is held to the tolerance
    skipped: str = ""  # why the row is not held to its tolerance, if it is not

    @property
    def passed(self) -> bool:
        """Compared, and within its tolerance (a skipped row has not passed)."""
        return not self.skipped and bool(np.isfinite(self.max_rel) and self.max_rel <= self.tolerance)

    @property
    def failed(self) -> bool:
        return not self.skipped and not self.passed


def _nchw_to_nhwc(array):
    return np.transpose(array, (0, 2, 3, 1)) if array.ndim == 4 else array


def torch_intermediates(model, x, t) -> dict[str, torch.Tensor]:
    """What ``unet_torch.Unet.forward`` computes, keeping every named tensor."""
    x_f, d1, d2, d3, latent = model.encoder(x)
    temb = model.time_embedding_layer(t)
    u1, u2, u3, u4, eps_hat = model.decoder(latent + temb, d3, d2, d1, x_f)
    return dict(x_f=x_f, d1=d1, d2=d2, d3=d3, latent=latent, temb=temb, u1=u1, u2=u2, u3=u3, u4=u4, eps_hat=eps_hat)


def upstream_of(module: str, parameter_names) -> list[str]:
    """The parameters whose gradients pass back through ``module`` ('encoder.down2.model.1'): those
    of its stage and of every stage before it in the forward pass."""
    stage = next(i for i, prefix in enumerate(STAGES) if module.startswith(prefix))
    return [name for name in parameter_names if name.startswith(STAGES[: stage + 1])]


def _record_inputs(model) -> tuple[dict, list]:
    """Hooks that keep the input of each module in RELU_AFTER and POOL_AFTER, by name, from the
    next forward pass."""
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0].detach()))
             for name, m in model.named_modules() if name in RELU_AFTER or name in POOL_AFTER]
    return inputs, hooks


def _windows(a_BxHxWxC):
    """Each 2x2 window's four entries in row-major order (torch's floor: a 7x7 map's last row and
    column belong to none)."""
    b, h, w, c = a_BxHxWxC.shape
    windows = a_BxHxWxC[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
    return windows.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4)


def decisions_that_differ(torch_inputs: dict, flax_group_norms: dict) -> dict[str, str]:
    """Module name -> what it decided otherwise on the Flax side, for each ReLU and max-pool of
    ``torch_inputs`` that did.

    ``torch_inputs``: the input of each module in RELU_AFTER and POOL_AFTER (NHWC, by torch name);
    ``flax_group_norms``: each GroupNorm's output on the Flax side (NHWC, by torch name).
    """
    differ = {}
    for name, z in torch_inputs.items():
        if name in RELU_AFTER:
            flipped = (flax_group_norms[RELU_AFTER[name]] > 0) != (z > 0)
            if flipped.any():
                differ[name] = (f"ReLU {name} takes {int(flipped.sum())} input(s) on the other side of 0 "
                                f"(torch's closest: {np.abs(z[flipped]).min():.1e})")
        else:  # a pool, whose input on the Flax side is that GroupNorm's output after the ReLU
            theirs, ours = _windows(z), _windows(np.maximum(flax_group_norms[POOL_AFTER[name]], 0))
            # The first of equal maxima wins on both sides; a window of zeros sends no gradient
            # back past its ReLU, whoever wins.
            other = (theirs.argmax(-1) != ours.argmax(-1)) & (theirs.max(-1) > 0)
            if other.any():
                ranked = np.sort(theirs[other], -1)
                gap = (ranked[:, -1] - ranked[:, -2]).min()
                differ[name] = (f"max-pool {name} picks another winner in {int(other.sum())} window(s) "
                                f"(torch's closest two: {gap:.1e} apart)")
    return differ


def make_inputs(seed: int, batch: int, dtype: str):
    """NCHW images, t in {1/n_T, ..., 1} with both ends present (t = 1/n_T alone at batch 1), and target noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 1, 28, 28))
    steps = rng.integers(1, N_T + 1, size=batch)
    steps[0] = 1
    steps[-1] = N_T
    t = steps / N_T
    noise = rng.standard_normal((batch, 1, 28, 28))
    return x.astype(dtype), t.astype(dtype), noise.astype(dtype)


def perturb_norms(model, seed: int):
    """Move GroupNorm scales and shifts away from 1 and 0, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(0.3 * torch.randn(module.weight.shape, generator=generator, dtype=module.weight.dtype))
                module.bias.add_(0.3 * torch.randn(module.bias.shape, generator=generator, dtype=module.bias.dtype))


def build_torch_model(seed: int, dtype: str, weights=None):
    from unet_torch import Unet as TorchUnet

    torch.manual_seed(seed)
    model = TorchUnet()
    if weights is not None:
        state_dict = strip_wrapper_prefix(load_state_dict(weights) if isinstance(weights, str) else weights)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:  # torch lists the missing, unexpected and misshapen keys
            raise CheckpointMismatchError("the state_dict does not match the tutorial's Unet:\n"
                                          + str(error).split(":", 1)[-1].strip()) from None
        check_floating(state_dict)  # after the names: they say more
    else:
        perturb_norms(model, seed)
    return model.to(TORCH_DTYPES[dtype])


def compare(model, *, seed: int = 0, batch: int = 8, dtype: str = "float32", fast: bool = True,
            conv: str = "xla") -> list[Row]:
    """Compare ``model`` (a torch Unet) with its Flax port on one batch; needs x64 for float64.

    ``conv`` is the Flax side's 3x3 conv lowering (a name in ``unet_jax.layers.CONV_LOWERINGS``).
    """
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("float64 parity needs jax_enable_x64: run under jax.enable_x64(True)")
    act_tol, grad_tol = TOLERANCES[dtype]
    x, t, noise = make_inputs(seed, batch, dtype)
    model = copy.deepcopy(model).to(TORCH_DTYPES[dtype])  # the caller's model keeps its dtype and its .grad
    variables = torch_to_flax(model.state_dict())

    # torch: activations and gradients of mean((eps_hat - noise)^2), and the decisions on the way
    model.zero_grad()
    decided, hooks = _record_inputs(model)
    try:
        ref = torch_intermediates(model, torch.from_numpy(x), torch.from_numpy(t))
    finally:
        for hook in hooks:
            hook.remove()
    torch.mean((ref["eps_hat"] - torch.from_numpy(noise)) ** 2).backward()
    ref_grads = {k: p.grad for k, p in model.named_parameters()}

    # jax: the same, NHWC
    ours, grads, group_norms = _jax_forward_and_grads(Unet(fast=fast, conv=conv), variables, _nchw_to_nhwc(x), t,
                                                      _nchw_to_nhwc(noise))
    grads = flax_to_torch(grads)
    assert decided.keys() == RELU_AFTER.keys() | POOL_AFTER.keys(), "a decision's torch module was not run"
    skips = {}
    if dtype == "float32":  # float64 decides alike, and is always compared
        group_norms = {name: np.asarray(group_norms[path]) for name, path in _GROUP_NORMS.items()}
        differ = decisions_that_differ({name: _nchw_to_nhwc(z.numpy()) for name, z in decided.items()}, group_norms)
        for module, what in differ.items():
            for name in upstream_of(module, ref_grads):
                skips.setdefault(name, what)

    rows = []
    for name in ACTIVATIONS:
        expected = _nchw_to_nhwc(ref[name].detach().numpy())
        rows.append(_row(name, expected, np.asarray(ours[name]), act_tol, "abs"))
    for name, expected in ref_grads.items():
        row = _row(f"grad {name}", expected.numpy(), grads[name].numpy(), grad_tol, "rel")
        rows.append(dataclasses.replace(row, skipped=skips.get(name, "")))
    return rows


@functools.partial(jax.jit, static_argnums=0)
def _jax_forward_and_grads(unet, variables, x, t, noise):
    """The named intermediates, the parameter gradients, and every GroupNorm's output by Flax
    path (the input of the ReLU after it), all of one forward pass.

    Each GroupNorm output passes an optimization barrier, so that the ReLU, the max-pool and the
    copy returned here read one buffer: XLA may otherwise recompute a cheap elementwise value
    inside each consumer's fusion, rounded differently, and the decisions returned would not be
    those the gradients took.
    """
    def loss(params):
        group_norms = {}

        def hold(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and isinstance(context.module, (GroupNorm, nn.GroupNorm)):
                out = lax.optimization_barrier(out)
                group_norms["/".join(context.module.path)] = out
            return out

        with nn.intercept_methods(hold):
            out = unet.apply({"params": params}, x, t, method=Unet.intermediates)
        return jnp.mean((out["eps_hat"] - noise) ** 2), (out, group_norms)

    grads, (intermediates, group_norms) = jax.grad(loss, has_aux=True)(variables["params"])
    return intermediates, {"params": grads}, group_norms


def _row(name, expected, found, tolerance, metric) -> Row:
    if expected.shape != found.shape:
        return Row(name, found.shape, np.inf, np.inf, tolerance, metric)
    expected, found = expected.astype(np.float64), found.astype(np.float64)
    diff = np.abs(expected - found)
    if metric == "abs":  # max |diff|, scaled down by the tensor's magnitude where that exceeds 1
        rel = diff.max() / max(1.0, np.abs(expected).max())
    else:  # gradients: ||diff|| / ||grad||
        norm = np.linalg.norm(expected)
        rel = np.linalg.norm(diff) / norm if norm > 0 else np.linalg.norm(diff)
    return Row(name, tuple(expected.shape), float(diff.max()), float(rel), tolerance, metric)


def format_table(rows: list[Row]) -> str:
    """Markdown. "checked error" is max|Δ| / max(1, max|ref|) for activations, ‖Δ‖/‖g‖ for gradients."""
    lines = [
        "| tensor | shape | max abs diff | checked error | tolerance | result |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        tol = f"{'abs' if r.metric == 'abs' else '‖Δ‖/‖g‖'} ≤ {r.tolerance:.0e}"
        result = f"skip: {r.skipped}" if r.skipped else ("pass" if r.passed else "FAIL")
        lines.append(f"| {r.name} | {tuple(r.shape)} | {r.max_abs:.2e} | {r.max_rel:.2e} | {tol} | {result} |")
    return "\n".join(lines)
