"""What one training run is: the model sizes, the data pool, every stage's steps / batch / learning rate / time budget,
and the constants the stages share (the DiT window, the held-out identity, the prompt)."""

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
    vae_base: int = 12
    audio_dim: int = 64
    audio_layers: int = 2
    audio_heads: int = 4
    audio_conv: int = 32


@dataclass
class TrainConfig:
    seed: int = 0
    identities: int = 400
    clip_latents: int = 76  # latent frames per pool video: 4 * 75 + 1 = 301 video frames, ~12 s
    workers: int = 16
    sizes: DemoSizes = field(default_factory=DemoSizes)
    audio_steps: int = 600
    audio_batch: int = 64
    audio_lr: float = 1e-3
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_episode_latents: int = 72  # streaming regime: clips of 72 latent frames (285 video frames) streamed through
    vae_grad_latents: int = 3  # encoder and decoder with caches carried, 3 latent frames (12 video frames) a step
    vae_lr: float = 5e-4
    vae_kl: float = 1e-4
    vae_seconds: float = 360.0
    vae_dark_weight: float = 30.0  # extra loss weight on the open mouth's dark interior (a few % of the mouth box)
    vae_check_frames: tuple[int, ...] = (81, 301)  # round-trip lengths logged after VAE training (stability)
    dit_steps: int = 100000
    dit_batch: int = 96
    dit_lr: float = 4e-4
    dit_seconds: float = 420.0
    dit_mouth_weight: float = 6.0  # loss weight 1 + face + this * mouth box (normalised to mean 1): the audio's area
    dit_audio_lr_scale: float = 3.0  # learning-rate multiplier of the audio path (dit.AUDIO_MODULES)
    ema: float = 0.999
    device: str = "cuda"
    size: int = world.SIZE  # frame size of the training videos
    init: str | None = None  # continue from a weights folder: audio encoder kept, VAE decoder and DiT trained on

    @classmethod
    def tiny(cls) -> TrainConfig:
        """A few iterations of everything on CPU at toy sizes (tests)."""
        return cls(identities=1, clip_latents=22, workers=0, size=32,
                   sizes=DemoSizes(dim=32, num_heads=2, ffn_dim=32, num_layers=1, freq_dim=32, vae_base=4,
                                   audio_dim=32, audio_layers=1, audio_heads=2, audio_conv=8),
                   audio_steps=2, audio_batch=2, vae_steps=2, vae_batch=1, vae_episode_latents=4, vae_grad_latents=2,
                   vae_check_frames=(9,), dit_steps=2,
                   dit_batch=2, device="cpu", ema=0.5)


def with_overrides(config: TrainConfig, **values) -> TrainConfig:
    """`config` with every value that is not None replaced (command-line options left out keep the config's)."""
    return replace(config, **{k: v for k, v in values.items() if v is not None})
