"""The learning-rate curve and the step / wall-clock budgets the training stages run under."""

from __future__ import annotations

import math
import time


def cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over `warmup` steps, then a cosine from 1 down to 0.1 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))) * 0.9 + 0.1


class Deadline:
    """A stage ends after `steps` steps or `seconds` seconds, whichever comes first; progress is the larger fraction."""

    def __init__(self, seconds: float, steps: int):
        self.start, self.seconds, self.steps = time.perf_counter(), max(seconds, 1e-3), steps

    def progress(self, step: int) -> float:
        return max(step / self.steps, (time.perf_counter() - self.start) / self.seconds)

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0


class Budget:
    """The whole run's wall clock: `minutes` (None: no limit) from `start` (a time.perf_counter() value, by default
    the moment it is made).

    `share(planned, *later, reserve=...)` is the seconds a stage planned at `planned` seconds gets when `later` stages
    (their planned seconds) still follow it and `reserve` seconds must be left for the untimed work after it: what
    is left split in proportion to the plans. Without a limit every stage gets its plan."""

    def __init__(self, minutes: float | None, start: float | None = None):
        self.start, self.minutes = time.perf_counter() if start is None else start, minutes

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def share(self, planned: float, *later: float, reserve: float = 0.0) -> float:
        if self.minutes is None:
            return planned
        left = self.minutes * 60 - self.elapsed() - reserve
        return max(1.0, left * planned / (planned + sum(later)))
