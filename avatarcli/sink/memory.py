"""A sink that keeps the frames in memory: for measuring a generation in-process (benchmarks, tests), no ffmpeg."""

from __future__ import annotations

import numpy as np


class MemorySink:
    """Collects every written batch of uint8 [n, H, W, 3] frames; `frames()` joins them."""

    def __init__(self) -> None:
        self._batches: list[np.ndarray] = []
        self.frames_written = 0
        self.closed = False

    def open(self) -> None:
        self._batches, self.frames_written, self.closed = [], 0, False

    def write(self, frames: np.ndarray) -> None:
        self._batches.append(np.array(frames, dtype=np.uint8, copy=True))
        self.frames_written += len(frames)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self._batches = []

    def frames(self) -> np.ndarray:
        return np.concatenate(self._batches) if self._batches else np.zeros((0, 0, 0, 3), np.uint8)
