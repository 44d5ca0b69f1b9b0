"""The 4-step schedule and update of FlashPortrait's step-distilled path (LightX2V's step-distill scheduler).

Schedule: the 1000 training sigmas linspace(1, 0, 1001)[:-1] in float32, shifted (`shift_sigma`), taken at the
timesteps of `denoising_step_list` (index 1000 - t), then a trailing 0. With [1000, 750, 500, 250] and shift 5 that
is 1.0, 0.9375, 0.8333, 0.625, 0; the model timesteps are the shifted sigmas x 1000 (float32), as in schedule.py.

Update: predict x0 = x - sigma v, then re-noise to the next sigma, x0 + sigma_next v (the last step returns x0).
That is the Euler step x + (sigma_next - sigma) v in exact arithmetic; it is written out here because the two round
differently in float32 and the reference computes it this way.
"""

from __future__ import annotations

import torch

from avatarcli.sampling.schedule import euler_step, flow_sigmas, shift_sigma

DENOISING_STEP_LIST = (1000, 750, 500, 250)
SCHEDULES = ("flow", "step_distill")


def step_distill_sigmas(denoising_step_list: tuple[int, ...] | list[int] = DENOISING_STEP_LIST, shift: float = 5.0,
                        num_train_timesteps: int = 1000) -> torch.Tensor:
    """len(list) + 1 float32 sigmas, the trailing 0 included (model timestep = sigma * 1000, `schedule.timesteps`)."""
    if not denoising_step_list:
        raise ValueError("the denoising step list is empty")
    for t in denoising_step_list:
        if not (isinstance(t, int) and 0 < t <= num_train_timesteps):
            raise ValueError(f"denoising steps must be integers in 1..{num_train_timesteps}, got {t!r}")
    if list(denoising_step_list) != sorted(denoising_step_list, reverse=True) or \
            len(set(denoising_step_list)) != len(denoising_step_list):
        raise ValueError(f"denoising steps must strictly decrease, got {list(denoising_step_list)}")
    train_sigmas = shift_sigma(torch.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1], shift)
    picked = train_sigmas[[num_train_timesteps - t for t in denoising_step_list]]
    return torch.cat([picked, torch.zeros(1)])


def step_distill_step(sample: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """x0 = x - sigma v, then x0 + sigma_next v (x0 itself when sigma_next is 0), in float32 like the reference;
    returned in the sample's dtype. Same signature as `schedule.euler_step`, so the samplers take either."""
    velocity, latents = velocity.to(torch.float32), sample.to(torch.float32)
    x0 = latents - sigma * velocity
    new = x0 if sigma_next == 0 else x0 + velocity * sigma_next
    return new.to(sample.dtype)


def schedule_for(kind: str, steps: int, shift: float = 5.0):
    """(sigmas, step update) for a preset's schedule: "flow" is the 30-step path's Euler flow matching,
    "step_distill" the distilled path, which exists only at its trained timesteps (4 steps)."""
    if kind == "flow":
        return flow_sigmas(steps, shift), euler_step
    if kind == "step_distill":
        if steps != len(DENOISING_STEP_LIST):
            raise ValueError(f"the step-distill schedule has {len(DENOISING_STEP_LIST)} steps (timesteps "
                             f"{', '.join(map(str, DENOISING_STEP_LIST))}), got steps={steps}")
        return step_distill_sigmas(DENOISING_STEP_LIST, shift), step_distill_step
    raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
