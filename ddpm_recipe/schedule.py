"""The DDPM noise schedule, defined once in float64 NumPy for both frameworks.

Ho et al. (2020): linear betas from beta_1 = 1e-4 to beta_T = 0.02 over T = 1000 steps.
Arrays are indexed by the timestep t itself, 0..T; index 0 is "no noise" (beta_0 = 0,
alpha_bar_0 = 1), so a sampler's last step lands exactly on the clean image. Both trainers
and both samplers read this module, so they run on the very same numbers.
"""

import math
from typing import NamedTuple

import numpy as np

N_T = 1000
BETA_1 = 1e-4
BETA_T = 0.02


class Schedule(NamedTuple):
    beta: np.ndarray  # (T+1,)
    alpha: np.ndarray  # 1 - beta
    alpha_bar: np.ndarray  # prod_{s<=t} alpha_s
    sqrt_alpha_bar: np.ndarray
    sqrt_one_minus_alpha_bar: np.ndarray

    @property
    def n_T(self) -> int:
        return len(self.beta) - 1


# The samplers' defaults, the same in both frameworks and on every command line: DDIM with
# eta = 1 and x0 clipped to [-1, 1] drew cleaner digits from short runs than eta = 0 unclipped
# (see benchmarks/README.md, What the models draw).
DEFAULT_SAMPLER = "ddim"
DEFAULT_SAMPLE_STEPS = 100
DEFAULT_ETA = 1.0
DEFAULT_CLIP_X0 = True


def linear_schedule(n_T: int = N_T, beta_1: float = BETA_1, beta_T: float = BETA_T) -> Schedule:
    """The float64 schedule for timesteps 0..n_T."""
    if n_T < 1:
        raise ValueError(f"expected n_T >= 1, got {n_T}")
    beta = np.concatenate([[0.0], np.linspace(beta_1, beta_T, n_T, dtype=np.float64)])
    alpha = 1.0 - beta
    alpha_bar = np.cumprod(alpha)
    return Schedule(beta, alpha, alpha_bar, np.sqrt(alpha_bar), np.sqrt(1.0 - alpha_bar))


def check_eta(eta) -> None:
    """DDIM's eta scales the noise each step adds: 0 adds none, 1 is DDPM-like; below 0 means nothing."""
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"expected DDIM eta >= 0 (0 deterministic, 1 DDPM-like), got {eta}")


def ddim_timesteps(n_T: int, steps: int) -> np.ndarray:
    """``steps`` timesteps spread evenly over 1..n_T, ascending, always including n_T."""
    if not 1 <= steps <= n_T:
        raise ValueError(f"expected 1 <= sample steps <= {n_T}, got {steps}")
    return np.unique(np.round(np.linspace(n_T, 1, steps)).astype(np.int64))
