"""World data: the pool of rendered identities (avatarcli.demo.world) and the random training batches cut from it.

Nothing here is trained. The pool is a set of identities, each speaking its own synthetic speech with blinks and sway
for clip_latents latent frames (rendered in worker processes); every stage draws its batches from it with its own
seeded generator: speech windows with the mouth openness under them (wav2vec2), video clips (VAE), and windows of
encoded latents with the speech under them (DiT).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from avatarcli.demo import world
from avatarcli.demo.training.config import WINDOW, WINDOW_VIDEO_FRAMES, TrainConfig


def render_identity(args: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(seed, frames, size) -> video [F, H, W, 3] uint8, speech samples, portrait [H, W, 3], mouth openness [F]."""
    seed, frames, size = args
    identity = world.random_identity(seed)
    samples = world.speech(seed, frames / world.FPS)
    video = world.render_video(identity, samples, motion_seed=seed, size=size)
    openness = world.mouth_openness(samples, frames=len(video))
    return video, samples, np.asarray(world.portrait(identity, size)), openness.astype(np.float32)


@dataclass
class Pool:
    videos: torch.Tensor  # [N, F, H, W, 3] uint8 (on the training device)
    audio: torch.Tensor  # [N, samples] float32
    portraits: np.ndarray  # [N, H, W, 3] uint8
    openness: torch.Tensor  # [N, F]


def make_pool(config: TrainConfig, log: Callable[[str], None]) -> Pool:
    """Identities 1_000_000 + seed * 100_000 + i, so the training people are not the small-seed demo faces."""
    frames = 4 * (config.clip_latents - 1) + 1
    jobs = [(1_000_000 + config.seed * 100_000 + i, frames, config.size) for i in range(config.identities)]
    started = time.perf_counter()
    if config.workers:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(config.workers) as pool:
            results = pool.map(render_identity, jobs, chunksize=4)
    else:
        results = [render_identity(job) for job in jobs]
    device = torch.device(config.device)
    pool = Pool(
        videos=torch.from_numpy(np.stack([r[0] for r in results])).to(device),
        audio=torch.from_numpy(np.stack([r[1] for r in results])).to(device),
        portraits=np.stack([r[2] for r in results]),
        openness=torch.from_numpy(np.stack([r[3] for r in results])).to(device),
    )
    log(f"data: {config.identities} identities x {frames} frames in {time.perf_counter() - started:.1f} s")
    return pool


def to_unit(video_uint8: torch.Tensor) -> torch.Tensor:
    """[B, F, H, W, 3] uint8 -> [B, 3, F, H, W] float in [-1, 1]."""
    return video_uint8.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def normalise_audio(samples: torch.Tensor) -> torch.Tensor:
    """Wav2Vec2FeatureExtractor's per-slice zero-mean / unit-variance normalisation, batched."""
    mean = samples.mean(dim=-1, keepdim=True)
    var = samples.var(dim=-1, keepdim=True, unbiased=False)
    return (samples - mean) / torch.sqrt(var + 1e-7)


def box_mask(box: tuple[float, float, float, float], height: int, width: int, device) -> torch.Tensor:
    """[height, width] float mask of the pixels whose centres lie in `box` (x0, y0, x1, y1 in unit coordinates)."""
    x0, y0, x1, y1 = box
    ys = (torch.arange(height, device=device) + 0.5) / height
    xs = (torch.arange(width, device=device) + 0.5) / width
    return (((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]).float()


def speech_windows(pool: Pool, count: int, gen: torch.Generator) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """`count` random windows of WINDOW_VIDEO_FRAMES video frames of the pool's speech: samples [count, span] and
    (identity, first video frame) of each."""
    span = WINDOW_VIDEO_FRAMES * world.SAMPLE_RATE // world.FPS
    frames = pool.openness.shape[1]
    hop = world.SAMPLE_RATE // world.FPS
    idx = torch.randint(0, pool.audio.shape[0], (count,), generator=gen)
    first = torch.randint(0, frames - WINDOW_VIDEO_FRAMES + 1, (count,), generator=gen)
    where = list(zip(idx.tolist(), first.tolist()))
    return torch.stack([pool.audio[i, f * hop : f * hop + span] for i, f in where]), where


def openness_targets(pool: Pool, where: list[tuple[int, int]], tokens: int, device) -> torch.Tensor:
    """Mouth openness under each of `tokens` wav2vec2 tokens of the speech_windows at `where`: [count, tokens].

    Token t sees samples 320 t .. 320 t + 400; its target is the openness of the video frame of its centre (clamped
    to the window)."""
    hop = world.SAMPLE_RATE // world.FPS
    centre = (torch.arange(tokens, device=device) * 320 + 200) // hop
    return torch.stack([pool.openness[i, f + centre.clamp(max=WINDOW_VIDEO_FRAMES - 1)] for i, f in where])


def video_clips(pool: Pool, count: int, frames: int, gen: torch.Generator) -> torch.Tensor:
    """`count` random clips of `frames` video frames of the pool: [count, frames, H, W, 3] uint8."""
    idx = torch.randint(0, pool.videos.shape[0], (count,), generator=gen)
    first = torch.randint(0, pool.videos.shape[1] - frames + 1, (count,), generator=gen)
    return torch.stack([pool.videos[i, f : f + frames] for i, f in zip(idx.tolist(), first.tolist())])


def latent_windows(pool: Pool, latents: torch.Tensor, count: int, gen: torch.Generator, first: float = 0.0):
    """`count` random windows of WINDOW latent frames of the encoded pool `latents` [N, 16, L, h, w] and the speech
    under each: (x0 [count, 16, WINDOW, h, w], pool index of each [count], samples [count, span]). A share `first` of
    them (drawn per window) starts at the video's first latent frame, as inference's first window does."""
    hop = world.SAMPLE_RATE // world.FPS
    span = WINDOW_VIDEO_FRAMES * hop
    idx = torch.randint(0, latents.shape[0], (count,), generator=gen)
    start = torch.randint(0, latents.shape[2] - WINDOW + 1, (count,), generator=gen)
    start = torch.where(torch.rand(count, generator=gen) < first, torch.zeros_like(start), start)
    # One gather each on the device (a Python loop of `count` slices was most of a DiT step's host time).
    rows, start = idx.to(latents.device)[:, None], start.to(latents.device)
    frames = start[:, None] + torch.arange(WINDOW, device=latents.device)
    x0 = latents[rows, :, frames].permute(0, 2, 1, 3, 4)  # [count, WINDOW, 16, h, w] -> [count, 16, WINDOW, h, w]
    samples = (4 * hop * start.to(pool.audio.device))[:, None] + torch.arange(span, device=pool.audio.device)
    clips = pool.audio[rows.to(pool.audio.device), samples]
    return x0, idx, clips
