"""Guidance reuse: on some computed steps, run the conditional branch alone and reuse the guidance of earlier steps.

Every guidance rule here is affine in its branches with weights summing to 1 (cfg: v = b0 + s_a (b1 - b0) +
s_t (b2 - b1); ang: (1 + a + b) b0 - a b1 - b b2; FlashPortrait's expression CFG: off + s_e (on - off), with text
CFG a third branch), so the guided velocity is the conditional branch plus a fixed mix of the branch differences:
    v = b_cond + g,   g = combine(branches) - b_cond.
The differences, and so the correction g, change slowly along the path. A full-guidance step runs every branch in one
batched forward and stores g with its sigma; a reused-guidance step runs the conditional branch alone (batch 1) and
adds g taken from the window's last full-guidance steps: held (order 0) or extrapolated linearly in sigma (order 1).
When the differences are exactly constant, the reused velocity equals the full one.

The rule, per window, over the steps that call the denoiser (with step prediction on, the computed ones only):
  * the first `warmup` of them run full guidance;
  * after that at most `max_reused` reused-guidance steps follow each full one;
  * a step is reused only while the estimated error of the reused correction stays within `tolerance` times the norm
    of the window's last guided velocity. The estimate is the next term, as the step predictor's: the polynomial
    through one more stored correction minus the one used (or, with too few stored, the one through one fewer).
Each window keeps its own state (its stored corrections and counters), keyed by the window index in a bounded
`WindowCache` like the denoiser's conditioning: windows are denoised interleaved by the wavefront sampler, and a
window whose last steps are predicted never reaches the drop at its last step, so the oldest states are evicted.
The state depends only on the window's own calls, so the joint and the streaming order give the same frames; it is
saved and restored with a resumable run (`extras` / `load_extras`). Nothing is random.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from avatarcli.schema import check_instance, integer, number

if TYPE_CHECKING:  # presets import the settings below; torch is only needed once sampling runs
    import torch

    from avatarcli.sampling.windows import Window

EXTRAS_PREFIX = "reuse_"  # this piece's keys in a window's resumable extras (beside the step predictor's)


@dataclass(frozen=True)
class GuidanceReuse:
    """Guidance-reuse settings (a preset's `guidance_reuse` section; null: every computed step runs all branches).
    The limits are the only ones: presets and direct construction are checked against them (ValueError)."""

    # the first computed steps of every window run full guidance (one suffices to hold; two give a first difference)
    warmup: int = integer(1, 100, default=3)
    # after the warmup, at most this many reused-guidance steps between full ones
    max_reused: int = integer(1, 20, default=1)
    # 0: hold the last correction; 1: extrapolate it linearly in sigma through the last two
    order: int = integer(0, 1, default=1)
    # budget for the estimated error of the reused correction, relative to the last guided velocity's norm
    tolerance: float = number(0, 1000, above=True, default=0.05)

    def __post_init__(self):
        check_instance(self)

    def bind(self, denoiser: Any, sigmas: torch.Tensor) -> ReusingDenoiser:
        """`denoiser`: a WindowDenoiser (its guidance, `branch_predictions`); the result has the Denoiser signature."""
        return ReusingDenoiser(self, denoiser, sigmas)


@dataclass
class _WindowState:
    calls: int = 0  # denoiser calls of this window so far
    run: int = 0  # reused-guidance steps since the last full one
    sigmas: list[float] = field(default_factory=list)  # sigmas of the stored full-guidance steps, oldest first
    corrections: list[torch.Tensor] = field(default_factory=list)  # g = guided velocity - conditional branch
    scale: float = 0.0  # the norm of the last full-guidance step's guided velocity


class ReusingDenoiser:
    """Wraps a WindowDenoiser; per window it runs full guidance or the conditional branch alone (module notes)."""

    def __init__(self, settings: GuidanceReuse, denoiser: Any, sigmas: torch.Tensor):
        from avatarcli.sampling.denoiser import WindowCache

        self.settings, self.denoiser, self.guidance = settings, denoiser, denoiser.guidance
        self.sigmas = [float(s) for s in sigmas]
        self.steps = len(self.sigmas) - 1
        self.conditional = self.guidance.conditional
        self.enabled = len(self.guidance.branches) > 1
        self.windows = WindowCache(self.steps + 2)
        self.full_steps = self.reused_steps = 0
        self.trace: list[tuple[int, int, bool]] | None = None  # (window, step, reused) when a test asks

    def __call__(self, window: Window, step: int, latents: torch.Tensor) -> torch.Tensor:
        state = self.windows.get(window.index, _WindowState)
        correction = self.planned_correction(state, self.sigmas[step])
        if correction is not None:
            conditional = self.denoiser.branch_predictions(window, step, latents, [self.conditional])
            velocity = (conditional + correction).to(latents.device)
            state.run += 1
            self.reused_steps += 1
        else:
            velocity = self.full(state, window, step, latents)
            self.full_steps += 1
        state.calls += 1
        if self.trace is not None:
            self.trace.append((window.index, step, correction is not None))
        if step == self.steps - 1:
            self.windows.drop(window.index)
        return velocity

    def full(self, state: _WindowState, window: Window, step: int, latents: torch.Tensor) -> torch.Tensor:
        """Every branch in one forward (exactly the wrapped denoiser's velocity); the correction is stored."""
        pred = self.denoiser.branch_predictions(window, step, latents)
        velocity = self.guidance.combine(pred)
        keep = self.settings.order + 2
        c = self.conditional
        state.sigmas = (state.sigmas + [self.sigmas[step]])[-keep:]
        state.corrections = (state.corrections + [velocity - pred[c : c + 1]])[-keep:]
        state.scale, state.run = float(velocity.norm()), 0
        return velocity.to(latents.device)

    def planned_correction(self, state: _WindowState, sigma: float) -> torch.Tensor | None:
        """The correction to reuse at `sigma`, or None when this step runs full guidance (the rule above)."""
        s = self.settings
        if not self.enabled or state.calls < s.warmup or state.run >= s.max_reused or not state.sigmas:
            return None
        correction, error = estimate(state.sigmas, state.corrections, sigma, s.order)
        return correction if error <= s.tolerance * state.scale else None

    def extras(self) -> dict[int, dict]:
        """The live windows' state as plain data (tensors, numbers), for a resumable save."""
        import torch

        return {index: {"calls": st.calls, "run": st.run, "scale": st.scale,
                        "sigmas": torch.tensor(st.sigmas, dtype=torch.float64),
                        "corrections": torch.stack(st.corrections) if st.corrections else None}
                for index, st in self.windows.entries.items()}

    def load_extras(self, extras: dict[int, dict]) -> None:
        """Restore what `extras()` saved, so a resumed run reuses exactly as the uninterrupted one."""
        self.windows.entries = {}
        for index, data in extras.items():
            corrections = data["corrections"]
            self.windows.entries[int(index)] = _WindowState(
                calls=int(data["calls"]), run=int(data["run"]), scale=float(data["scale"]),
                sigmas=[float(v) for v in data["sigmas"]],
                corrections=list(corrections) if corrections is not None else [])


def estimate(sigmas: list[float], values: list[torch.Tensor], x: float, order: int) -> tuple[torch.Tensor, float]:
    """(the polynomial of degree `order` through the last values, at x; the norm of its estimated error): the
    polynomial through one more stored value minus it, or with too few stored, the one through one fewer (through
    none: no correction at all, so a single stored correction held counts its whole norm as the error)."""
    from avatarcli.sampling.predict import extrapolate

    used = min(order + 1, len(sigmas))
    value = extrapolate(sigmas[-used:], values[-used:], x)
    other = used + 1 if len(sigmas) > used else used - 1
    if other == 0:
        return value, float(value.norm())
    reference = extrapolate(sigmas[-other:], values[-other:], x)
    return value, float((value - reference).norm())


def merge_extras(predictor: dict[int, dict], reuse: dict[int, dict]) -> dict[int, dict]:
    """One resumable extras mapping per window: the predictor's keys as they are, this piece's prefixed."""
    merged = {index: dict(data) for index, data in predictor.items()}
    for index, data in reuse.items():
        merged.setdefault(index, {}).update({EXTRAS_PREFIX + key: value for key, value in data.items()})
    return merged


def split_extras(extras: dict[int, dict]) -> tuple[dict[int, dict], dict[int, dict]]:
    """`merge_extras` undone: (the predictor's windows, this piece's windows), each without empty entries."""
    predictor, reuse = {}, {}
    for index, data in extras.items():
        own = {key[len(EXTRAS_PREFIX):]: value for key, value in data.items() if key.startswith(EXTRAS_PREFIX)}
        rest = {key: value for key, value in data.items() if not key.startswith(EXTRAS_PREFIX)}
        if own:
            reuse[index] = own
        if rest:
            predictor[index] = rest
    return predictor, reuse
