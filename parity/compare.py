"""Run the torch reference and the Flax mirror on the same inputs and compare everything.

One row per tensor the tutorial names (``x_f`` ... ``eps_hat``, plus ``temb``) and one row
per parameter gradient of an MSE loss against fixed noise. Activations are held to their
max absolute difference, divided by the tensor's max magnitude where that exceeds 1;
gradients to ‖Δ‖ / ‖g‖, the difference's norm relative to the gradient's own, since raw
gradients span many orders of magnitude across layers.

Max-pooling has a kink where two entries of a window tie. When the two largest entries
of some window are closer than ``POOL_TIE_MARGIN``, torch and XLA may each pick a different
winner from forward values that differ by float32 rounding (a few 1e-6 by the pools), and route that
window's gradient to different pixels: both are correct (sub)gradients. The gradients of
the parameters before that pool (only those: the decoder's and the time embedding's never
pass back through an encoder pool) are then reported as skipped, with the margin, rather
than compared, and never counted as passed; float64 resolves such windows identically and
is always compared.
"""

import copy
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

from ddpm_recipe.schedule import N_T
from parity.port import CheckpointMismatchError, check_floating, flax_to_torch, strip_wrapper_prefix, torch_to_flax
from unet_jax.model import Unet
from unet_torch.weights import load_state_dict

ACTIVATIONS = ("x_f", "d1", "d2", "d3", "latent", "temb", "u1", "u2", "u3", "u4", "eps_hat")
# (activations: max |diff| / max(1, max |ref|); gradients: ||diff|| / ||grad||)
TOLERANCES = {"float32": (1e-5, 1e-4), "float64": (1e-12, 1e-10)}
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
POOL_TIE_MARGIN = {"float32": 1e-6, "float64": 0.0}


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


def max_pool_margins(model, x) -> dict[str, float]:
    """Per max-pool (by module name, in forward order): the smallest gap between the two largest
    entries of any of its windows with a positive max."""
    inputs = {}
    pools = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.MaxPool2d)]
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0].detach()))
             for name, m in pools]
    try:
        with torch.no_grad():
            model.encoder(x)
    finally:
        for hook in hooks:
            hook.remove()
    margins = {}
    for name, a in inputs.items():
        b, c, h, w = a.shape
        windows = a[:, :, : h // 2 * 2, : w // 2 * 2].reshape(b, c, h // 2, 2, w // 2, 2)
        top2 = windows.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // 2, w // 2, 4).topk(2, dim=-1).values
        positive = top2[..., 0] > 0
        margins[name] = float((top2[..., 0] - top2[..., 1])[positive].min()) if positive.any() else np.inf
    return margins


def upstream_of(pool: str, parameter_names) -> list[str]:
    """The parameters computed before the max-pool ``pool`` ('encoder.down2.model.1'): the encoder's
    initial features and its down blocks up to the pool's own."""
    down = pool.split(".")[1]  # 'down2'
    blocks = ["encoder.initial_features."] + [f"encoder.down{k}." for k in range(1, int(down[len("down"):]) + 1)]
    return [name for name in parameter_names if name.startswith(tuple(blocks))]


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

    # torch: activations and gradients of mean((eps_hat - noise)^2)
    model.zero_grad()
    ref = torch_intermediates(model, torch.from_numpy(x), torch.from_numpy(t))
    torch.mean((ref["eps_hat"] - torch.from_numpy(noise)) ** 2).backward()
    ref_grads = {k: p.grad for k, p in model.named_parameters()}

    # jax: the same, NHWC
    ours, grads = _jax_forward_and_grads(Unet(fast=fast, conv=conv), variables, _nchw_to_nhwc(x), t, _nchw_to_nhwc(noise))
    grads = flax_to_torch(grads)
    skips = {}
    for pool, margin in max_pool_margins(model, torch.from_numpy(x)).items():
        if margin < POOL_TIE_MARGIN[dtype]:
            for name in upstream_of(pool, ref_grads):
                skips.setdefault(name, f"max-pool near-tie in {pool} (margin {margin:.1e} < {POOL_TIE_MARGIN[dtype]:.0e})")

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
    def loss(params):
        return jnp.mean((unet.apply({"params": params}, x, t) - noise) ** 2)

    intermediates = unet.apply(variables, x, t, method=Unet.intermediates)
    return intermediates, {"params": jax.grad(loss)(variables["params"])}


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
