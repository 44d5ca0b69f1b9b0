"""What one `animate` run is asked to do (`AnimateJob`), what it reports while it runs (`Progress`) and what it gives
back (`AnimateResult`): plain data, below the pipeline and the drivers, importing nothing heavy.

Jobs are built and checked in one place, avatarcli/options.py, for the CLI and for batch manifests alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from avatarcli.compilation import compile_mode
from avatarcli.features.prompts import DEFAULT_PROMPT, NEGATIVE_PROMPT
from avatarcli.presets import Preset

# The job fields that name a driving input, one per driver (avatarcli/drivers maps each to its driver).
DRIVING_INPUTS = ("audio", "driving")
OVERLAP_DECODE_MODES = ("auto", "on", "off")


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
    # fuse q/k/v and torch.compile the DiT blocks (GPU; a fixed time once, ~20% faster per step): auto | on | off;
    # auto compiles on CUDA when the job's window-steps repay it (avatarcli/compilation.py)
    compile: str = "auto"
    offload: str = "none"  # none | model | group | sequential (diffusers' offloading of the DiT; umT5 too)
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

    def __post_init__(self) -> None:
        self.compile = compile_mode(self.compile)  # true/false, from when it was a flag: on/off

    @property
    def driving_input(self) -> str | None:
        """The one driving input the job names ("audio" or "driving"), None when it names none or several."""
        given = [name for name in DRIVING_INPUTS if getattr(self, name) is not None]
        return given[0] if len(given) == 1 else None


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
    # what the run is doing: load (torch, the models), features (conditioning), resume (restoring a saved run),
    # sample (window-steps; the counts above), finish (the last frames decoded, the file finished)
    stage: str = "sample"


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
    timings: dict[str, float] = field(default_factory=dict)  # the main thread's stages: they add up to the wall
    # work beside the main thread (the overlapped decoder's own seconds), not within `timings`
    background_timings: dict[str, float] = field(default_factory=dict)
    peak_gpu_bytes: int = 0
    peak_rss_bytes: int = 0
    resumed_from_frame: int = 0  # frames taken from a saved run (0: a fresh run)
    nfe: int = 0  # transformer forwards run by this call (one batched call of all guidance branches counts once)
    world_size: int = 1  # processes that shared the work (window parallelism)
    nfe_per_rank: list[int] = field(default_factory=list)  # forwards each process ran or shared, in rank order
    # over all forwards, the guidance branches each ran (3 for a cfg forward, 1 for a reused-guidance one)
    branch_forwards: int = 0
    compiled: bool = False  # the DiT blocks ran compiled (--compile on, or auto deciding so)
    offload: str = "none"  # where the DiT's weights waited between forwards: none | model | group | sequential
    decode_mode: str = ""  # how the frames were decoded: overlapped, inline or tiled RxC (avatarcli/budget.py)
    encode_mode: str = ""  # how the reference was encoded: whole, or tiled; with the DiT on the host meanwhile
    branch_batch: int = 1  # guidance branches per forward: all, or fewer where memory is short (avatarcli/budget.py)
