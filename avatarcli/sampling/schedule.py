"""Flow-matching schedule: the one place sigmas and timesteps come from.

Matches diffusers' FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5, no dynamic shifting), which
the reference uses: the training sigma range is already shifted, and the inference grid is shifted again, so the
small end is shifted twice (the last non-zero sigma at 50 steps is 0.0244, not 0.005).
"""

from __future__ import annotations

import numpy as np
import torch


def shift_sigma(sigma: np.ndarray | float, shift: float):
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_sigmas(steps: int, shift: float = 5.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """steps + 1 float32 sigmas from 1.0 down to 0 (the trailing 0 included). Model timestep = sigma * 1000."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    # diffusers derives the end of the grid from its float32 training sigmas; doing the same keeps us bit-exact.
    sigma_min = float(shift_sigma(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float32), shift))
    t = np.linspace(num_train_timesteps, sigma_min * num_train_timesteps, steps)
    sigmas = shift_sigma(t / num_train_timesteps, shift)
    return torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])


def timesteps(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Float model timesteps (float32 sigma * 1000, as the reference feeds them)."""
    return sigmas[:-1] * num_train_timesteps


def euler_step(sample: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """x_{next} = x + (sigma_next - sigma) * v, in the sample's precision (float32 in the reference)."""
    return sample + (sigma_next - sigma) * velocity
