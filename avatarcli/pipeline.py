"""`animate`: portrait + a driving signal -> a video of the signal's length, streamed to an mp4 while it is generated.

Data path: media -> the driver (avatarcli/drivers: its features, window plan and window denoiser) -> sliding-window
sampling in wavefront order -> streaming causal VAE decode -> ffmpeg sink. This module is shared by every driver
and knows none of them. Inputs are validated before any weights are loaded, so bad input fails at once.

`animate` reads as a sampling script: prepare -> load -> build -> sample -> write. What is optional plugs in through
named parts built below it: the denoiser stack (counting, step prediction with its layer probe, a forward trace
recorded or replayed: sampling/trace.py), the output (the sink, and the resume `Checkpointer` the sampler calls back
after every window-step), the frame writer (inline, overlapped or tiled decode, as GPU memory allows: budget.py)
and the launch (one process, or several sharing the windows).

Under `torchrun` (or `avatarcli animate --gpus N`) every process runs this same function: the windows are spread
over the processes (sampling/sampler.py `sample_window_parallel`, avatarcli/parallel), and rank 0 decodes and writes.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from avatarcli.errors import AvatarError
from avatarcli.features.prompts import DEFAULT_PROMPT, NEGATIVE_PROMPT  # noqa: F401 - re-exported for callers
from avatarcli.job import AnimateJob, AnimateResult, Progress


def prepare(job: AnimateJob):
    """The job's driver and its validated inputs; no model is loaded. Raises AvatarError on bad input."""
    from avatarcli.drivers import select_driver
    from avatarcli.options import check_job
    from avatarcli.parallel import world_size
    from avatarcli.sink.ffmpeg import check_writable_output

    check_job(job, world_size())
    driver = select_driver(job)
    if not job.null_sink:
        check_writable_output(job.output)
    inputs = driver.prepare(job)
    if not job.null_sink:
        from avatarcli.parallel import rank
        from avatarcli.resume import OutputLock, ResumeFolder

        if rank() == 0:  # the writer's lock (hold_output); the other ranks of a launch must not touch it
            OutputLock(job.output).check()  # another process writing this output: it is named, exit 2
        ResumeFolder(job.output).check(job)  # a state found without --resume, or not matching the job, fails here
    return driver, inputs


def animate(job: AnimateJob, on_progress: Callable[[Progress], None] | None = None, models: Any = None,
            prepared=None, stop=None, sink=None, trace=None, replay=None) -> AnimateResult:
    """Run one job. `models`: the driver's loaded models to reuse (else loaded here); `prepared`: the result of
    `prepare(job)` when the caller already validated the inputs; `stop`: an avatarcli.resume.StopFlag, checked
    after every window-step (when set, the state is saved and AnimateInterrupted is raised); `sink`: where the
    finished frames go instead of `job.output` (an object with open / write(uint8 [n, H, W, 3]) / close / abort,
    e.g. for measuring in memory; give it with `null_sink=True`, no resume state is kept). `on_progress` gets a
    `Progress` at every change of stage (load, features, resume, sample, finish) and after every window-step.
    `trace`: a sampling.trace.TraceRecorder that records the run's forwards (one process); `replay`: a
    sampling.trace.ForwardTrace whose forwards the run repeats in place of the preset's step prediction and guidance
    reuse (benchmarks time a recorded run's work on other weights with it; the frames mean nothing)."""
    started = time.perf_counter()
    driver, inputs = prepared if prepared is not None else prepare(job)
    stage = StageReport(on_progress, inputs.frames, started)
    with hold_output(job):  # another process writing job.output: AvatarError, before anything loads
        stage("load")  # torch is imported from here on
        launch, clock = start_launch(job)
        raise_if_stopped(stop, job, inputs)
        if models is None:
            with clock("load"):
                models = driver.load(decide_compile(job, driver, inputs, launch.device), inputs, launch.device,
                                     launch.dtype)
        stage("features")
        generation = driver.build(job, inputs, models, launch.device, launch.dtype, clock)
        limit_branch_batch(generation, launch.device)
        launch.join(job, generation)
        stack = denoiser_stack(job, generation, trace, replay)
        output = open_output(job, inputs, launch, clock, sink, stage)
        start_trace(trace, job, driver.name, inputs, generation, launch, output.frames)
        state = continue_from(output.checkpointer, stack, launch.device)
        progress = ProgressMeter(generation, inputs.frames, started, on_progress, state, output.frames)
        writer = None
        output.sink.open()
        try:
            writer = open_writer(job, inputs, generation, output, launch.device, clock, stop)
            after = AfterStep(job, inputs, generation, progress, writer, output, stack, stop, launch.group)
            chunks = sample(job, generation, stack, launch, state, after)
            progress.update()  # the "sample" stage
            write_frames(chunks, writer, progress, launch.writes)
            with clock("encode"):
                output.sink.close()  # ffmpeg finishes the file, which is then renamed into place
        except BaseException:
            output.abort(writer)
            raise
        finally:
            stack.close()
            close_writer(writer, generation, clock.totals, job, launch.device)
        output.finish()
    return summarize(job, driver.name, inputs, generation, launch, clock.totals, writer, output.frames, stack,
                     started)


class StageReport:
    """Tells `on_progress` that a stage begins, as a `Progress` with nothing done yet: the library never prints,
    the caller shows it (the CLI's status line) or acts on it (what a Ctrl-C does there)."""

    def __init__(self, on_progress, frames_total: int, started: float) -> None:
        self.on_progress, self.frames_total, self.started = on_progress, frames_total, started

    def __call__(self, stage: str) -> None:
        if self.on_progress is not None:
            self.on_progress(Progress(0, 0, 0, 0, 0, 0, self.frames_total, time.perf_counter() - self.started,
                                      stage=stage))


def start_launch(job: AnimateJob):
    """The launch and the clock of the job's stages; torch's import and the device's set-up count as "load"."""
    tick = time.perf_counter()
    from avatarcli.runtime import StageClock

    launch = Launch.for_job(job)
    clock = StageClock(launch.device)
    clock.totals["load"] = time.perf_counter() - tick
    return launch, clock


def hold_output(job: AnimateJob):
    """The lock of the job's output (avatarcli/resume.py OutputLock) for the process that writes it; nothing to hold
    for a job that writes no file, or in the other processes of a launch."""
    from contextlib import nullcontext

    from avatarcli.parallel import rank

    if job.null_sink or rank() != 0:
        return nullcontext()
    from avatarcli.resume import OutputLock

    return OutputLock(job.output)


# ---- the launch -------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """Where the job runs: device and dtype, and the process group when several processes share the windows."""

    device: Any
    dtype: Any
    group: Any = None  # avatarcli.parallel.group.ProcessGroup

    @property
    def writes(self) -> bool:
        """This process decodes and writes the video (rank 0 of a launch)."""
        return self.group is None or self.group.global_rank == 0

    @classmethod
    def for_job(cls, job: AnimateJob) -> Launch:
        import torch

        from avatarcli.parallel import world_size
        from avatarcli.runtime import resolve_device, resolve_dtype

        device, group = resolve_device(job.device), None
        if world_size() > 1:
            from avatarcli.parallel.group import ProcessGroup, rank_device

            device = rank_device(device)
            if job.context_parallel > 1 and device.type != "cuda":
                raise AvatarError("--context-parallel runs on GPUs (diffusers' context parallelism needs an "
                                  "accelerator)")
            group = ProcessGroup(device, job.context_parallel)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        return cls(device, resolve_dtype(job.dtype, device), group)

    def join(self, job: AnimateJob, generation) -> None:
        """Several processes: check they planned the same job; with context parallelism, split the DiT's forwards."""
        if self.group is None:
            return
        plan, sigmas = generation.plan, generation.sigmas
        self.group.check_same(repr((plan, sigmas.tolist(), generation.latent_shape, job.seed)))
        if self.group.context > 1:
            from avatarcli.parallel.context import check_context_parallel, enable_context_parallel

            check_context_parallel(generation.transformer, self.group.context, plan.window_frames)
            enable_context_parallel(generation.transformer, self.group.context, self.group.context_mesh)


def decide_compile(job: AnimateJob, driver, inputs, device) -> AnimateJob:
    """The job the models load with: --compile auto decided, on or off, for its planned window-steps on `device`
    (avatarcli/compilation.py). Models handed in were loaded with their own decision (a batch's, for its group)."""
    from avatarcli.compilation import decided, planned_window_steps

    return decided(job, device, planned_window_steps(driver, job, inputs.frames), driver.compile_break_even(job))


def raise_if_stopped(stop, job: AnimateJob, inputs) -> None:
    """A stop requested before the models load: nothing new to save."""
    if stop is None or not stop.requested:
        return
    from avatarcli.resume import AnimateInterrupted, ResumeFolder

    saved = None if job.null_sink else ResumeFolder(job.output).check(job)
    raise AnimateInterrupted(job.output, saved["frames"] if saved else 0, inputs.frames, saved is not None,
                             stop.reason)


# ---- the denoiser stack -----------------------------------------------------------------------------------------


@dataclass
class DenoiserStack:
    """What the sampler calls (`velocity`), over the step predictor, the counted denoiser (the NFE), guidance reuse
    and the window denoiser (its `branch_forwards`)."""

    velocity: Callable
    counter: Any  # sampling.predict.CountedDenoiser: its `calls` are the transformer forwards
    predictor: Any = None  # sampling.predict.PredictingDenoiser when the preset predicts steps
    probe: Any = None  # sampling.predict.BlockProbe: the predictor's per-layer signal
    reuse: Any = None  # sampling.guidance_reuse.ReusingDenoiser when the preset reuses guidance
    window: Any = None  # the driver's window denoiser

    @property
    def branch_forwards(self) -> int:
        """Over all forwards, the branches each ran."""
        return getattr(self.window, "branch_forwards", self.counter.calls)

    def extras(self) -> dict:
        """The per-window state of the predictor and of guidance reuse, for a resumable save."""
        from avatarcli.sampling.guidance_reuse import merge_extras

        return merge_extras(self.predictor.extras() if self.predictor is not None else {},
                            self.reuse.extras() if self.reuse is not None else {})

    def load_extras(self, extras: dict) -> None:
        from avatarcli.sampling.guidance_reuse import split_extras

        predictor, reuse = split_extras(extras)
        if self.predictor is not None:
            self.predictor.load_extras(predictor)
        if self.reuse is not None:
            self.reuse.load_extras(reuse)

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()


def denoiser_stack(job: AnimateJob, generation, trace=None, replay=None) -> DenoiserStack:
    """The preset's stack (`preset_stack`), or the forwards of a trace to `replay` (`replayed_stack`); with a `trace`
    recorder, the window denoiser tells it of every forward and the top of the stack of every window-step."""
    stack = replayed_stack(job, generation, replay) if replay is not None else preset_stack(job, generation)
    if trace is not None:
        from avatarcli.sampling.trace import RecordedSteps

        generation.denoiser.recorder = trace
        stack.velocity = RecordedSteps(stack.velocity, trace)
    return stack


def preset_stack(job: AnimateJob, generation) -> DenoiserStack:
    """Count the driver's window denoiser (which times the DiT itself); predict steps when the preset says so.

    The layer probe hooks the driver's first and last blocks; compiled blocks run without it, and so does context
    parallelism (each process sees a part of the tokens, while the processes sharing windows must predict the same
    steps): the latent signal only there."""
    from avatarcli.compilation import is_compiled
    from avatarcli.sampling.predict import BlockProbe, CountedDenoiser

    reuse = job.preset.guidance_reuse  # under the counter: a forward of the conditional branch alone counts once
    reusing = reuse.bind(generation.denoiser, generation.sigmas) if reuse is not None else None
    counter = CountedDenoiser(reusing if reusing is not None else generation.denoiser)
    parts = dict(reuse=reusing, window=generation.denoiser)
    prediction = job.preset.prediction
    if prediction is None:
        return DenoiserStack(counter, counter, **parts)
    probe = None
    compiled = is_compiled(generation.transformer)
    if prediction.layer_ratio > 0 and generation.probe_blocks and not compiled and job.context_parallel == 1:
        probe = BlockProbe(*generation.probe_blocks, row=reusing.conditional if reusing is not None else None)
    predictor = prediction.bind(counter, generation.sigmas, probe=probe)
    return DenoiserStack(predictor, counter, predictor, probe, **parts)


def replayed_stack(job: AnimateJob, generation, replay) -> DenoiserStack:
    """The forwards of `replay` (a sampling.trace.ForwardTrace), forward for forward, in place of the preset's step
    prediction and guidance reuse (sampling/trace.py); predicted steps extrapolate at the preset's order."""
    from avatarcli.sampling.predict import CountedDenoiser
    from avatarcli.sampling.trace import ReplayedGuidance, ReplayedSteps, check_plan

    try:
        check_plan(replay, len(generation.plan.windows), len(generation.sigmas) - 1)
    except ValueError as error:
        raise AvatarError(str(error)) from None
    counter = CountedDenoiser(ReplayedGuidance(replay, generation.denoiser))
    order = job.preset.prediction.order if job.preset.prediction is not None else 1
    return DenoiserStack(ReplayedSteps(replay, counter, generation.sigmas, order), counter,
                         window=generation.denoiser)


def start_trace(trace, job: AnimateJob, driver: str, inputs, generation, launch: Launch, resumed_from: int) -> None:
    """Give the recorder the facts a replay needs: the size, frames and frame rate, the preset's settings, the window
    plan. The forwards of one process only: a launch of several is refused."""
    if trace is None:
        return
    if launch.group is not None:
        raise AvatarError("--trace records the forwards of one process: drop --gpus (or torchrun)")
    import yaml

    from avatarcli.presets import preset_yaml

    plan = generation.plan
    trace.start({"driver": driver, "model": job.model, "preset": job.preset.name,
                 "settings": yaml.safe_load(preset_yaml(job.preset)), "frames": inputs.frames, "fps": inputs.fps,
                 "width": inputs.width, "height": inputs.height, "steps": len(generation.sigmas) - 1,
                 "windows": len(plan.windows), "window_frames": plan.window_frames, "overlap": plan.overlap,
                 "blend": plan.blend, "latent_frames": plan.latent_frames, "guidance": job.preset.guidance,
                 "branches": generation.denoiser.branches, "seed": job.seed, "device": str(launch.device),
                 "dtype": str(launch.dtype).removeprefix("torch."), "resumed_from_frame": resumed_from})


# ---- the output: sink and resume folder --------------------------------------------------------------------------


@dataclass
class Output:
    sink: Any
    checkpointer: Any = None  # avatarcli.resume.Checkpointer when the run keeps a resume folder

    @property
    def frames(self) -> int:
        """Frames already in the output when the run starts (a resumed run's saved frames)."""
        return self.checkpointer.frames if self.checkpointer is not None else 0

    def abort(self, writer) -> None:
        if writer is not None:
            writer.abort()
        self.sink.abort()
        if self.checkpointer is not None:
            self.checkpointer.abandon()

    def finish(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.finish()


def open_output(job: AnimateJob, inputs, launch: Launch, clock, sink=None, stage=None) -> Output:
    """Where the finished frames go. One process writing a file keeps a resume folder (segments + state); a launch
    of several processes writes the file directly from rank 0; `null_sink` jobs write nothing (or to `sink`)."""
    from avatarcli.resume import Checkpointer
    from avatarcli.sink.ffmpeg import BackgroundSink, Mp4Sink, NullSink

    if sink is not None and not job.null_sink:
        raise ValueError("animate(sink=...) needs a job with null_sink=True (the sink replaces the output file)")
    audio = inputs.audio_track if job.mux_audio else None
    if job.null_sink or not launch.writes:
        return Output(BackgroundSink(sink or NullSink(job.output, inputs.width, inputs.height, inputs.fps)))
    if launch.group is not None:
        return Output(BackgroundSink(Mp4Sink(job.output, inputs.width, inputs.height, inputs.fps, audio, job.crf)))
    checkpointer = Checkpointer(job, clock)
    if checkpointer.folder.exists() and stage is not None:
        stage("resume")
    checkpointer.begin()
    return Output(checkpointer.sink(inputs.width, inputs.height, inputs.fps, audio, job.crf), checkpointer)


def continue_from(checkpointer, stack: DenoiserStack, device):
    """The sampler's saved state (and the predictor's) when the run resumes; None for a fresh run."""
    if checkpointer is None or checkpointer.state is None:
        return None
    from avatarcli.sampling.sampler import StreamState

    state = StreamState.from_state_dict(checkpointer.state["sampler"], device)
    stack.load_extras(state.extras)
    return state


# ---- sampling, progress and the per-step callback ----------------------------------------------------------------


class FrameNoise:
    """Initial noise of latent frames [start, end), one seeded draw per frame, so windows can start anywhere."""

    def __init__(self, seed: int, shape: tuple[int, int, int], device) -> None:
        self.seed, self.shape, self.device = seed, shape, device

    def __call__(self, start: int, end: int):
        return frame_noise(self.seed, start, end, self.shape, self.device)


def frame_noise(seed: int, start: int, end: int, shape: tuple[int, int, int], device) -> Any:
    import torch

    frames = [torch.randn(1, shape[0], 1, shape[1], shape[2],
                          generator=torch.Generator().manual_seed(seed * 1_000_003 + f)) for f in range(start, end)]
    return torch.cat(frames, dim=2).to(device)


def sample(job: AnimateJob, generation, stack: DenoiserStack, launch: Launch, state, after) -> Iterable:
    """The final latent frames in order: the streaming wavefront, or its window-parallel form over the launch
    (rank 0 gets the frames, the other ranks none)."""
    from avatarcli.sampling.sampler import sample_streaming, sample_window_parallel

    noise = FrameNoise(job.seed, generation.latent_shape, launch.device)
    extra = {} if generation.update is None else {"update": generation.update}
    if launch.group is None:
        return sample_streaming(generation.plan, generation.sigmas, noise, stack.velocity, state=state,
                                after_step=after, **extra)
    return sample_window_parallel(generation.plan, generation.sigmas, noise, stack.velocity, launch.group,
                                  after_tick=after, **extra)


class ProgressMeter:
    """Counts windows, window-steps and written frames, and reports them as a `Progress`: stage "sample", then
    "finish" once every latent frame is final (the last frames are decoded and the file is finished)."""

    def __init__(self, generation, frames_total: int, started: float, on_progress=None, state=None, frames: int = 0):
        self.windows_total, self.steps = len(generation.plan.windows), len(generation.sigmas) - 1
        self.latent_frames, self.stage = generation.plan.latent_frames, "sample"
        self.frames_total, self.started, self.on_progress = frames_total, started, on_progress
        self.window_steps = state.window_steps if state is not None else 0
        self.windows = sum(d == self.steps for d in state.done) if state is not None else 0
        self.frames = frames

    def update(self, live=None, frames: int | None = None) -> None:
        if live is not None:
            self.window_steps, self.windows = live.window_steps, sum(d == self.steps for d in live.done)
            self.stage = "finish" if live.emitted >= self.latent_frames else "sample"
        if frames is not None:
            self.frames = frames
        if self.on_progress is not None:
            self.on_progress(Progress(self.windows, self.windows_total, self.window_steps,
                                      self.windows_total * self.steps, self.steps, self.frames, self.frames_total,
                                      time.perf_counter() - self.started, self.stage))

    def finish(self, frames: int) -> None:
        """The sampler is done: the last frames are decoded and the file is finished next."""
        self.stage = "finish"
        self.update(frames=frames)


class AfterStep:
    """Called by the sampler after every window-step (one process) or tick (several): progress, the resume save
    (every `save_every` seconds of work, and when stopping), and the stop itself (AnimateInterrupted)."""

    def __init__(self, job: AnimateJob, inputs, generation, progress: ProgressMeter, writer, output: Output,
                 stack: DenoiserStack, stop, group=None) -> None:
        self.job, self.frames_total, self.latent_frames = job, inputs.frames, generation.plan.latent_frames
        self.progress, self.writer, self.output, self.stack, self.stop, self.group = (progress, writer, output,
                                                                                     stack, stop, group)

    def __call__(self, live) -> None:
        self.progress.update(live, self.writer.frames)
        unfinished = live.emitted < self.latent_frames
        requested = self.stop is not None and self.stop.requested
        if self.group is not None:  # every rank stops together
            if self.group.any(requested) and unfinished:
                reason = self.stop.reason if requested and self.stop.reason else "stopped by another process"
                raise self.interrupted(False, reason)
            return
        checkpointer = self.output.checkpointer
        if checkpointer is not None and unfinished and (requested or checkpointer.due()):
            self.save(live, checkpointer)
        if requested and unfinished:
            self.writer.drain()
            raise self.interrupted(checkpointer is not None, self.stop.reason)

    def save(self, live, checkpointer) -> None:
        live.extras = self.stack.extras()  # what each live window predicts from (velocities, guidance corrections)
        self.writer.drain()  # every emitted latent frame decoded and in the sink: cache, segments and count agree
        checkpointer.save(self.writer.frames, self.frames_total, self.output.sink.cut(), live.state_dict(),
                          self.writer.decoder.state_dict())

    def interrupted(self, saved: bool, reason):
        from avatarcli.resume import AnimateInterrupted

        return AnimateInterrupted(self.job.output, self.writer.frames, self.frames_total, saved, reason)


# ---- decoding and writing ----------------------------------------------------------------------------------------


def overlap_decode(job: AnimateJob, device) -> bool:
    """Whether `animate` decodes on a worker thread. Not with offloading: its hooks move models between devices
    and must see one model run at a time."""
    if job.overlap_decode == "auto":
        return device.type == "cuda" and job.offload == "none"
    return job.overlap_decode == "on" and job.offload == "none"


def decode_mode(job: AnimateJob, inputs, generation, device):
    """How the frames are decoded in the GPU memory left now that the models are in place (avatarcli/budget.py):
    overlapped with the DiT when that fits beside a window-step, else inline, else in spatial tiles."""
    from avatarcli.budget import choose_decode_mode, device_budget

    overlap = job.overlap_decode if overlap_decode(job, device) else "off"
    return choose_decode_mode(device_budget(device), inputs.width, inputs.height, generation.vae.dtype.itemsize,
                              window_forward_bytes(generation), overlap,
                              decoder="full" if generation.decoder is None else "tiny")


def limit_branch_batch(generation, device) -> None:
    """Forwards of fewer guidance branches when a window-step of all of them does not fit the GPU memory left
    (avatarcli/budget.py `choose_branch_batch`); the denoiser's `branch_batch` stays None where it fits."""
    from avatarcli.budget import choose_branch_batch, device_budget

    denoiser = generation.denoiser
    branches = getattr(denoiser, "branches", 1)
    if branches > 1 and hasattr(denoiser, "branch_batch"):
        denoiser.branch_batch = choose_branch_batch(device_budget(device), window_forward_bytes(generation, 1),
                                                    branches)


def window_forward_bytes(generation, branches: int | None = None) -> int:
    """The estimated transient memory of one forward of `branches` guidance branches (default: as many as the
    denoiser batches: all, or its `branch_batch`)."""
    from avatarcli.budget import dit_forward_bytes

    config = getattr(generation.transformer, "config", None)
    if config is None:
        return 0
    _, height, width = generation.latent_shape
    patch = config.patch_size
    tokens = (generation.plan.window_frames // patch[0]) * (height // patch[1]) * (width // patch[2])
    denoiser = generation.denoiser
    return dit_forward_bytes(tokens, branches or branches_per_forward(denoiser),
                             config.num_attention_heads * config.attention_head_dim, config.ffn_dim,
                             getattr(denoiser, "dtype", generation.vae.dtype).itemsize)


def branches_per_forward(denoiser) -> int:
    """The guidance branches one forward batches: all, or the denoiser's `branch_batch` where memory is short."""
    return getattr(denoiser, "branch_batch", None) or getattr(denoiser, "branches", 1)


def open_writer(job: AnimateJob, inputs, generation, output: Output, device, clock, stop=None):
    """Finished latents -> the decoder -> the sink, inline or on a worker thread (decode/overlap.py), in the mode
    `decode_mode` picks (the writer's `mode`, which the summary reports); a resumed run's decoder continues from its
    saved state (its cache loaded, or rebuilt by a replay: the "resume" stage). A stop pauses the decoder between
    latent frames (the rest is saved with it), so a save need not wait for a whole chunk to decode."""
    from avatarcli.decode.overlap import OverlappedWriter, SerialWriter
    from avatarcli.decode.stream import StreamingDecoder

    mode = decode_mode(job, inputs, generation, device)
    decoder = generation.decoder
    if decoder is None:
        decoder = StreamingDecoder(generation.vae, cache="auto", tiles=mode.tiles)
    if stop is not None and hasattr(decoder, "interrupt"):
        decoder.interrupt = stop.is_set
    common = (decoder, output.sink, inputs.frames, generation.skip_frames, generation.vae.dtype)
    if mode.overlapped:
        writer = OverlappedWriter(*common, frames=output.frames, device=device)
    else:
        writer = SerialWriter(*common, frames=output.frames)
    writer.mode = mode
    checkpointer = output.checkpointer
    if checkpointer is not None and checkpointer.state is not None:
        with clock("resume"):
            writer.load_decoder_state(checkpointer.state["decoder"])
    return writer


def write_frames(chunks: Iterable, writer, progress: ProgressMeter, writes: bool = True) -> None:
    """Decode and write the final frames as the sampler yields them. Every process of a launch runs the sampler
    to its end (its windows take part in the exchanges); only the one that `writes` gets frames to decode."""
    for chunk in chunks:
        if writes:
            writer.submit(chunk.latents)
            progress.update(frames=writer.frames)
    progress.finish(writer.frames)
    writer.close()
    progress.update(frames=writer.frames)


def close_writer(writer, generation, totals: dict[str, float], job: AnimateJob, device) -> None:
    if writer is None:
        if generation.decoder is not None:
            generation.decoder.close()
        return
    writer.decoder.close()
    charge_decode(totals, writer, writer.mode.overlapped)


def charge_decode(totals: dict[str, float], writer, overlap: bool) -> None:
    """Main-thread time on decoding ("decode"; overlapped: the waits for the worker) and on handing frames to the sink
    ("encode"), so that the timings add up to the wall time; the worker's own time is `background_timings`."""
    totals["decode"] = totals.get("decode", 0.0) + (writer.wait_seconds if overlap else writer.decode_seconds)
    totals["encode"] = totals.get("encode", 0.0) + (0.0 if overlap else writer.write_seconds)


def background_timings(writer) -> dict[str, float]:
    """Time spent beside the main thread: the overlapped decoder's worker, decoding and handing frames to the sink."""
    if writer is None or not writer.mode.overlapped:
        return {}
    return {"decode": writer.decode_seconds + writer.write_seconds}


# ---- the summary -------------------------------------------------------------------------------------------------


def summarize(job: AnimateJob, driver: str, inputs, generation, launch: Launch, totals: dict[str, float], writer,
              resumed_from: int, stack: DenoiserStack, started: float) -> AnimateResult:
    import torch

    from avatarcli.compilation import is_compiled

    group, calls = launch.group, stack.counter.calls
    nfe_per_rank = [calls] if group is None else group.gather_counts(calls)
    branches = [stack.branch_forwards] if group is None else group.gather_counts(stack.branch_forwards)
    context = 1 if group is None else group.context  # the processes of a context group share each forward
    frames = writer.frames if launch.writes else 0
    device = launch.device
    return AnimateResult(
        output=None if job.null_sink or not launch.writes else job.output, driver=driver, frames=frames,
        fps=inputs.fps, width=inputs.width, height=inputs.height, video_seconds=frames / inputs.fps,
        wall_seconds=time.perf_counter() - started, windows=len(generation.plan.windows),
        steps=len(generation.sigmas) - 1, timings=totals, background_timings=background_timings(writer),
        peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        resumed_from_frame=resumed_from, nfe=sum(nfe_per_rank[::context]), world_size=len(nfe_per_rank),
        nfe_per_rank=nfe_per_rank, branch_forwards=sum(branches[::context]),
        compiled=is_compiled(generation.transformer), offload=job.offload,
        decode_mode=str(writer.mode) if writer is not None else "", encode_mode=generation.encode_mode,
        branch_batch=branches_per_forward(generation.denoiser),
    )
