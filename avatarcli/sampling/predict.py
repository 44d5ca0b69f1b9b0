"""Adaptive step prediction: training-free step skipping inside each sliding window.

A window takes every step of the schedule, but only some of them call the transformer ("full steps"); at the
others the guided velocity is extrapolated from the velocities of the window's recent full steps, and the usual
Euler step and overlap blend follow. So every window-step still has an output, the blend and the wavefront
dependencies are untouched, and the result approximates the full-step (reference) Euler path itself rather than a
coarser solver's.

Design (FlashPortrait's adaptive latent prediction names the signals; its code is not public, so this is ours):

* Prediction. A skipped step's velocity is the polynomial through the window's last `order + 1` full-step
  velocities v(sigma_i), evaluated at its sigma: the Taylor expansion around the last full step with the
  derivatives d^k v / d sigma^k taken as divided differences (Newton form; order 2-3 uses 3-4 points). A latent
  trajectory that is a polynomial of degree <= order in sigma is therefore predicted exactly. Velocities, not
  latents, are extrapolated: in flow matching the velocity (noise minus data) varies slowly along the path, and the
  predicted velocity goes through the same Euler step and blend as a computed one.
* How far to jump (the latent variation signal). One more full-step velocity is kept, so the polynomial through
  `order + 2` points minus the prediction estimates the prediction's error (the next Newton term; with fewer full
  steps so far, the difference to the order - 1 polynomial, an overestimate). After each full step the window
  plans its run of predicted steps: it adds up |sigma_next - sigma| * ||estimated velocity error||, the latent
  change the error would cause, relative to the window's latent norm, and stops before the sum passes `tolerance`.
  Where the velocity bends, this grows quickly and jumps get short; on straight stretches they run to the cap.
* Whether to trust prediction (the per-layer signal). A `probe` given to `bind` (a LayerProbe such as BlockProbe)
  returns a cheap summary of its first and last transformer blocks' outputs from the latest call. Between two full
  steps the relative change of the last block's output over that of the first block measures how much the network
  amplifies the change of its input. While that ratio is steady the network is in a smooth regime; when it grows
  by more than `layer_ratio` times from one full step to the next, the planned jump's tolerance shrinks by the
  excess (growth twice the limit: half the tolerance). Comparing the ratio with its own previous value needs no
  per-model calibration. A denoiser without the probe uses the latent signal alone.
* Re-anchoring. At most `max_predicted` (K) steps are predicted in a row; the first `warmup` steps are full.

Each window's state (order + 2 velocities of the window) is created at its first step and dropped after its last,
so memory follows the live windows of the wavefront. The state depends only on the window's own (step, latents)
calls, which are the same in the joint and the streaming order: both give identical frames. Nothing is random.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from avatarcli.schema import check_instance, integer, number

if TYPE_CHECKING:  # presets import the settings below; torch is only needed once sampling runs
    import torch

    from avatarcli.sampling.windows import Window

Denoiser = Callable[["Window", int, "torch.Tensor"], "torch.Tensor"]
# () -> (first block summary, last block summary) of the denoiser's latest call
LayerProbe = Callable[[], "tuple[torch.Tensor, torch.Tensor] | None"]

MAX_ORDER = 3


@dataclass(frozen=True)
class Prediction:
    """Step-prediction settings (a preset's `prediction` section). The limits below are the only ones: presets,
    command-line flags and direct construction are all checked against them (ValueError)."""

    # polynomial degree of the velocity extrapolation in sigma
    order: int = integer(1, MAX_ORDER, default=2)
    # K: a full step re-anchors after at most this many predicted steps
    max_predicted: int = integer(1, 20, default=3)
    # budget for the estimated relative latent error of one predicted run (large: only K limits the run)
    tolerance: float = number(0, 1000, above=True, default=0.01)
    # the first steps of every window are full (two full steps give the first derivative)
    warmup: int = integer(2, 20, default=2)
    # trust limit on the growth of the last/first block change ratio; 0: signal off
    layer_ratio: float = number(0, 1000, default=0.0)

    def __post_init__(self):
        check_instance(self)

    def bind(self, denoise: Denoiser, sigmas: torch.Tensor, probe: LayerProbe | None = None) -> PredictingDenoiser:
        """The denoiser as the sampler sees it: same signature, the transformer runs only on full steps.
        `probe`: the per-layer signal of `denoise`'s latest call (e.g. a BlockProbe), if any."""
        return PredictingDenoiser(self, denoise, sigmas, probe)


def lagrange_weights(nodes: list[float], x: float) -> list[float]:
    """Weights w_i with p(x) = sum_i w_i p(nodes_i) for every polynomial p of degree < len(nodes)."""
    weights = []
    for i, ni in enumerate(nodes):
        w = 1.0
        for j, nj in enumerate(nodes):
            if j != i:
                w *= (x - nj) / (ni - nj)
        weights.append(w)
    return weights


def extrapolate(nodes: list[float], values: list[torch.Tensor], x: float) -> torch.Tensor:
    """The polynomial through (nodes_i, values_i), evaluated at x (float64 weights, the values' dtype)."""
    out = None
    for w, v in zip(lagrange_weights(nodes, x), values):
        out = v * w if out is None else out.add(v, alpha=w)
    return out


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new.float() - old.float()).norm() / old.float().norm().clamp_min(1e-12))


@dataclass
class _WindowState:
    sigmas: list[float] = field(default_factory=list)  # sigmas of the stored full steps, oldest first
    velocities: list[torch.Tensor] = field(default_factory=list)
    planned: int = 0  # predicted steps still allowed before the next full step
    features: tuple[torch.Tensor, torch.Tensor] | None = None  # layer-probe summary at the last full step
    layer_ratio: float | None = None  # last block's relative change over the first block's, between full steps
    previous_ratio: float | None = None  # the same one full step earlier


class PredictingDenoiser:
    """Wraps a Denoiser; per window it computes full steps and predicts the others (see the module notes)."""

    def __init__(self, settings: Prediction, denoise: Denoiser, sigmas: torch.Tensor, probe: LayerProbe | None = None):
        self.settings, self.denoise = settings, denoise
        self.sigmas = [float(s) for s in sigmas]
        self.steps = len(self.sigmas) - 1
        self.probe = probe
        self.windows: dict[int, _WindowState] = {}
        self.full_steps = 0  # window-steps that called the denoiser
        self.predicted_steps = 0
        self.trace: list[tuple[int, int, bool]] | None = None  # (window, step, predicted) when a test asks

    def __call__(self, window: Window, step: int, latents: torch.Tensor) -> torch.Tensor:
        state = self.windows.setdefault(window.index, _WindowState())
        predicted = state.planned > 0 and step >= self.settings.warmup
        if predicted:
            state.planned -= 1
            self.predicted_steps += 1
            n = self.settings.order + 1
            velocity = extrapolate(state.sigmas[-n:], state.velocities[-n:], self.sigmas[step])
        else:
            velocity = self.denoise(window, step, latents)
            self.full_steps += 1
            self._record(state, step, latents, velocity)
        if self.trace is not None:
            self.trace.append((window.index, step, predicted))
        if step == self.steps - 1:
            del self.windows[window.index]
        return velocity

    def extras(self) -> dict[int, dict]:
        """The live windows' predictor state as plain data (tensors, numbers, None) for a resumable save."""
        import torch

        def plain(state: _WindowState) -> dict:
            return {"sigmas": torch.tensor(state.sigmas, dtype=torch.float64),
                    "velocities": torch.stack(state.velocities) if state.velocities else None,
                    "planned": state.planned, "layer_ratio": state.layer_ratio,
                    "previous_ratio": state.previous_ratio,
                    "feature_first": state.features[0] if state.features is not None else None,
                    "feature_last": state.features[1] if state.features is not None else None}

        return {index: plain(state) for index, state in self.windows.items()}

    def load_extras(self, extras: dict[int, dict]) -> None:
        """Restore what `extras()` saved, so a resumed run predicts exactly as the uninterrupted one."""
        self.windows = {}
        for index, data in extras.items():
            velocities = data["velocities"]
            features = None
            if data["feature_first"] is not None:
                features = (data["feature_first"], data["feature_last"])
            self.windows[int(index)] = _WindowState(
                sigmas=[float(v) for v in data["sigmas"]], velocities=list(velocities) if velocities is not None else [],
                planned=int(data["planned"]), features=features, layer_ratio=data["layer_ratio"],
                previous_ratio=data["previous_ratio"])

    def _record(self, state: _WindowState, step: int, latents: torch.Tensor, velocity: torch.Tensor) -> None:
        s = self.settings
        state.sigmas = (state.sigmas + [self.sigmas[step]])[-(s.order + 2):]
        state.velocities = (state.velocities + [velocity])[-(s.order + 2):]
        if self.probe is not None and s.layer_ratio > 0:
            features = self.probe()
            if features is not None and state.features is not None:
                first = relative_change(features[0], state.features[0])
                last = relative_change(features[1], state.features[1])
                state.previous_ratio, state.layer_ratio = state.layer_ratio, last / max(first, 1e-12)
            state.features = features
        state.planned = self._plan(state, step, float(latents.float().norm()))

    def _plan(self, state: _WindowState, step: int, latent_norm: float) -> int:
        """How many of the following steps to predict (the jump), from the estimated latent error."""
        s = self.settings
        if step + 1 < s.warmup or len(state.sigmas) < 2:
            return 0
        budget = s.tolerance * latent_norm
        if state.previous_ratio is not None and s.layer_ratio > 0:
            growth = state.layer_ratio / max(state.previous_ratio, 1e-12)
            if growth > s.layer_ratio:
                budget *= s.layer_ratio / growth
        # The order-p prediction uses the latest p + 1 velocities; its error is estimated by the next Newton term
        # (the polynomial through one more stored velocity minus it), or, before that many full steps exist, by
        # the difference to the order p - 1 polynomial (an overestimate).
        used = min(len(state.sigmas), s.order + 1)
        pred_nodes, pred_values = state.sigmas[-used:], state.velocities[-used:]
        if len(state.sigmas) > used:
            ref_nodes, ref_values = state.sigmas[-used - 1:], state.velocities[-used - 1:]
        else:
            ref_nodes, ref_values = state.sigmas[1 - used:], state.velocities[1 - used:]
        error, jump = 0.0, 0
        for target in range(step + 1, min(step + 1 + s.max_predicted, self.steps)):
            sigma = self.sigmas[target]
            high = extrapolate(pred_nodes, pred_values, sigma)
            low = extrapolate(ref_nodes, ref_values, sigma)
            error += abs(self.sigmas[target + 1] - sigma) * float((high - low).float().norm())
            if not math.isfinite(error) or error > budget:
                break
            jump += 1
        return jump


class CountedDenoiser:
    """Counts denoiser calls: the NFE, one per transformer forward (a batched call of all guidance branches
    counts once)."""

    def __init__(self, denoise: Denoiser):
        self.denoise, self.calls = denoise, 0

    def __call__(self, window: Window, step: int, latents: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.denoise(window, step, latents)


class BlockProbe:
    """Forward hooks on a transformer's first and last blocks keeping a strided sample of their outputs
    (every `stride`-th token, float32), so the per-layer signal costs a few MB, not two activations per window."""

    def __init__(self, first: torch.nn.Module, last: torch.nn.Module, tokens: int = 4096, row: int | None = None):
        """`row`: keep only this batch row of a forward of several branches (with guidance reuse, whose forwards
        of the conditional branch alone have one row), so every summary compares the same branch."""
        self.tokens, self.row = tokens, row
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [first.register_forward_hook(self._keep("first")),
                        last.register_forward_hook(self._keep("last"))]

    def _keep(self, name: str):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if self.row is not None and hidden.shape[0] > 1:
                hidden = hidden[self.row : self.row + 1]
            stride = max(1, hidden.shape[1] // self.tokens)
            self.outputs[name] = hidden[:, ::stride].detach().float().clone()

        return hook

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if "first" not in self.outputs or "last" not in self.outputs:
            return None
        return self.outputs["first"], self.outputs["last"]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.outputs.clear()
