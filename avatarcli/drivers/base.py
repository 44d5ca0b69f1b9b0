"""What a driver is: the one part of `animate` that knows its conditioning signal.

A driver turns its inputs (speech audio, a driving face video, ...) into
  * `Inputs`: the validated, model-free facts of the job (portrait, output size, frame count, frame rate, the audio
    track to mux), found before any weights are loaded, so bad input fails at once;
  * `Generation`: the window plan, the sigma schedule, the latent shape, the window denoiser
    (`(window, step, latents) -> guided velocity`) and the VAE that decodes the result.
Everything else (device and dtype, the wavefront sampler, streaming decode, the sink, progress, timings, the
summary) is shared by `avatarcli.pipeline` and knows no driver. The window denoiser is a
`avatarcli.sampling.denoiser.WindowDenoiser`: a driver supplies a window's conditioning and the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from avatarcli.job import AnimateJob
    from avatarcli.runtime import StageClock
    from avatarcli.sampling.windows import WindowPlan


@dataclass
class Inputs:
    portrait: Any  # PIL image, EXIF-oriented, RGB
    width: int
    height: int
    frames: int  # video frames of the output
    fps: float
    audio_track: Path | None  # muxed into the output (None: a silent video)
    signal: Any = None  # the driver's own decoded conditioning input (audio samples, video facts, ...)
    checkpoint: str | None = None  # a driver's model variant, when it has several
    warnings: list[str] = field(default_factory=list)  # things worth telling the user that do not stop the job


@dataclass
class Generation:
    plan: WindowPlan
    sigmas: torch.Tensor
    denoiser: Callable  # (window, step, latents [1, C, F, h, w]) -> guided velocity, same shape
    latent_shape: tuple[int, int, int]  # (channels, height, width) of one latent frame
    vae: Any  # decodes latents through avatarcli.decode.stream.StreamingDecoder
    decoder: Any = None  # a streaming frame decoder (decode/decoders.py); default: StreamingDecoder(vae)
    update: Callable | None = None  # the sampler's step update (sampling/sampler.py StepUpdate); default Euler
    skip_frames: int = 0  # leading decoded frames that are not part of the output (FlashPortrait's reference slot)
    probe_blocks: tuple | None = None  # (first, last) transformer blocks: the step predictor's per-layer signal
    transformer: Any = None  # the DiT itself (context parallelism splits its forwards)
    encode_mode: str = "whole"  # how the reference was encoded (budget.EncodePlan), for the run's summary


class Driver(Protocol):
    name: str  # "audio", "driving", ...

    def prepare(self, job: AnimateJob) -> Inputs:
        """Validate and decode the inputs; no model is loaded here. Raises AvatarError on bad input."""

    def load(self, job: AnimateJob, inputs: Inputs, device: torch.device, dtype: torch.dtype) -> Any:
        """Load the driver's models (called once; a batch reuses the result across jobs that share it)."""

    def window_plan(self, job: AnimateJob, frames: int) -> WindowPlan:
        """The sliding windows of an output of `frames` frames; pure (`build` uses it, and --compile auto counts the
        window-steps with it before any model loads)."""

    def compile_break_even(self, job: AnimateJob) -> int | None:
        """The window-steps after which compiling the job's DiT has paid for itself, for --compile auto
        (avatarcli/compilation.py); None where no job repays it."""

    def models_key(self, job: AnimateJob, inputs: Inputs) -> tuple:
        """What the loaded models depend on: jobs with the same key can share them."""

    # Optional (avatarcli batch looks it up with hasattr):
    # reuse(models, previous_key, job, inputs, device, dtype) -> models | None
    #     models for `job` adapted from this driver's models loaded under `previous_key` (e.g. only a changed
    #     checkpoint reloaded); None when nothing can be kept, and the batch loads afresh.

    def build(self, job: AnimateJob, inputs: Inputs, models: Any, device: torch.device, dtype: torch.dtype,
              clock: StageClock) -> Generation:
        """Per-job conditioning (features) and the window denoiser."""
