"""`animate`: portrait + a driving signal -> a video of the signal's length, streamed to an mp4 while it is generated.

Data path: media -> the driver (avatarcli/drivers: its features, window plan and window denoiser) -> sliding-window
sampling in wavefront order -> streaming causal VAE decode -> ffmpeg sink. This module is shared by every driver
and knows none of them. Inputs are validated before any weights are loaded, so bad input fails at once.

Under `torchrun` (or `avatarcli animate --gpus N`) every process runs this same function: the windows are spread
over the processes (sampling/sampler.py `sample_window_parallel`, avatarcli/parallel), and rank 0 decodes and writes.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avatarcli.errors import AvatarError
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
    offload: str = "none"  # none | model | group | sequential (diffusers' offloading; driving-video driver)
    weights_dtype: str = "auto"  # auto | fp8: fp8 weight storage, bf16 compute (driving-video driver)
    mux_audio: bool = True  # mux the driving input's audio track into the output
    keep_text_encoder: bool = False  # keep umT5 loaded after the prompts are encoded (batches with several prompts)
    null_sink: bool = False  # benchmarks: generate and decode, write nothing
    resume: bool = False  # continue the unfinished run saved beside the output (avatarcli/resume.py), if any
    # seconds of work between saves of the resume state (0: after every window-step)
    save_every: float = field(default_factory=lambda: float(os.environ.get("AVATARCLI_SAVE_EVERY", "120")))
    model: str = "stableavatar"  # "demo": the embedded demo weights (avatarcli.demo.model), no download
    # processes that split each transformer forward (Ulysses, avatarcli/parallel/context.py); the launch's processes
    # form world / context_parallel window ranks (window parallelism)
    context_parallel: int = 1
    # decode finished frames on a worker thread (and CUDA stream) while the DiT continues: auto = on a GPU without
    # offloading (decode/overlap.py); the frames are the same either way
    overlap_decode: str = "auto"  # auto | on | off
    precision: str = "auto"  # auto (the --dtype) | fp8: fp8 linear layers and self-attention in the DiT blocks (GPU)


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
    resumed_from_frame: int = 0  # frames taken from a saved run (0: a fresh run)
    nfe: int = 0  # transformer forwards run by this call (one batched call of all guidance branches counts once)
    world_size: int = 1  # processes that shared the work (window parallelism)
    nfe_per_rank: list[int] = field(default_factory=list)  # forwards each process ran or shared, in rank order


def prepare(job: AnimateJob):
    """The job's driver and its validated inputs; no model is loaded. Raises AvatarError on bad input."""
    from avatarcli.drivers import select_driver
    from avatarcli.parallel import world_size
    from avatarcli.sink.ffmpeg import check_writable_output

    if job.resume and world_size() > 1:
        raise AvatarError("--resume works with one process: rerun without --gpus (and without torchrun) to continue "
                          "the saved run")
    if job.context_parallel < 1 or (world_size() > 1 and world_size() % job.context_parallel):
        raise AvatarError(f"--context-parallel {job.context_parallel} must divide the {world_size()} processes")
    driver = select_driver(job)
    if not job.null_sink:
        check_writable_output(job.output)
    inputs = driver.prepare(job)
    if not job.null_sink:
        from avatarcli.resume import ResumeFolder

        ResumeFolder(job.output).check(job)  # a state found without --resume, or not matching the job, fails here
    return driver, inputs


def frame_noise(seed: int, start: int, end: int, shape: tuple[int, int, int], device) -> Any:
    """Initial noise of latent frames [start, end), one seeded draw per frame, so windows can start anywhere."""
    import torch

    frames = [torch.randn(1, shape[0], 1, shape[1], shape[2], generator=torch.Generator().manual_seed(seed * 1_000_003 + f))
              for f in range(start, end)]
    return torch.cat(frames, dim=2).to(device)


def overlap_decode(job: AnimateJob, device) -> bool:
    """Whether `animate` decodes on a worker thread. Not with offloading: its hooks move models between devices
    and must see one model run at a time."""
    if job.overlap_decode not in ("auto", "on", "off"):
        raise ValueError(f"overlap_decode must be auto, on or off, got {job.overlap_decode!r}")
    if job.overlap_decode == "auto":
        return device.type == "cuda" and job.offload == "none"
    return job.overlap_decode == "on" and job.offload == "none"


def charge_decode(totals: dict[str, float], writer, overlap: bool) -> None:
    """Main-thread time on decoding ("decode"; overlapped: the waits for the worker) and on handing frames to the sink
    ("encode"); an overlapped run adds the worker's own time as "decode_overlapped" (beside, not within, the others)."""
    totals["decode"] = totals.get("decode", 0.0) + (writer.wait_seconds if overlap else writer.decode_seconds)
    totals["encode"] = totals.get("encode", 0.0) + (0.0 if overlap else writer.write_seconds)
    if overlap:
        totals["decode_overlapped"] = writer.decode_seconds + writer.write_seconds


def animate(job: AnimateJob, on_progress: Callable[[Progress], None] | None = None, models: Any = None,
            prepared=None, stop=None, sink=None) -> AnimateResult:
    """Run one job. `models`: the driver's loaded models to reuse (else loaded here); `prepared`: the result of
    `prepare(job)` when the caller already validated the inputs; `stop`: an avatarcli.resume.StopFlag, checked
    after every window-step (when set, the state is saved and AnimateInterrupted is raised); `sink`: where the
    finished frames go instead of `job.output` (an object with open / write(uint8 [n, H, W, 3]) / close / abort,
    e.g. for measuring in memory; give it with `null_sink=True`, no resume state is kept)."""
    started = time.perf_counter()
    driver, inputs = prepared if prepared is not None else prepare(job)

    import torch

    from avatarcli.decode.overlap import OverlappedWriter, SerialWriter
    from avatarcli.decode.stream import StreamingDecoder
    from avatarcli.parallel import world_size
    from avatarcli.resume import AnimateInterrupted, ResumeFolder, SegmentedSink, fingerprint
    from avatarcli.runtime import StageClock, resolve_device, resolve_dtype
    from avatarcli.sampling.sampler import StreamState, sample_streaming, sample_window_parallel
    from avatarcli.sink.ffmpeg import BackgroundSink, Mp4Sink, NullSink

    device = resolve_device(job.device)
    group = None  # the process group when several processes share the windows (avatarcli/parallel)
    if world_size() > 1:
        from avatarcli.parallel.group import ProcessGroup, rank_device

        device = rank_device(device)
        if job.context_parallel > 1 and device.type != "cuda":
            raise AvatarError("--context-parallel runs on GPUs (diffusers' context parallelism needs an accelerator)")
        group = ProcessGroup(device, job.context_parallel)
    elif job.context_parallel > 1:
        raise AvatarError("--context-parallel splits the work of several processes: use it with --gpus (or torchrun)")
    writes = group is None or group.global_rank == 0  # this process decodes and writes the video
    dtype = resolve_dtype(job.dtype, device)
    clock = StageClock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if sink is not None and not job.null_sink:
        raise ValueError("animate(sink=...) needs a job with null_sink=True (the sink replaces the output file)")
    # Several processes keep no resume state (prepare() refuses --resume); rank 0 writes the output directly.
    folder = None if job.null_sink or group is not None else ResumeFolder(job.output)
    saved = folder.check(job) if folder is not None else None
    if stop is not None and stop.requested:
        raise AnimateInterrupted(job.output, saved["frames"] if saved else 0, inputs.frames, saved is not None,
                                 stop.reason)
    if models is None:
        with clock("load"):
            models = driver.load(job, inputs, device, dtype)
    generation = driver.build(job, inputs, models, device, dtype, clock)
    plan, steps = generation.plan, len(generation.sigmas) - 1
    if group is not None:
        group.check_same(repr((plan, generation.sigmas.tolist(), generation.latent_shape, job.seed)))
        if group.context > 1:
            from avatarcli.parallel.context import check_context_parallel, enable_context_parallel

            check_context_parallel(generation.transformer, group.context, plan.window_frames)
            enable_context_parallel(generation.transformer, group.context, group.context_mesh)
    prediction = job.preset.prediction

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
        return velocity

    # Step prediction (sampling/predict.py) sits between the sampler and the model; the layer probe hooks the
    # driver's first and last blocks (compiled blocks run without it: the latent signal only).
    # Under context parallelism each process sees a part of the tokens, while the processes sharing windows must
    # predict the same steps: the latent signal only there too.
    probe = None
    if (prediction is not None and prediction.layer_ratio > 0 and generation.probe_blocks and not job.compile
            and job.context_parallel == 1):
        from avatarcli.sampling.predict import BlockProbe

        probe = timed_denoise.layer_probe = BlockProbe(*generation.probe_blocks)
    from avatarcli.sampling.predict import CountedDenoiser

    model_calls = CountedDenoiser(timed_denoise)
    predictor = prediction.bind(model_calls, generation.sigmas) if prediction is not None else None
    velocity_of = predictor if predictor is not None else model_calls

    def tracked(window, step: int, latents):
        velocity = velocity_of(window, step, latents)
        done["window_steps"] += 1
        done["windows"] += step == steps - 1
        report()
        return velocity

    audio_track = inputs.audio_track if job.mux_audio else None
    decoder = generation.decoder if generation.decoder is not None else StreamingDecoder(generation.vae)
    state, job_fingerprint, segments, decoder_state = None, None, [], None
    if folder is not None:
        job_fingerprint = fingerprint(job)
        if saved is not None:
            restored = folder.load()
            state = StreamState.from_state_dict(restored["sampler"], device)
            if predictor is not None:
                predictor.load_extras(state.extras)
            decoder_state = restored["decoder"]
            segments, done["frames"] = restored["segments"], restored["frames"]
            done["window_steps"] = state.window_steps
            done["windows"] = sum(d == steps for d in state.done)
        else:
            folder.start_fresh()
        sink = SegmentedSink(folder.path, job.output, inputs.width, inputs.height, inputs.fps, audio_track, job.crf,
                             segments=segments, frames_written=done["frames"])
    elif writes and not job.null_sink:
        sink = BackgroundSink(Mp4Sink(job.output, inputs.width, inputs.height, inputs.fps, audio_track, job.crf))
    else:
        sink = BackgroundSink(sink if sink is not None else NullSink(job.output, inputs.width, inputs.height, inputs.fps))
    resumed_from = done["frames"]
    last_save = time.perf_counter()
    # Finished latents go to the decoder and the sink either inline or on a worker thread (decode/overlap.py).
    overlap = overlap_decode(job, device)
    writer_kind = OverlappedWriter if overlap else SerialWriter
    extra_writer = {"device": device} if overlap else {}
    writer = None

    def after_step(live: StreamState) -> None:
        nonlocal last_save
        done["frames"] = writer.frames
        unfinished = live.emitted < plan.latent_frames
        stopping = stop is not None and stop.requested and unfinished
        if folder is not None and unfinished and (stopping or time.perf_counter() - last_save >= job.save_every):
            if predictor is not None:
                live.extras = predictor.extras()  # the stored velocities each live window predicts from
            writer.drain()  # every emitted latent frame decoded and in the sink: cache, segments and count agree
            done["frames"] = writer.frames
            with clock("save"):
                folder.save(job_fingerprint, done["frames"], inputs.frames, sink.cut(), live.state_dict(),
                            decoder.state_dict())
            last_save = time.perf_counter()
        if stopping:
            writer.drain()
            done["frames"] = writer.frames
            raise AnimateInterrupted(job.output, done["frames"], inputs.frames, folder is not None, stop.reason)

    def after_tick(live: StreamState) -> None:
        """Window parallelism: progress counts every rank's window-steps; all ranks stop together."""
        done["window_steps"] = live.window_steps
        done["windows"] = sum(d == steps for d in live.done)
        report()
        if group.any(stop is not None and stop.requested) and live.emitted < plan.latent_frames:
            reason = stop.reason if stop is not None and stop.reason else "stopped by another process"
            raise AnimateInterrupted(job.output, done["frames"], inputs.frames, False, reason)

    sink.open()
    try:
        writer = writer_kind(decoder, sink, inputs.frames, generation.skip_frames, generation.vae.dtype,
                             frames=done["frames"], **extra_writer)
        if decoder_state is not None:
            writer.load_decoder_state(decoder_state)
        noise = lambda s, e: frame_noise(job.seed, s, e, generation.latent_shape, device)  # noqa: E731
        extra = {} if generation.update is None else {"update": generation.update}
        if group is None:
            chunks = sample_streaming(plan, generation.sigmas, noise, tracked, state=state, after_step=after_step,
                                      **extra)
        else:  # rank 0 gets the final frames, the other ranks none
            chunks = sample_window_parallel(plan, generation.sigmas, noise, velocity_of, group, after_tick=after_tick,
                                            **extra)
        for chunk in chunks:
            if not writes:
                continue  # a process sharing rank 0's windows (context parallelism) holds the frames too
            writer.submit(chunk.latents)
            done["frames"] = writer.frames
            report()
        writer.close()
        done["frames"] = writer.frames
        report()
        with clock("encode"):
            sink.close()  # ffmpeg finishes the file, which is then renamed into place
    except BaseException:
        if writer is not None:
            writer.abort()
        sink.abort()
        if folder is not None:
            folder.discard_if_unsaved()
        raise
    finally:
        decoder.close()
        if probe is not None:
            probe.close()
        if writer is not None:
            charge_decode(clock.totals, writer, overlap)
    if folder is not None:
        folder.remove()
    nfe_per_rank = [model_calls.calls] if group is None else group.gather_counts(model_calls.calls)
    context = 1 if group is None else group.context  # the processes of a context group share each forward

    return AnimateResult(
        output=None if job.null_sink or not writes else job.output, driver=driver.name, frames=done["frames"],
        fps=inputs.fps, width=inputs.width, height=inputs.height, video_seconds=done["frames"] / inputs.fps,
        wall_seconds=time.perf_counter() - started, windows=len(plan.windows), steps=steps, timings=clock.totals,
        peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        resumed_from_frame=resumed_from, nfe=sum(nfe_per_rank[::context]), world_size=len(nfe_per_rank),
        nfe_per_rank=nfe_per_rank,
    )
