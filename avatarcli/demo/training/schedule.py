"""The learning-rate curve and the step / wall-clock budget every training stage runs under."""

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
        self.start, self.seconds, self.steps = time.perf_counter(), seconds, steps

    def progress(self, step: int) -> float:
        return max(step / self.steps, (time.perf_counter() - self.start) / self.seconds)

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0
