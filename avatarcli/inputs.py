"""The checks and decoding of `animate`'s inputs, with no torch: a bad portrait, audio file, size or output path is
rejected in well under a second, before any model library is imported."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatarcli.media.audio import SAMPLE_RATE, load_audio
from avatarcli.media.image import load_portrait
from avatarcli.presets import Preset, resolve_checkpoint, resolve_size
from avatarcli.sink.ffmpeg import check_writable_output


@dataclass
class PreparedInputs:
    portrait: object  # PIL image, EXIF-oriented, RGB
    samples: np.ndarray  # 16 kHz mono float32
    width: int
    height: int
    frames: int
    checkpoint: str


def check_inputs(portrait: Path, audio: Path, output: Path | None, preset: Preset) -> PreparedInputs:
    """Everything that can fail on bad input, before any model is loaded (`output` None: nothing will be written)."""
    if output is not None:
        check_writable_output(output)
    image = load_portrait(portrait)
    samples = load_audio(audio, SAMPLE_RATE)
    width, height = resolve_size(preset.size, *image.size)
    frames = max(1, round(len(samples) * preset.fps / SAMPLE_RATE))
    return PreparedInputs(image, samples, width, height, frames, resolve_checkpoint(preset.checkpoint, width, height))
