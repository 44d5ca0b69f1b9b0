"""`animate`: portrait + speech -> talking video of the audio's length, streamed to an mp4 while it is generated.

Data path: media (portrait, audio) -> features (umT5 text, CLIP image, reference latents, per-window wav2vec2) ->
StableAvatar DiT -> sliding-window sampling in wavefront order -> streaming causal VAE decode -> ffmpeg sink.
Inputs are validated before any weights are loaded, so bad input fails in well under a second.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from avatarcli.decode.stream import StreamingDecoder
from avatarcli.errors import AvatarError
from avatarcli.features.audio import wav2vec_features
from avatarcli.features.image import clip_features, reference_condition
from avatarcli.features.text import NEGATIVE_PROMPT, encode_prompts
from avatarcli.inputs import PreparedInputs, check_inputs
from avatarcli.media.audio import SAMPLE_RATE
from avatarcli.presets import Preset
from avatarcli.sampling.denoiser import StableAvatarDenoiser
from avatarcli.sampling.guidance import Guidance
from avatarcli.sampling.sampler import sample_streaming
from avatarcli.sampling.schedule import flow_sigmas
from avatarcli.sampling.windows import Window, latent_frames_for, plan_windows
from avatarcli.sink.ffmpeg import BackgroundSink, Mp4Sink, NullSink

WINDOW_LATENT_FRAMES = 21  # 81 video frames per window, as StableAvatar was trained
DEFAULT_PROMPT = "The protagonist is talking."  # the fixed training prompt family of the reference


@dataclass
class AnimateJob:
    portrait: Path
    audio: Path
    output: Path
    preset: Preset
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = NEGATIVE_PROMPT
    seed: int = 42
    weights: Path | None = None
    allow_download: bool = True
    device: str = "auto"
    dtype: str = "auto"
    crf: int = 18
    vae_dtype: str = "auto"  # VAE decode precision: auto = bf16 on GPU (47-48 dB PSNR against fp32), fp32 on CPU
    compile: bool = False  # fuse q/k/v and torch.compile the DiT blocks (GPU; ~30 s once, ~20% faster per step)
    null_sink: bool = False  # benchmarks: generate and decode, write nothing


@dataclass
class Progress:
    windows_done: int
    windows_total: int
    steps_done: int  # window-steps
    steps_total: int
    frames_written: int
    frames_total: int
    elapsed_seconds: float


@dataclass
class AnimateResult:
    output: Path | None
    frames: int
    fps: int
    width: int
    height: int
    video_seconds: float
    wall_seconds: float
    windows: int
    steps: int
    timings: dict[str, float] = field(default_factory=dict)
    peak_gpu_bytes: int = 0
    peak_rss_bytes: int = 0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise AvatarError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise AvatarError("--device cuda was asked for, but no CUDA GPU is visible; use --device cpu")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    choices = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
               "fp32": torch.float32, "float32": torch.float32}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in choices:
        raise AvatarError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32")
    return choices[dtype]


@contextmanager
def quiet_diffusers():
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def prepare_inputs(job: AnimateJob) -> PreparedInputs:
    """Everything that can fail on bad input, before any model is loaded."""
    return check_inputs(job.portrait, job.audio, None if job.null_sink else job.output, job.preset)


def window_samples(samples: np.ndarray, window: Window, fps: int) -> np.ndarray:
    """The audio of the window's video frames, zero-padded past the end of the file."""
    first, end = window.video_frames
    lo, hi = round(first * SAMPLE_RATE / fps), round(end * SAMPLE_RATE / fps)
    chunk = samples[lo:hi]
    return np.pad(chunk, (0, hi - lo - len(chunk))) if len(chunk) < hi - lo else chunk


def frame_noise(seed: int, start: int, end: int, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Initial noise of latent frames [start, end), one seeded draw per frame, so windows can start anywhere."""
    frames = [torch.randn(1, shape[0], 1, shape[1], shape[2], generator=torch.Generator().manual_seed(seed * 1_000_003 + f))
              for f in range(start, end)]
    return torch.cat(frames, dim=2).to(device)


class StageClock:
    """Wall time per stage; synchronises CUDA so asynchronous kernels are charged to the right stage."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}

    def __call__(self, stage: str):
        clock = self

        class _Span:
            def __enter__(self):
                clock.sync()
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                clock.sync()
                clock.totals[stage] = clock.totals.get(stage, 0.0) + time.perf_counter() - self.start

        return _Span()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def animate(job: AnimateJob, on_progress: Callable[[Progress], None] | None = None, components=None,
            inputs: PreparedInputs | None = None) -> AnimateResult:
    """Run `job`; `inputs` from check_inputs() may be given when the caller has already checked and decoded them."""
    started = time.perf_counter()
    inputs = inputs if inputs is not None else prepare_inputs(job)
    device = resolve_device(job.device)
    dtype = resolve_dtype(job.dtype, device)
    clock = StageClock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    if components is None:
        from avatarcli.hub import resolve_weights
        from avatarcli.loading.stableavatar import load_stableavatar

        with clock("load"):
            weights = resolve_weights("stableavatar", job.weights, job.allow_download)
            components = load_stableavatar(weights, inputs.checkpoint, device, dtype)
    if job.compile and device.type == "cuda":
        with quiet_diffusers():
            components.transformer.fuse_qkv_projections()
            components.transformer.compile_repeated_blocks(fullgraph=True)

    preset = job.preset
    with clock("features"), torch.no_grad():
        text = encode_prompts(components.text_encoder, components.tokenizer, [job.negative_prompt, job.prompt],
                              device=device)
        components.text_encoder = None  # umT5-XXL is 11 GB in bf16: free it before the DiT runs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        image_tokens = clip_features(components.image_encoder, inputs.portrait, inputs.width, inputs.height)
        condition = reference_condition(components.vae, inputs.portrait, inputs.width, inputs.height,
                                        num_frames=4 * (WINDOW_LATENT_FRAMES - 1) + 1)
    with quiet_diffusers():  # diffusers warns on casting a VAE with .to(); nothing in the Wan VAE needs float32
        components.vae.to(resolve_dtype(job.vae_dtype, device))  # the reference latents above stay float32

    plan = plan_windows(latent_frames_for(inputs.frames), WINDOW_LATENT_FRAMES, preset.overlap, preset.blend)
    sigmas = flow_sigmas(preset.steps, preset.shift)
    guidance = Guidance(preset.guidance, preset.text_scale, preset.audio_scale, preset.ang_alpha, preset.ang_beta)

    def window_audio(window: Window) -> torch.Tensor:
        with clock("features"):
            return wav2vec_features(components.audio_encoder, components.feature_extractor,
                                    window_samples(inputs.samples, window, preset.fps))

    denoiser = StableAvatarDenoiser(components.transformer, guidance, positive_text=text[1:2],
                                    negative_text=text[0:1], image_tokens=image_tokens, condition=condition,
                                    window_audio=window_audio, sigmas=sigmas)
    latent_shape = (16, inputs.height // 8, inputs.width // 8)
    done = {"steps": 0, "windows": 0, "frames": 0}
    steps_total = len(plan.windows) * preset.steps

    def report():
        if on_progress:
            on_progress(Progress(done["windows"], len(plan.windows), done["steps"], steps_total, done["frames"],
                                 inputs.frames, time.perf_counter() - started))

    def timed_denoise(window: Window, step: int, latents: torch.Tensor) -> torch.Tensor:
        features_before = clock.totals.get("features", 0.0)
        tick = time.perf_counter()
        with torch.no_grad():
            velocity = denoiser(window, step, latents)
        clock.sync()
        spent = time.perf_counter() - tick - (clock.totals.get("features", 0.0) - features_before)
        clock.totals["dit"] = clock.totals.get("dit", 0.0) + spent
        done["steps"] += 1
        done["windows"] += step == preset.steps - 1
        report()
        return velocity

    sink_type = NullSink if job.null_sink else Mp4Sink
    sink = BackgroundSink(sink_type(job.output, inputs.width, inputs.height, preset.fps, audio_path=job.audio,
                                    crf=job.crf))
    decoder = StreamingDecoder(components.vae)
    sink.open()
    try:
        for chunk in sample_streaming(plan, sigmas, lambda s, e: frame_noise(job.seed, s, e, latent_shape, device),
                                      timed_denoise):
            if done["frames"] >= inputs.frames:
                continue  # the padding frames of a video shorter than one window
            with clock("decode"), torch.no_grad():
                pixels = decoder.push(chunk.latents.to(components.vae.dtype))[: inputs.frames - done["frames"]]
            with clock("encode"):
                sink.write(pixels)
            done["frames"] += len(pixels)
            report()
        with clock("encode"):
            sink.close()  # ffmpeg finishes the file, which is then renamed into place
    except BaseException:
        sink.abort()
        raise
    finally:
        decoder.close()

    return AnimateResult(
        output=None if job.null_sink else job.output, frames=done["frames"], fps=preset.fps, width=inputs.width,
        height=inputs.height, video_seconds=done["frames"] / preset.fps, wall_seconds=time.perf_counter() - started,
        windows=len(plan.windows), steps=preset.steps, timings=clock.totals,
        peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
