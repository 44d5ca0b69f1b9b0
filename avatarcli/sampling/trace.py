"""The DiT forwards of a run: recorded (`animate --trace FILE`) and replayed (benchmarks/bench_animate.py --replay).

A trace lists, in the order the sampler ran them, the window-steps of a run: one record per DiT forward (its window,
its step and the guidance branches it ran: all of them, or the conditional one alone under guidance reuse), and one
per window-step whose velocity was predicted (step prediction: no forward). Its header holds what a replay needs to
plan the same windows and steps: frames, fps, size, the preset's settings, the window plan's shape. On disk it is
JSON Lines: the header, then one record per line.

Recording plugs in through a `ForwardRecorder` at two places: the window denoiser tells it of every forward
(`forward`), and the top of the denoiser stack of every window-step once it is done (`window_step`), so a window-step
that ran no forward was predicted.

Replaying follows the trace instead of deciding: `ReplayedSteps` takes the step predictor's place (a window-step the
trace computed calls the model, one it predicted extrapolates from the window's last computed velocities, as the
predictor does), and `ReplayedGuidance` that of guidance reuse (each forward runs the branches the trace names; a
forward of the conditional branch alone adds the window's last guidance correction). So a replay runs the recorded
run's work, forward for forward, on other weights (e.g. full-size random ones, to time it): its frames mean nothing.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from avatarcli.sampling.windows import Window

TRACE_FORMAT = "avatarcli forward trace"
TRACE_VERSION = 1


class ForwardRecorder(Protocol):
    def forward(self, window: int, step: int, branches: list[int]) -> None:
        """One DiT forward of window `window` at step `step`, running the guidance branches `branches` (indices)."""

    def window_step(self, window: int, step: int) -> None:
        """Window-step (window, step) is done: its forwards, if any, were told before."""


@dataclass(frozen=True)
class TracedStep:
    window: int
    step: int
    branches: tuple[int, ...] = ()  # the guidance branches its forward ran; () for a predicted window-step

    @property
    def computed(self) -> bool:
        return bool(self.branches)

    def as_dict(self) -> dict[str, Any]:
        return {"window": self.window, "step": self.step, "computed": self.computed, "branches": list(self.branches)}


@dataclass
class ForwardTrace:
    header: dict[str, Any]
    steps: list[TracedStep] = field(default_factory=list)

    @property
    def forwards(self) -> int:
        """DiT forwards (the run's `nfe`)."""
        return sum(step.computed for step in self.steps)

    @property
    def branch_forwards(self) -> int:
        """Over all forwards, the branches each ran (the run's `branch_forwards`)."""
        return sum(len(step.branches) for step in self.steps)


class TraceRecorder:
    """A `ForwardRecorder` keeping a `ForwardTrace`; `start(header)` gives it the run's facts."""

    def __init__(self) -> None:
        self.trace = ForwardTrace({})
        self.forwarded = False  # the current window-step ran a forward

    def start(self, header: dict[str, Any]) -> None:
        self.trace = ForwardTrace(dict(header))

    def forward(self, window: int, step: int, branches: list[int]) -> None:
        self.trace.steps.append(TracedStep(window, step, tuple(int(b) for b in branches)))
        self.forwarded = True

    def window_step(self, window: int, step: int) -> None:
        if not self.forwarded:
            self.trace.steps.append(TracedStep(window, step))
        self.forwarded = False


class RecordedSteps:
    """The top of a recorded denoiser stack: calls `denoise` and tells the recorder the window-step is done."""

    def __init__(self, denoise, recorder: ForwardRecorder) -> None:
        self.denoise, self.recorder = denoise, recorder

    def __call__(self, window: Window, step: int, latents: torch.Tensor) -> torch.Tensor:
        velocity = self.denoise(window, step, latents)
        self.recorder.window_step(window.index, step)
        return velocity


def write_trace(trace: ForwardTrace, path: Path) -> None:
    """The trace as JSON Lines: the header (with the forward counts), then one record per line."""
    header = {"format": TRACE_FORMAT, "version": TRACE_VERSION, **trace.header, "forwards": trace.forwards,
              "branch_forwards": trace.branch_forwards}
    lines = [json.dumps(header)] + [json.dumps(step.as_dict()) for step in trace.steps]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_trace(path: Path) -> ForwardTrace:
    """A trace written by `write_trace`; ValueError when the file is not one."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        header = json.loads(lines[0]) if lines else {}
        records = [json.loads(line) for line in lines[1:]]
        steps = [TracedStep(int(r["window"]), int(r["step"]), tuple(int(b) for b in r["branches"])) for r in records]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a forward trace ({error})") from None
    if not isinstance(header, dict) or header.get("format") != TRACE_FORMAT:
        raise ValueError(f"{path}: not a forward trace (no '{TRACE_FORMAT}' header)")
    if header.get("version") != TRACE_VERSION:
        raise ValueError(f"{path}: trace version {header.get('version')}, this avatarcli reads {TRACE_VERSION}")
    return ForwardTrace(header, steps)


# ---- replay --------------------------------------------------------------------------------------------------------


def check_plan(trace: ForwardTrace, windows: int, steps: int) -> None:
    """ValueError unless the job plans the windows and steps the trace was recorded with."""
    traced = (trace.header.get("windows"), trace.header.get("steps"))
    if traced != (windows, steps):
        raise ValueError(f"the trace's plan is {traced[0]} window(s) x {traced[1]} steps, this job's {windows} x "
                         f"{steps}")


class _Queue:
    """The trace's records in order, consumed as the replay reaches them; a replay that departs from it fails."""

    def __init__(self, steps: list[TracedStep]) -> None:
        self.steps = deque(steps)

    def next(self, window: int, step: int) -> TracedStep:
        """The next record, which must be of window-step (window, step)."""
        if not self.steps or (self.steps[0].window, self.steps[0].step) != (window, step):
            upcoming = f"window {self.steps[0].window} step {self.steps[0].step}" if self.steps else "its end"
            raise ValueError(f"the replay reached window {window} step {step} where the trace has {upcoming}")
        return self.steps.popleft()

    def take(self, window: int, step: int) -> list[TracedStep]:
        """Every record of window-step (window, step) (one per forward, or one predicted), which must come next."""
        taken = [self.next(window, step)]
        while self.steps and (self.steps[0].window, self.steps[0].step) == (window, step):
            taken.append(self.steps.popleft())
        return taken


class ReplayedSteps:
    """In the step predictor's place: the window-steps the trace computed call `denoise` (once per recorded forward);
    the ones it predicted extrapolate the window's last `order + 1` computed velocities in sigma (as predict.py). The
    predictor's planning after a computed step (a few sums of latent-sized tensors) is left out: beside a forward it
    is noise."""

    def __init__(self, trace: ForwardTrace, denoise, sigmas: torch.Tensor, order: int = 1) -> None:
        self.queue, self.denoise, self.order = _Queue(trace.steps), denoise, order
        self.sigmas = [float(s) for s in sigmas]
        self.windows: dict[int, tuple[list[float], list[torch.Tensor]]] = {}

    def __call__(self, window: Window, step: int, latents: torch.Tensor) -> torch.Tensor:
        from avatarcli.sampling.predict import extrapolate

        records = self.queue.take(window.index, step)
        nodes, velocities = self.windows.setdefault(window.index, ([], []))
        if any(record.computed for record in records):
            for _ in range(sum(record.computed for record in records)):
                velocity = self.denoise(window, step, latents)
            nodes.append(self.sigmas[step])
            velocities.append(velocity)
            del nodes[: -(self.order + 1)], velocities[: -(self.order + 1)]
        elif velocities:
            velocity = extrapolate(nodes, velocities, self.sigmas[step])
        else:
            raise ValueError(f"the trace predicts window {window.index} step {step} before any computed step")
        if step == len(self.sigmas) - 2:
            del self.windows[window.index]
        return velocity


class ReplayedGuidance:
    """In guidance reuse's place: each forward runs the branches the trace names, in one batch. All of them: the
    guided velocity, whose correction (guided minus conditional) the window keeps; fewer: their first prediction plus
    the window's last correction, held."""

    def __init__(self, trace: ForwardTrace, denoiser: Any) -> None:
        self.queue = _Queue([step for step in trace.steps if step.computed])
        self.denoiser, self.guidance = denoiser, denoiser.guidance
        self.all = list(range(len(self.guidance.branches)))
        # per live window (at most steps + 2 in the wavefront; a window whose last step is predicted is evicted)
        self.corrections: dict[int, torch.Tensor] = {}
        self.limit = denoiser.steps + 2

    def __call__(self, window: Window, step: int, latents: torch.Tensor) -> torch.Tensor:
        rows = list(self.queue.next(window.index, step).branches)
        if rows == self.all:
            pred = self.denoiser.branch_predictions(window, step, latents)
            velocity = self.guidance.combine(pred)
            c = self.guidance.conditional
            self.corrections[window.index] = velocity - pred[c : c + 1]
            while len(self.corrections) > self.limit:
                del self.corrections[next(iter(self.corrections))]
        else:
            velocity = self.denoiser.branch_predictions(window, step, latents, rows)[:1]
            if window.index in self.corrections:
                velocity = velocity + self.corrections[window.index]
        if step == self.denoiser.steps - 1:
            self.corrections.pop(window.index, None)
        return velocity.to(latents.device)
