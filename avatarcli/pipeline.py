"""`animate`: portrait + a driving signal -> a video of the signal's length, streamed to an mp4 while it is generated.

Data path: media -> the driver (avatarcli/drivers: its features, window plan and window denoiser) -> sliding-window
sampling in wavefront order -> streaming causal VAE decode -> ffmpeg sink. This module is shared by every driver
and knows none of them. Inputs are validated before any weights are loaded, so bad input fails at once.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avatarcli.features.prompts import DEFAULT_PROMPT, NEGATIVE_PROMPT
from avatarcli.presets import Preset


@dataclass
class AnimateJob:
    portrait: Path
    output: Path
    preset: Preset
    audio: Path | None = None  # speech: the audio driver (StableAvatar)
    driving: Path | None = None  # a driving face video: the driving-video driver (FlashPortrait)
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
    mux_audio: bool = True  # mux the driving input's audio track into the output
    keep_text_encoder: bool = False  # keep umT5 loaded after the prompts are encoded (batches with several prompts)
    null_sink: bool = False  # benchmarks: generate and decode, write nothing


@dataclass
class Progress:
    windows_done: int
    windows_total: int
    window_steps_done: int
    window_steps_total: int
    steps_per_window: int
    frames_written: int
    frames_total: int
    elapsed_seconds: float


@dataclass
class AnimateResult:
    output: Path | None
    driver: str
    frames: int
    fps: float
    width: int
    height: int
    video_seconds: float
    wall_seconds: float
    windows: int
    steps: int
    timings: dict[str, float] = field(default_factory=dict)
    peak_gpu_bytes: int = 0
    peak_rss_bytes: int = 0


def prepare(job: AnimateJob):
    """The job's driver and its validated inputs; no model is loaded. Raises AvatarError on bad input."""
    from avatarcli.drivers import select_driver
    from avatarcli.sink.ffmpeg import check_writable_output

    driver = select_driver(job)
    if not job.null_sink:
        check_writable_output(job.output)
    return driver, driver.prepare(job)


def frame_noise(seed: int, start: int, end: int, shape: tuple[int, int, int], device) -> Any:
    """Initial noise of latent frames [start, end), one seeded draw per frame, so windows can start anywhere."""
    import torch

    frames = [torch.randn(1, shape[0], 1, shape[1], shape[2], generator=torch.Generator().manual_seed(seed * 1_000_003 + f))
              for f in range(start, end)]
    return torch.cat(frames, dim=2).to(device)


def animate(job: AnimateJob, on_progress: Callable[[Progress], None] | None = None, models: Any = None,
            prepared=None) -> AnimateResult:
    """Run one job. `models`: the driver's loaded models to reuse (else loaded here); `prepared`: the result of
    `prepare(job)` when the caller already validated the inputs."""
    started = time.perf_counter()
    driver, inputs = prepared if prepared is not None else prepare(job)

    import torch

    from avatarcli.decode.stream import StreamingDecoder
    from avatarcli.runtime import StageClock, resolve_device, resolve_dtype
    from avatarcli.sampling.sampler import sample_streaming
    from avatarcli.sink.ffmpeg import BackgroundSink, Mp4Sink, NullSink

    device = resolve_device(job.device)
    dtype = resolve_dtype(job.dtype, device)
    clock = StageClock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if models is None:
        with clock("load"):
            models = driver.load(job, inputs, device, dtype)
    generation = driver.build(job, inputs, models, device, dtype, clock)
    plan, steps = generation.plan, len(generation.sigmas) - 1

    done = {"window_steps": 0, "windows": 0, "frames": 0}

    def report():
        if on_progress:
            on_progress(Progress(done["windows"], len(plan.windows), done["window_steps"], len(plan.windows) * steps,
                                 steps, done["frames"], inputs.frames, time.perf_counter() - started))

    def timed_denoise(window, step: int, latents):
        features_before = clock.totals.get("features", 0.0)  # a driver charges per-window features to "features"
        tick = time.perf_counter()
        with torch.no_grad():
            velocity = generation.denoiser(window, step, latents)
        clock.sync()
        spent = time.perf_counter() - tick - (clock.totals.get("features", 0.0) - features_before)
        clock.totals["dit"] = clock.totals.get("dit", 0.0) + spent
        done["window_steps"] += 1
        done["windows"] += step == steps - 1
        report()
        return velocity

    audio_track = inputs.audio_track if job.mux_audio else None
    sink_type = NullSink if job.null_sink else Mp4Sink
    sink = BackgroundSink(sink_type(job.output, inputs.width, inputs.height, inputs.fps, audio_path=audio_track,
                                    crf=job.crf))
    decoder = StreamingDecoder(generation.vae)
    sink.open()
    try:
        noise = lambda s, e: frame_noise(job.seed, s, e, generation.latent_shape, device)  # noqa: E731
        for chunk in sample_streaming(plan, generation.sigmas, noise, timed_denoise):
            if done["frames"] >= inputs.frames:
                continue  # the padding frames of a video shorter than one window
            with clock("decode"), torch.no_grad():
                pixels = decoder.push(chunk.latents.to(generation.vae.dtype))[: inputs.frames - done["frames"]]
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
        output=None if job.null_sink else job.output, driver=driver.name, frames=done["frames"], fps=inputs.fps,
        width=inputs.width, height=inputs.height, video_seconds=done["frames"] / inputs.fps,
        wall_seconds=time.perf_counter() - started, windows=len(plan.windows), steps=steps, timings=clock.totals,
        peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
