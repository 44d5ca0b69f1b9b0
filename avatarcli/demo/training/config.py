"""What one training run is: the model sizes, the data pool, every stage's steps / batch / learning rate / time budget,
and the constants the stages share (the DiT window, the held-out identity, the prompt).

Sizes. The VAE is the Wan 2.1 block layout; the loader reads only base_dim and z_dim from the file, so base_dim is
the one capacity knob. Base 20 gives 20 / 40 / 80 / 80 channels at 128 / 64 / 32 / 16 px around the 16-channel
16x16 latent; the earlier base 12 (12 / 24 / 48 / 48) had 12 channels to draw eyes, brows and hair edges at full
resolution. Base 20 is what the CPU and the repository afford: with the VAE's convolutions on oneDNN
(avatarcli.models.cpu_convs) the streaming decode costs 0.026 / 0.037 / 0.052 / 0.074 s per frame at base
12 / 16 / 20 / 28 on 2 cores, so 10 s of speech (250 frames) stays near the 30 s goal at base 20 and not at 28; and
the VAE stored in float16 is 10.7 MiB at base 20 against 20.8 at base 28 (the whole folder 14.6 MiB). The DiT keeps its size: its window-step is the other half of the
CPU time, and the identity was lost in the VAE (vae.py).

Time. Every trained stage has a step count and a wall-clock budget (whichever ends first, schedule.Deadline). With
`minutes` the whole run is held to that many minutes from the start of the process: the VAE and the DiT split what
the stages before them leave, less the expected time of the untimed stages after them and a margin, in the ratio
vae_seconds : dit_seconds (schedule.Budget). `estimate` gives the expected H200 seconds of each stage from the step
counts, the rates and the fixed stages' seconds of H200_RATES / H200_FIXED_SECONDS; the run prints it first.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from avatarcli.demo import world

WINDOW = 21  # latent frames per window, as the real model
WINDOW_VIDEO_FRAMES = 4 * (WINDOW - 1) + 1
HELD_OUT = 7  # identity seed of the stability / conditioning checks (pool identities start at 1_000_000)
PROMPT = "The protagonist is talking."  # = avatarcli.pipeline.DEFAULT_PROMPT (that module needs ffmpeg)


@dataclass
class DemoSizes:
    dim: int = 128
    num_heads: int = 4
    ffn_dim: int = 384
    num_layers: int = 4
    freq_dim: int = 64
    vae_base: int = 20
    audio_dim: int = 64
    audio_layers: int = 2
    audio_heads: int = 4
    audio_conv: int = 32


# Steps per second of each trained stage on one GPU at the default sizes and batches (bf16 autocast), and the
# seconds of the stages that are not step-counted at the default pool: what `estimate` works from. Measured on an
# H100 (2026-12-06, `train_demo.py --minutes 9`): wav2vec2 600 steps in 9 s; VAE base 20 at batch 12, 741 steps
# in 200 s (3.7/s); DiT at batch 96, 1396 steps in 193 s (7.2/s); the pool 26 s plus 20 s of start-up and the
# fixed components; encoding the pool and the portrait conditions 40 s; the checks and the export 2 s. An H200 is
# at least as fast.
H200_RATES = dict(audio=60.0, vae=3.7, dit=7.2)
H200_FIXED_SECONDS = dict(start=20.0, data=26.0, latents=40.0, checks=5.0)


@dataclass
class TrainConfig:
    seed: int = 0
    identities: int = 400
    clip_latents: int = 76  # latent frames per pool video: 4 * 75 + 1 = 301 video frames, ~12 s
    workers: int = 16
    sizes: DemoSizes = field(default_factory=DemoSizes)
    minutes: float | None = None  # whole-run wall-clock budget (None: each stage its own budget only)
    margin_seconds: float = 15.0  # with `minutes`: kept back for the final load check and slack
    audio_steps: int = 600
    audio_batch: int = 64
    audio_lr: float = 1e-3
    audio_seconds: float = 40.0
    vae_steps: int = 3000
    vae_batch: int = 12
    vae_episode_latents: int = 72  # streaming regime: clips of 72 latent frames (285 video frames) streamed through
    vae_grad_latents: int = 3  # encoder and decoder with caches carried, 3 latent frames (12 video frames) a step
    vae_lr: float = 5e-4
    vae_kl: float = 1e-7  # small: at 1e-4 the posterior's noise was as large as the latents' spread (vae.py)
    vae_mse: float = 1.0  # weight of the squared error beside the L1 (whole-frame PSNR is a squared error)
    vae_mouth_weight: float = 2.0  # extra loss weight on the mouth box
    vae_dark_weight: float = 10.0  # extra loss weight on the open mouth's dark interior (a few % of the mouth box)
    vae_seconds: float = 230.0
    vae_still_share: float = 0.5  # share of the VAE's time spent on stills first (vae.train_stills); 0: streamed only
    vae_still_batch: int = 64
    vae_still_lr: float = 2e-3
    vae_decoder_share: float = 0.0  # share of a new VAE's time on its decoder side alone, after the whole VAE (run.py)
    vae_decoder_lr: float = 3e-4  # learning rate of that decoder phase
    vae_per_frame_start: bool = True  # a new VAE starts per-frame on video (vae.per_frame_start)
    vae_check_frames: tuple[int, ...] = (81, 301)  # round-trip lengths logged after VAE training (stability)
    dit_steps: int = 100000
    dit_batch: int = 96
    dit_lr: float = 4e-4
    dit_seconds: float = 220.0
    dit_mouth_weight: float = 6.0  # loss weight 1 + face + this * mouth box (normalised to mean 1): the audio's area
    dit_audio_lr_scale: float = 3.0  # learning-rate multiplier of the audio path (dit.AUDIO_MODULES)
    dit_first_window: float = 0.2  # share of DiT windows cut at the video's start (its single-frame first latent)
    ema: float = 0.999
    export_dtype: str = "float16"  # VAE and DiT files (the loaders cast to the inference dtype)
    device: str = "cuda"
    size: int = world.SIZE  # frame size of the training videos
    init: str | None = None  # continue from a weights folder: audio encoder kept, VAE decoder and DiT trained on

    @classmethod
    def tiny(cls) -> TrainConfig:
        """A few iterations of everything on CPU at toy sizes (tests)."""
        return cls(identities=1, clip_latents=22, workers=0, size=32,
                   sizes=DemoSizes(dim=32, num_heads=2, ffn_dim=32, num_layers=1, freq_dim=32, vae_base=4,
                                   audio_dim=32, audio_layers=1, audio_heads=2, audio_conv=8),
                   audio_steps=2, audio_batch=2, vae_steps=2, vae_batch=1, vae_still_share=0.5, vae_still_batch=2, vae_episode_latents=4, vae_grad_latents=2,
                   vae_check_frames=(9,), dit_steps=2,
                   dit_batch=2, device="cpu", ema=0.5)


def with_overrides(config: TrainConfig, **values) -> TrainConfig:
    """`config` with every value that is not None replaced (command-line options left out keep the config's)."""
    return replace(config, **{k: v for k, v in values.items() if v is not None})


def estimate(config: TrainConfig, rates: dict | None = None, fixed: dict | None = None) -> dict[str, float]:
    """Expected seconds of each stage on an H200: a trained stage takes its step count at the H200 rate, or its time
    budget if that ends it first; the other stages their measured seconds (scaled by the pool's size). With
    `minutes`, the VAE and the DiT get what the budget leaves them (schedule.Budget), so the total is the budget."""
    rates = dict(H200_RATES, **(rates or {}))
    fixed = dict(H200_FIXED_SECONDS, **(fixed or {}))
    pool = config.identities * config.clip_latents / (400 * 76)
    out = {"start": fixed["start"], "data": fixed["data"] * pool,
           "audio": 0.0 if config.init else min(config.audio_steps / rates["audio"], config.audio_seconds)}
    vae, dit = config.vae_seconds, config.dit_seconds
    latents, checks = fixed["latents"] * pool, fixed["checks"]
    if config.minutes is not None:
        left = config.minutes * 60 - sum(out.values()) - latents - checks - config.margin_seconds
        vae, dit = left * vae / (vae + dit), left * dit / (vae + dit)
    out["vae"] = min(config.vae_steps / rates["vae"], vae)
    out["latents"] = latents
    out["dit"] = min(config.dit_steps / rates["dit"], dit)
    out["checks"] = checks
    out["total"] = sum(out.values())
    return out
