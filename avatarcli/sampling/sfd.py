"""Semantic-first sampling (SFD, arXiv 2512.04926): schedule, guidance and integrators as plain functions.

Time convention (SiT): t = 0 is noise, t = 1 is data, and the model predicts v ~ data - noise. One global
time tau runs from 0 to 1 + delta_t; the semantic stream sees t_sem = min(tau, 1) and the texture stream
t_tex = max(tau - delta_t, 0), so semantics run delta_t ahead. Three phases follow:
  I   [0, delta_t]       only the semantic channels move (texture stays noise, t_tex = 0);
  II  [delta_t, 1]       both move;
  III [1, 1 + delta_t]   only the texture moves (semantics frozen at t_sem = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor, nn

# velocity(x, t_tex, t_sem) -> v, with t_tex / t_sem of shape [B].
Velocity = Callable[[Tensor, Tensor, Tensor], Tensor]
# drift(tau, x) -> dx/dtau.
Drift = Callable[[float, Tensor], Tensor]

DELTA_T = 0.3


# ----------------------------------------------------------------------------------------------- schedule


def check_delta_t(delta_t: float) -> None:
    if not 0.0 <= delta_t <= 1.0:
        raise ValueError(f"delta_t must lie in [0, 1], got {delta_t}")


def stream_times(tau: Tensor, delta_t: float) -> tuple[Tensor, Tensor]:
    """(t_tex, t_sem) for a float32 tau tensor, computed in float32 as the reference does."""
    return (tau - delta_t).clamp(min=0.0), tau.clamp(max=1.0)


def stream_masks(tau: float, delta_t: float) -> tuple[float, float]:
    """Reference rule, evaluated at the drift's own time: texture moves for tau >= delta_t, semantics for tau <= 1."""
    return float(tau >= delta_t), float(tau <= 1.0)


def phase_boundaries(delta_t: float) -> list[float]:
    """[0, delta_t, 1, 1 + delta_t] without empty phases (delta_t = 0 gives [0, 1])."""
    check_delta_t(delta_t)
    points = [0.0, delta_t, 1.0, 1.0 + delta_t]
    return [p for i, p in enumerate(points) if i == 0 or p > points[i - 1]]


def phase_grid(num_steps: int, delta_t: float = DELTA_T) -> list[float]:
    """Global-time grid with the phase boundaries as grid points and near-uniform steps.

    Steps are shared among the phases in proportion to their length (largest remainder, at least one each).
    """
    bounds = phase_boundaries(delta_t)
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if num_steps < len(lengths):
        raise ValueError(f"need at least {len(lengths)} steps, one per phase, got {num_steps}")
    total = bounds[-1]
    shares = [num_steps * length / total for length in lengths]
    counts = [max(1, math.floor(s)) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: shares[i] - math.floor(shares[i]), reverse=True)
    for i in by_remainder[: num_steps - sum(counts)]:
        counts[i] += 1
    while sum(counts) > num_steps:
        counts[max(range(len(counts)), key=lambda i: counts[i])] -= 1
    grid = [0.0]
    for (a, b), n in zip(zip(bounds[:-1], bounds[1:]), counts):
        grid += [a + (b - a) * k / n for k in range(1, n)] + [b]
    return grid


def reference_grid(num_points: int, delta_t: float = DELTA_T) -> list[float]:
    """The reference's fixed-step grid: float32 linspace(0, 1 + delta_t, num_points) (no breakpoints)."""
    return torch.linspace(0.0, 1.0 + delta_t, num_points, dtype=torch.float32).tolist()


@dataclass(frozen=True)
class Step:
    tau: float
    tau_next: float
    mask_tex: float
    mask_sem: float


def plan_steps(grid: list[float], delta_t: float = DELTA_T,
               masks: Literal["interval", "left"] = "interval") -> list[Step]:
    """One Step per grid interval, with the stream masks that hold during it.

    "interval": the phase of the open interval (its midpoint); right for grids from `phase_grid`, so each
    stream integrates exactly one unit of its own time. "left": the reference rule at the left grid point,
    which is what the reference's Euler does on its linspace grid (float32 quirks included).
    """
    check_delta_t(delta_t)
    if masks not in ("interval", "left"):
        raise ValueError(f"masks must be 'interval' or 'left', got {masks!r}")
    steps = []
    for tau, tau_next in zip(grid[:-1], grid[1:]):
        if masks == "left":
            mask_tex, mask_sem = stream_masks(tau, delta_t)
        else:
            middle = 0.5 * (tau + tau_next)
            mask_tex, mask_sem = float(middle > delta_t), float(middle < 1.0)
        steps.append(Step(tau, tau_next, mask_tex, mask_sem))
    return steps


def apply_masks(v: Tensor, mask_tex: float, mask_sem: float, texture_chans: int) -> Tensor:
    if mask_tex == 1.0 and mask_sem == 1.0:
        return v
    return torch.cat([v[:, :texture_chans] * mask_tex, v[:, texture_chans:] * mask_sem], dim=1)


def stream_velocity(velocity: Velocity, x: Tensor, tau: float, delta_t: float) -> Tensor:
    tau_batch = torch.full((x.shape[0],), tau, dtype=torch.float32, device=x.device)
    t_tex, t_sem = stream_times(tau_batch, delta_t)
    return velocity(x, t_tex, t_sem)


def semantic_first_drift(velocity: Velocity, delta_t: float, texture_chans: int) -> Drift:
    """dx/dtau with the reference's masks at the evaluation time (for the adaptive integrator)."""

    def drift(tau: float, x: Tensor) -> Tensor:
        return apply_masks(stream_velocity(velocity, x, tau, delta_t), *stream_masks(tau, delta_t), texture_chans)

    return drift


# ----------------------------------------------------------------------------------------------- guidance


@dataclass(frozen=True)
class Guidance:
    """How the conditional velocity is pushed away from a weaker prediction, per stream.

    cfg: the weaker prediction is the same model with the null label (one forward on a doubled batch).
    autoguidance: it is a smaller, less-trained model with the SAME label (Karras et al. 2024), as used for
    SFD's headline numbers. v = weak + scale * (strong - weak), scale_tex on texture, scale_sem on semantics.
    """

    kind: Literal["none", "cfg", "autoguidance"] = "none"
    scale_tex: float = 1.0
    scale_sem: float = 1.0


def extrapolate(strong: Tensor, weak: Tensor, guidance: Guidance, texture_chans: int) -> Tensor:
    tex = weak[:, :texture_chans] + guidance.scale_tex * (strong[:, :texture_chans] - weak[:, :texture_chans])
    sem = weak[:, texture_chans:] + guidance.scale_sem * (strong[:, texture_chans:] - weak[:, texture_chans:])
    return torch.cat([tex, sem], dim=1)


def guided_velocity(
    model: nn.Module,
    y: Tensor,
    guidance: Guidance,
    *,
    texture_chans: int,
    null_class: int = 1000,
    guidance_model: nn.Module | None = None,
    dtype: torch.dtype = torch.float32,
) -> Velocity:
    """Velocity callable for the sampler; the state stays float32, the networks run in `dtype`."""

    def run(net: nn.Module, x: Tensor, t_tex: Tensor, t_sem: Tensor, labels: Tensor) -> Tensor:
        return net(x.to(dtype), t_tex, t_sem, labels).float()

    def velocity(x: Tensor, t_tex: Tensor, t_sem: Tensor) -> Tensor:
        if guidance.kind == "none":
            return run(model, x, t_tex, t_sem, y)
        if guidance.kind == "cfg":
            both = run(model, torch.cat([x, x]), torch.cat([t_tex, t_tex]), torch.cat([t_sem, t_sem]),
                       torch.cat([y, torch.full_like(y, null_class)]))
            cond, uncond = both.chunk(2)
            return extrapolate(cond, uncond, guidance, texture_chans)
        if guidance_model is None:
            raise ValueError("autoguidance needs a guidance model")
        strong = run(model, x, t_tex, t_sem, y)
        weak = run(guidance_model, x, t_tex, t_sem, y)
        return extrapolate(strong, weak, guidance, texture_chans)

    return velocity


# ----------------------------------------------------------------------------------------------- integrators


@dataclass
class SampleOutput:
    x: Tensor
    nfe: int


def euler(velocity: Velocity, x: Tensor, steps: list[Step], *, delta_t: float, texture_chans: int,
          callback: Callable[[int, Tensor], None] | None = None) -> SampleOutput:
    for i, step in enumerate(steps):
        v = stream_velocity(velocity, x, step.tau, delta_t)
        # The step is the float32 difference of float32 grid values, as in the reference.
        h = float(torch.tensor(step.tau_next, dtype=torch.float32) - torch.tensor(step.tau, dtype=torch.float32))
        x = x + h * apply_masks(v, step.mask_tex, step.mask_sem, texture_chans)
        if callback is not None:
            callback(i, x)
    return SampleOutput(x, len(steps))


def heun(velocity: Velocity, x: Tensor, steps: list[Step], *, delta_t: float, texture_chans: int,
         callback: Callable[[int, Tensor], None] | None = None) -> SampleOutput:
    """Explicit trapezoid rule; both stages use the step's masks, so grids must contain the phase boundaries."""
    for i, step in enumerate(steps):
        h = step.tau_next - step.tau
        v0 = apply_masks(stream_velocity(velocity, x, step.tau, delta_t), step.mask_tex, step.mask_sem, texture_chans)
        x_pred = x + h * v0
        v1 = apply_masks(stream_velocity(velocity, x_pred, step.tau_next, delta_t), step.mask_tex, step.mask_sem,
                         texture_chans)
        x = x + 0.5 * h * (v0 + v1)
        if callback is not None:
            callback(i, x)
    return SampleOutput(x, 2 * len(steps))


# Dormand-Prince 5(4) tableau (Dormand & Prince 1980); B5 gives the propagated solution, B5 - B4 the error.
# B4 is the embedded 4th-order weight set torchdiffeq uses (not Hairer's 5179/57600 set): it sets the error
# estimate, hence the step sizes and NFE, so it must match the reference's solver.
DOPRI_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DOPRI_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
DOPRI_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
DOPRI_B4 = (1951 / 21600, 0.0, 22642 / 50085, 451 / 720, -12231 / 42400, 649 / 6300, 1 / 60)


def rms(x: Tensor) -> float:
    # One norm over the whole batch tensor, as torchdiffeq does: the batch shares one step size.
    return float(x.double().pow(2).mean().sqrt())


def initial_step(drift: Drift, t0: float, x0: Tensor, f0: Tensor, rtol: float, atol: float, order: int = 4) -> float:
    """Starting step heuristic of Hairer, Norsett & Wanner (Solving ODEs I, II.4), as torchdiffeq uses it."""
    scale = atol + x0.abs() * rtol
    d0, d1 = rms(x0 / scale), rms(f0 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    f1 = drift(t0 + h0, x0 + h0 * f0)
    d2 = rms((f1 - f0) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1)


def dopri5(drift: Drift, x: Tensor, t0: float, t1: float, *, rtol: float = 1e-3, atol: float = 1e-6,
           max_nfe: int = 100_000) -> SampleOutput:
    """Adaptive Dormand-Prince 5(4) from t0 to t1 with torchdiffeq's error norm and step-size controller.

    Deliberate difference from torchdiffeq: the last step is shortened to end exactly on t1 instead of
    overshooting and interpolating, so the networks are never asked for times beyond t1 (t_tex > 1).
    """
    f0 = drift(t0, x)
    nfe = 1
    h = initial_step(drift, t0, x, f0, rtol, atol)
    nfe += 1
    t = t0
    while t1 - t > 1e-12 * max(1.0, abs(t1)):
        if nfe > max_nfe:
            raise RuntimeError(f"dopri5 took more than {max_nfe} evaluations")
        h = min(h, t1 - t)
        k = [f0]
        for stage in range(1, 7):
            x_stage = x + h * sum(a * k_j for a, k_j in zip(DOPRI_A[stage], k) if a != 0.0)
            k.append(drift(t + DOPRI_C[stage] * h, x_stage))
        nfe += 6
        x_new = x + h * sum(b * k_j for b, k_j in zip(DOPRI_B5, k) if b != 0.0)
        error = h * sum((b5 - b4) * k_j for b5, b4, k_j in zip(DOPRI_B5, DOPRI_B4, k) if b5 != b4)
        tolerance = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        error_ratio = rms(error / tolerance)
        if error_ratio <= 1.0:
            t, x, f0 = t + h, x_new, k[6]  # first-same-as-last: k7 is the drift at the new point
        # torchdiffeq's controller: safety 0.9, growth at most 10x, shrink at most 5x after a rejection.
        if error_ratio == 0.0:
            h *= 10.0
        else:
            shrink_limit = 1.0 if error_ratio < 1.0 else 0.2
            h *= min(10.0, max(0.9 / error_ratio ** (1 / 5), shrink_limit))
    return SampleOutput(x, nfe)


# ----------------------------------------------------------------------------------------------- entry point

Solver = Literal["euler", "heun", "dopri5"]


def sample(
    velocity: Velocity,
    noise: Tensor,
    *,
    texture_chans: int,
    delta_t: float = DELTA_T,
    solver: Solver = "euler",
    num_steps: int = 100,
    rtol: float = 1e-3,
    atol: float = 1e-6,
) -> SampleOutput:
    """Integrate the semantic-first ODE from pure noise (tau = 0) to data (tau = 1 + delta_t)."""
    if solver == "dopri5":
        drift = semantic_first_drift(velocity, delta_t, texture_chans)
        return dopri5(drift, noise, 0.0, 1.0 + delta_t, rtol=rtol, atol=atol)
    steps = plan_steps(phase_grid(num_steps, delta_t), delta_t, masks="interval")
    integrate = euler if solver == "euler" else heun
    return integrate(velocity, noise, steps, delta_t=delta_t, texture_chans=texture_chans)
