"""Sliding-window flow sampling over a whole video: the joint loop (oracle), the streaming wavefront and its
window-parallel form over several processes.

Both run the same per-window step (`window_step`): guided velocity from the denoiser, one Euler step, then the
blend of the overlap with the previous window's output of the same step (none at step 0), rounded to
`state_dtype` when given (the reference stores its latents in bfloat16).

The reference loop is timestep-outer / window-inner, so no frame is final before the last step of the whole video.
The wavefront computes the same thing in another order: window k at step s needs only
  * its own frames' state from step s-1 (written by k or by later windows covering the same frames), and
  * window k-1's output of step s (for the blend),
so windows can run staggered and each window's frames are final long before the video ends; the live state is
bounded by the number of steps, not the video length. The same dependencies let the windows of one wavefront
tick run on different ranks (`sample_window_parallel`, schedule in avatarcli/parallel/schedule.py).

Optional step prediction plugs in as a `StepPredictor` (avatarcli/sampling/predict.py): it binds the denoiser
into one with the same signature that calls the transformer only on the steps it cannot predict. It keeps its state
per window, so both orders give the same frames with it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from avatarcli.sampling.schedule import euler_step
from avatarcli.sampling.windows import Window, WindowPlan

# (window, step index, window latents [1, C, F, h, w]) -> guided velocity, same shape
Denoiser = Callable[[Window, int, torch.Tensor], torch.Tensor]
# (sample, velocity, sigma, sigma_next) -> the sample at sigma_next; Euler unless a sampler is given another
# (e.g. sampling/step_distill.py's x0-then-renoise update)
StepUpdate = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]


class StepPredictor(Protocol):
    def bind(self, denoise: Denoiser, sigmas: torch.Tensor) -> Denoiser:
        """A denoiser giving the velocity of every window-step, calling `denoise` only where it must."""


def window_step(plan: WindowPlan, window: Window, step: int, latents: torch.Tensor, sigmas: torch.Tensor,
                denoise: Denoiser, previous: torch.Tensor | None, state_dtype: torch.dtype | None,
                update: StepUpdate = euler_step) -> torch.Tensor:
    """One denoising step of one window. `previous` = window k-1's output of this step on the overlap frames."""
    velocity = denoise(window, step, latents)
    new = update(latents, velocity, float(sigmas[step]), float(sigmas[step + 1]))
    if step > 0 and window.overlap:
        w = plan.weights(window).to(new).view(1, 1, -1, 1, 1)
        head = new[:, :, : window.overlap] * w + previous * (1 - w)
        new = torch.cat([head, new[:, :, window.overlap :]], dim=2)
    return new.to(state_dtype).to(new.dtype) if state_dtype is not None else new


def sample_joint(plan: WindowPlan, sigmas: torch.Tensor, noise: torch.Tensor, denoise: Denoiser,
                 state_dtype: torch.dtype | None = None, update: StepUpdate = euler_step,
                 predictor: StepPredictor | None = None) -> torch.Tensor:
    """The reference order: every step runs every window left to right over the whole latent video."""
    if predictor is not None:
        denoise = predictor.bind(denoise, sigmas)
    state = noise
    for step in range(len(sigmas) - 1):
        written = torch.zeros_like(state)
        for window in plan.windows:
            previous = written[:, :, window.start : window.start + window.overlap]
            new = window_step(plan, window, step, state[:, :, window.start : window.end], sigmas, denoise,
                              previous, state_dtype, update)
            written[:, :, window.start : window.end] = new
        state = written
    return state


@dataclass(frozen=True)
class FinalFrames:
    start: int  # first latent frame of this chunk
    latents: torch.Tensor  # [1, C, n, h, w], final


@dataclass
class StreamState:
    """Everything `sample_streaming` needs to continue where it stopped: plain data, saved by `state_dict()`.

    `done`: steps completed per window; `outputs`: the live window outputs, (window, step) -> latents;
    `emitted`: latent frames already yielded as final; `extras`: per-window data of sampler add-ons
    (window index -> a dict of tensors, numbers and strings), saved and restored with the rest.
    """

    done: list[int]
    outputs: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    emitted: int = 0
    extras: dict[int, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def fresh(cls, plan: WindowPlan) -> StreamState:
        return cls(done=[0] * len(plan.windows))

    @property
    def window_steps(self) -> int:
        return sum(self.done)

    def state_dict(self) -> dict[str, Any]:
        """Tensors (moved to the CPU), ints, strings and lists only: loadable with torch.load(weights_only=True)."""
        def cpu(value):
            return value.detach().to("cpu") if isinstance(value, torch.Tensor) else value

        return {"done": list(self.done), "emitted": self.emitted,
                "outputs": [[k, s, cpu(t)] for (k, s), t in self.outputs.items()],
                "extras": {int(k): {n: cpu(v) for n, v in d.items()} for k, d in self.extras.items()}}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> StreamState:
        def move(value):
            return value.to(device) if isinstance(value, torch.Tensor) else value

        return cls(done=list(state["done"]), emitted=int(state["emitted"]),
                   outputs={(int(k), int(s)): move(t) for k, s, t in state["outputs"]},
                   extras={int(k): {n: move(v) for n, v in d.items()} for k, d in state["extras"].items()})


def sample_streaming(plan: WindowPlan, sigmas: torch.Tensor, noise: Callable[[int, int], torch.Tensor],
                     denoise: Denoiser, state_dtype: torch.dtype | None = None, state: StreamState | None = None,
                     after_step: Callable[[StreamState], None] | None = None,
                     update: StepUpdate = euler_step, predictor: StepPredictor | None = None
                     ) -> Iterator[FinalFrames]:
    """Same result as `sample_joint`, yielding final latent frames in order as soon as they are final.

    `noise(start, end)` gives the initial noise of latent frames [start, end). Window k's next step is ready when
    the writers of its frames have finished the previous step and window k-1 has finished this one; among ready
    windows the wavefront order (step + index, later windows first) keeps about `steps` windows live.

    `state`: continue from a saved `StreamState` (it is updated in place); `after_step(state)` runs after every
    window-step, once the frames it finalised have been yielded and consumed: a consistent point to save the state
    or to stop (by raising).
    """
    if predictor is not None:
        denoise = predictor.bind(denoise, sigmas)
    front = Wavefront(plan, len(sigmas) - 1, state if state is not None else StreamState.fresh(plan))
    while front.live.emitted < plan.latent_frames:
        k = front.next_window()
        window, s = plan.windows[k], front.done[k]
        latents = noise(window.start, window.end) if s == 0 else front.gather(window.start, window.end, s - 1)
        front.outputs[(k, s)] = window_step(plan, window, s, latents, sigmas, denoise, front.previous(k, s),
                                            state_dtype, update)
        front.done[k] += 1
        chunk = front.finished()
        if chunk is not None:
            yield chunk
        front.forget()
        if after_step is not None:
            after_step(front.live)


class Wavefront:
    """The bookkeeping of `sample_streaming` over a `StreamState`: which window steps next, which stored outputs
    are still needed, and which frames are final."""

    def __init__(self, plan: WindowPlan, steps: int, live: StreamState) -> None:
        self.plan, self.steps, self.windows, self.live = plan, steps, plan.windows, live
        self.done, self.outputs = live.done, live.outputs  # steps completed per window; (window, step) -> latents
        self.owner = [plan.owner(f) for f in range(plan.latent_frames)]
        self.writers = [plan.writers(w) for w in self.windows]
        self.readers = [[r for r in range(len(self.windows)) if k in self.writers[r]]
                        for k in range(len(self.windows))]
        self.first_open = 0  # windows before it have taken every step

    def ready(self, k: int) -> bool:
        s = self.done[k]
        if s == self.steps:
            return False
        if s == 0:
            return True
        return all(self.done[w] >= s for w in self.writers[k]) and (not self.windows[k].overlap
                                                                    or self.done[k - 1] > s)

    def next_window(self) -> int:
        """The ready window with the smallest wavefront key (step + index, later windows first)."""
        while self.done[self.first_open] == self.steps:
            self.first_open += 1
        # Only the next `steps + 2` windows can hold the smallest key (the fallback: overlaps above half a window).
        span = range(self.first_open, min(len(self.windows), self.first_open + self.steps + 2))
        ready = [i for i in span if self.ready(i)] or [i for i in range(self.first_open, len(self.windows))
                                                        if self.ready(i)]
        return min(ready, key=lambda i: (self.done[i] + i, -i))

    def gather(self, start: int, end: int, step: int) -> torch.Tensor:
        """Frames [start, end) as written at `step` by their owners (the last window covering each frame)."""
        parts, f = [], start
        while f < end:
            o, run = self.owner[f], f
            while run < end and self.owner[run] == o:
                run += 1
            parts.append(self.outputs[(o, step)][:, :, f - self.windows[o].start : run - self.windows[o].start])
            f = run
        return torch.cat(parts, dim=2)

    def previous(self, k: int, s: int) -> torch.Tensor | None:
        """Window k-1's output of step s on window k's overlap (what step s of window k blends with)."""
        window = self.windows[k]
        if s == 0 or not window.overlap:
            return None
        offset = window.start - self.windows[k - 1].start
        return self.outputs[(k - 1, s)][:, :, offset : offset + window.overlap]

    def finished(self) -> FinalFrames | None:
        """The frames that became final with the last window-step, if any."""
        emitted = end = self.live.emitted
        while end < self.plan.latent_frames and self.done[self.owner[end]] == self.steps:
            end += 1
        if end == emitted:
            return None
        self.live.emitted = end
        return FinalFrames(emitted, self.gather(emitted, end, self.steps - 1))

    def needed(self, k: int, s: int) -> bool:
        if s + 1 < self.steps and any(self.done[r] <= s + 1 for r in self.readers[k]):
            return True  # a window still has to read it as its state for step s+1
        if k + 1 < len(self.windows) and self.windows[k + 1].overlap and self.done[k + 1] <= s:
            return True  # window k+1 still has to blend with it at step s
        return s == self.steps - 1 and any(self.owner[f] == k for f in range(max(self.live.emitted,
                                                                                 self.windows[k].start),
                                                                             self.windows[k].end))

    def forget(self) -> None:
        for key in [key for key in self.outputs if not self.needed(*key)]:
            del self.outputs[key]


def sample_window_parallel(plan: WindowPlan, sigmas: torch.Tensor, noise: Callable[[int, int], torch.Tensor],
                           denoise: Denoiser, group, state_dtype: torch.dtype | None = None,
                           after_tick: Callable[[StreamState], None] | None = None,
                           update: StepUpdate = euler_step, predictor: StepPredictor | None = None
                           ) -> Iterator[FinalFrames]:
    """`sample_streaming` spread over the ranks of `group` (avatarcli/parallel/group.py): the same frames.

    Each tick of the schedule (avatarcli/parallel/schedule.py) every rank takes one step of each of its windows
    in that tick; then the ranks exchange the overlap frames the other ranks read. Rank 0 (`group.rank`, a window
    rank) yields the final frames in order; the other ranks yield nothing. `after_tick(state)` runs on every rank
    after every tick, with `state.done` and `state.emitted` counting all ranks' work (its other fields stay empty).
    """
    from avatarcli.parallel.schedule import HeldLatents, Read, TickSchedule

    if predictor is not None:
        denoise = predictor.bind(denoise, sigmas)
    steps, windows, rank = len(sigmas) - 1, plan.windows, group.rank
    schedule = TickSchedule(plan, steps, group.world_size)
    frame = noise(0, 1)  # the layout, dtype and device of one latent frame, for the exchange buffers
    held = HeldLatents()
    live = StreamState.fresh(plan)

    def frames(start: int, end: int, step: int) -> torch.Tensor:
        return torch.cat([held.read(r) for r in schedule.runs(start, end, step)], dim=2)

    for tick in range(schedule.ticks):
        for k, s in schedule.tasks(tick, rank):
            window = windows[k]
            state = noise(window.start, window.end) if s == 0 else frames(window.start, window.end, s - 1)
            previous = None
            if s > 0 and window.overlap:  # window k-1's output of this step on the overlap
                previous = held.read(Read(k - 1, s, window.start, window.start + window.overlap))
            new = window_step(plan, window, s, state, sigmas, denoise, previous, state_dtype, update)
            held.put(k, s, window.start, new)
        group.exchange(schedule.transfers(tick), held, frame)
        for k, s in schedule.tasks(tick):
            live.done[k] = s + 1

        final_end = live.emitted
        while final_end < plan.latent_frames and live.done[schedule.owner[final_end]] == steps:
            final_end += 1
        if final_end > live.emitted:
            start, live.emitted = live.emitted, final_end
            if rank == 0:
                yield FinalFrames(start, frames(start, final_end, steps - 1))
        held.drop(schedule.expired(tick, rank))
        if after_tick is not None:
            after_tick(live)
