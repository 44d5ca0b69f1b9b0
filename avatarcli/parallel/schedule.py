"""Window parallelism as data: which window-steps run together, on which rank, and what crosses between ranks.

Window k's step s reads (sampling/sampler.py)
  * the step s-1 state of its frames, written by their owners: k itself and up to `reach` later windows whose
    overlaps cover its frames (reach is 1 unless overlaps exceed half a window), and
  * window k-1's step s output on its overlap (the blend).
With tick(k, s) = (reach + 1) * s + k both come from earlier ticks, so the window-steps of one tick are independent
and run at the same time on different ranks. (The one-process wavefront orders by s + k, where an input can carry
the same key; spacing the steps `reach + 1` ticks apart removes that.) The windows of one tick are `reach + 1`
apart, so rank(k) = (k // (reach + 1)) % world deals them out round-robin. A window keeps its rank for all its
steps: its own output, its per-window features and its step-prediction history never move. After each tick the
ranks exchange only the overlap frames that windows on other ranks read, and rank 0 receives each window's final
frames that it does not hold, to decode them.

Two windows overlapping each other cannot run at once (each reads the other), so a video of 1 or 2 windows gains
nothing from more ranks; from about 2 x world windows on, every rank is busy in the steady part of the wavefront.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from avatarcli.sampling.windows import WindowPlan


@dataclass(frozen=True)
class Read:
    """Latent frames [start, end) of window `window`'s output at step `step`."""

    window: int
    step: int
    start: int
    end: int


@dataclass(frozen=True)
class Transfer:
    """A `Read` sent from rank `source` (which ran the window) to rank `dest` after the producing tick."""

    read: Read
    source: int
    dest: int


class TickSchedule:
    """The window-parallel schedule of one plan: ticks, rank assignment, reads and transfers (all precomputed)."""

    def __init__(self, plan: WindowPlan, steps: int, world: int):
        self.plan, self.steps, self.world = plan, steps, world
        windows = plan.windows
        self.owner = [plan.owner(f) for f in range(plan.latent_frames)]
        self.reach = max(max(self.owner[f] for f in range(w.start, w.end)) - w.index for w in windows)
        self.stride = self.reach + 1
        self.ticks = self.tick(len(windows) - 1, steps - 1) + 1
        self._tasks: list[list[tuple[int, int]]] = [[] for _ in range(self.ticks)]
        for k in range(len(windows)):
            for s in range(steps):
                self._tasks[self.tick(k, s)].append((k, s))
        # Who reads what: every window-step's inputs on its rank, and the final frames on rank 0 (the decoder).
        consumers: list[tuple[int, int, Read]] = []  # (rank, tick of the read, read)
        for k, window in enumerate(windows):
            for s in range(steps):
                consumers += [(self.rank(k), self.tick(k, s), r) for r in self.reads(k, s)]
        last = steps - 1
        consumers += [(0, self.tick(r.window, last), r) for r in self.runs(0, plan.latent_frames, last)]
        spans: dict[tuple[int, int, int], tuple[int, int]] = {}  # (window, step, rank) -> frames it needs there
        self._last_use: list[dict[tuple[int, int], int]] = [{} for _ in range(world)]
        for k in range(len(windows)):
            for s in range(steps):
                self._last_use[self.rank(k)][(k, s)] = self.tick(k, s)
        for rank, tick, r in consumers:
            key = (r.window, r.step)
            self._last_use[rank][key] = max(self._last_use[rank].get(key, tick), tick)
            if rank != self.rank(r.window):
                lo, hi = spans.get((r.window, r.step, rank), (r.start, r.end))
                spans[(r.window, r.step, rank)] = (min(lo, r.start), max(hi, r.end))
        self._expiring: list[list[list[tuple[int, int]]]] = [[[] for _ in range(self.ticks)] for _ in range(world)]
        for rank, last_use in enumerate(self._last_use):
            for key, tick in last_use.items():
                self._expiring[rank][tick].append(key)
        self._transfers: list[list[Transfer]] = [[] for _ in range(self.ticks)]
        for (k, s, dest), (lo, hi) in sorted(spans.items()):
            self._transfers[self.tick(k, s)].append(Transfer(Read(k, s, lo, hi), self.rank(k), dest))

    def tick(self, window: int, step: int) -> int:
        """The wavefront tick in which window `window` takes step `step`."""
        return self.stride * step + window

    def rank(self, window: int) -> int:
        """The rank that runs every step of window `window`."""
        return (window // self.stride) % self.world

    def tasks(self, tick: int, rank: int | None = None) -> list[tuple[int, int]]:
        """(window, step) pairs of a tick, all of them or those of one rank, latest window first."""
        tasks = sorted(self._tasks[tick], reverse=True)
        return tasks if rank is None else [t for t in tasks if self.rank(t[0]) == rank]

    def runs(self, start: int, end: int, step: int) -> list[Read]:
        """Frames [start, end) at `step` as written by their owners (the last window covering each frame)."""
        reads, f = [], start
        while f < end:
            o, run = self.owner[f], f
            while run < end and self.owner[run] == o:
                run += 1
            reads.append(Read(o, step, f, run))
            f = run
        return reads

    def reads(self, window: int, step: int) -> list[Read]:
        """What window `window`'s step `step` reads: its frames' previous-step state and the blend partner."""
        w = self.plan.windows[window]
        if step == 0:
            return []  # the initial noise, and no blend at the first step
        reads = self.runs(w.start, w.end, step - 1)
        if w.overlap:
            reads.append(Read(window - 1, step, w.start, w.start + w.overlap))
        return reads

    def transfers(self, tick: int) -> list[Transfer]:
        """What crosses between ranks after `tick`, in one order every rank agrees on."""
        return self._transfers[tick]

    def expired(self, tick: int, rank: int) -> list[tuple[int, int]]:
        """Outputs (window, step) held on `rank` that nothing on it reads after `tick`."""
        return self._expiring[rank][tick]


class HeldLatents:
    """The window outputs one rank holds: its own windows' (whole) and the overlap frames it received."""

    def __init__(self) -> None:
        self.parts: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}  # (window, step) -> (first frame, latents)

    def put(self, window: int, step: int, start: int, latents: torch.Tensor) -> None:
        self.parts[(window, step)] = (start, latents)

    def read(self, r: Read) -> torch.Tensor:
        start, latents = self.parts[(r.window, r.step)]
        if r.start < start or r.end - start > latents.shape[2]:
            raise KeyError(f"frames {r.start}-{r.end} of window {r.window} at step {r.step} are not held here")
        return latents[:, :, r.start - start : r.end - start]

    def drop(self, keys) -> None:
        for key in keys:
            self.parts.pop(key, None)
