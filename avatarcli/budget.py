"""The GPU memory budget: how much a job may still allocate, and which decode mode and text-encoder placement fit.

The decisions are pure functions of byte counts, so they are tested without a GPU; `device_budget` is the one place
that asks CUDA. What a process may allocate is the device's free memory plus the blocks torch's caching allocator
holds unused, and never more than `torch.cuda.set_per_process_memory_fraction` allows (how the benchmark emulates a
smaller card; that cap covers the allocator only, not the ~0.5 GiB of the CUDA context a real card also holds).

The decode modes, cheapest in time first:
  * overlapped: full frames on a worker thread while the DiT continues (decode/overlap.py): the decode's memory
    comes on top of a window-step's;
  * inline: full frames between window-steps, in the memory the window-step has just released;
  * tiled RxC: inline, each latent frame decoded as R x C overlapping spatial tiles with their own causal caches and
    linearly blended (decode/tiles.py): the working memory of one tile instead of the whole frame's (the caches stay:
    about a quarter less at 480x832), within a stated tolerance of the full decode.

The estimates (elements per output pixel, per token) come from measurements of the real model sizes, so they are
stated with them; `fits` keeps a margin for what they miss (cuDNN workspaces, fragmentation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GIB = 1024**3

# The Wan2.1 VAE decoder (both drivers' full decoder), per output pixel, measured on the CPU with its published
# configuration in float32 at 64x112 and 128x224 (peak RSS of one later latent frame over the RSS before it, and
# StreamingDecoder.cache_bytes): the causal cache, the last 2 time steps of every causal conv, holds 2,364 elements
# (1.9 GB in bf16 at 480x832); one latent frame's working tensors (4 video frames through the full-resolution
# blocks) 2,500 to 2,700.
DECODE_CACHE_ELEMENTS_PER_PIXEL = 2400
DECODE_WORK_ELEMENTS_PER_PIXEL = 2600
# A DiT forward's largest transient per token of each batched branch: the FFN's hidden state twice (the linear's
# output and the activation's) and about eight model-width tensors (residual, float32 norms and modulation). For
# StableAvatar at 480x832 (3 branches of 32,760 tokens, bf16) that is 5.5 GiB, as the measured peak implies: 14.57 GiB
# with the decode overlapped (limits.py) less 4.4 GiB resident, the decode's 3.7 GiB and ~1 GiB for the pixels of a
# chunk (converted whole then; now frame by frame) leaves 5.4 GiB.
DIT_WIDTHS_PER_TOKEN = 8

TILE_OVERLAP_LATENT = 8  # latent pixels shared by neighbouring tiles (64 output pixels, as diffusers' tiling)
MIN_TILE_LATENT = 24  # no tile narrower than this (192 output pixels): the seams' share would grow
# (tiles along the longer side, along the shorter), tried in order: fewest tiles first
TILE_GRIDS = ((2, 1), (2, 2), (3, 2), (3, 3), (4, 3), (4, 4))

MARGIN = 1.15  # estimates are multiplied by this ...
RESERVE = GIB // 4  # ... and this much is kept free


@dataclass(frozen=True)
class DecodeMode:
    name: str  # "overlapped", "inline" or "tiled"
    tiles: tuple[int, int] = (1, 1)  # (rows, cols) of spatial tiles per latent frame

    @property
    def overlapped(self) -> bool:
        return self.name == "overlapped"

    def __str__(self) -> str:
        return f"tiled {self.tiles[0]}x{self.tiles[1]}" if self.name == "tiled" else self.name


def usable_bytes(free: int, total: int, fraction: float, reserved: int, allocated: int) -> int:
    """What this process can still allocate: the device's `free` bytes plus its allocator's unused `reserved` ones,
    at most `fraction` of `total` less what it has `allocated`."""
    available = free + max(reserved - allocated, 0)
    if fraction < 1.0:
        available = min(available, int(fraction * total) - allocated)
    return max(available, 0)


def device_budget(device: Any) -> int | None:
    """`usable_bytes` of a CUDA device now; None for a device without a budget to keep (the CPU)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    return usable_bytes(free, total, torch.cuda.get_per_process_memory_fraction(index),
                        torch.cuda.memory_reserved(index), torch.cuda.memory_allocated(index))


def fits(budget: int | None, need: int) -> bool:
    """Whether an estimated `need` fits `budget` with the margin; everything fits where there is no budget."""
    return budget is None or need * MARGIN + RESERVE <= budget


def tile_spans(length: int, parts: int, overlap: int = TILE_OVERLAP_LATENT) -> list[tuple[int, int]]:
    """`parts` equal [start, end) spans covering 0..length, neighbours sharing at least `overlap`."""
    if parts == 1:
        return [(0, length)]
    size = min(math.ceil((length + (parts - 1) * overlap) / parts), length)
    starts = [min(i * (size - overlap), length - size) for i in range(parts)]
    return [(start, start + size) for start in starts]


def decode_bytes(width: int, height: int, dtype_bytes: int, tiles: tuple[int, int] = (1, 1)) -> int:
    """The Wan VAE's decode memory at width x height: the causal caches of all tiles (their areas, overlaps counted
    twice) and the working tensors of the largest tile."""
    rows = tile_spans(height // 8, tiles[0])
    cols = tile_spans(width // 8, tiles[1])
    areas = [64 * (r1 - r0) * (c1 - c0) for r0, r1 in rows for c0, c1 in cols]
    return dtype_bytes * (DECODE_CACHE_ELEMENTS_PER_PIXEL * sum(areas) + DECODE_WORK_ELEMENTS_PER_PIXEL * max(areas))


def dit_forward_bytes(tokens: int, batch: int, dim: int, ffn_dim: int, dtype_bytes: int) -> int:
    """A DiT forward's transient memory: `batch` branches of `tokens` tokens (DIT_WIDTHS_PER_TOKEN)."""
    return batch * tokens * (2 * ffn_dim + DIT_WIDTHS_PER_TOKEN * dim) * dtype_bytes


def choose_branch_batch(budget: int | None, per_branch: int, branches: int) -> int | None:
    """How many guidance branches one forward may batch: all (None) when their transients (`per_branch` bytes each,
    `dit_forward_bytes` of one) fit `budget`, else the most that fit, at least 1. Forwards of fewer branches give the
    same velocities to rounding, for the same FLOPs in more, smaller kernels."""
    if fits(budget, branches * per_branch):
        return None
    return max((k for k in range(1, branches) if fits(budget, k * per_branch)), default=1)


def choose_decode_mode(budget: int | None, width: int, height: int, dtype_bytes: int, dit_bytes: int,
                       overlap: str = "auto", decoder: str = "full") -> DecodeMode:
    """The cheapest decode mode whose estimate fits `budget` (None: no budget, as on the CPU).

    `overlap`: "on" decodes beside the DiT whatever the budget, "off" never, "auto" when the decode fits beside a
    window-step (`dit_bytes`). Inline when the full frame fits, else the fewest tiles that fit (when none does, the
    tiling of the smallest estimate: more tiles add overlapping caches). `decoder` "tiny" (the TAEHV decoder, a small
    fraction of the Wan VAE's memory, untiled) is counted as nothing."""
    full = decode_bytes(width, height, dtype_bytes) if decoder == "full" else 0
    if overlap == "on" or (overlap == "auto" and fits(budget, dit_bytes + full)):
        return DecodeMode("overlapped")
    if decoder != "full" or fits(budget, full):
        return DecodeMode("inline")
    grids = [(long, short) if height >= width else (short, long) for long, short in TILE_GRIDS]
    grids = [grid for grid in grids if all(end - start >= MIN_TILE_LATENT for side, parts in
                                           ((height // 8, grid[0]), (width // 8, grid[1]))
                                           for start, end in tile_spans(side, parts))]
    for grid in grids:
        if fits(budget, decode_bytes(width, height, dtype_bytes, grid)):
            return DecodeMode("tiled", grid)
    if not grids:
        return DecodeMode("inline")
    return DecodeMode("tiled", min(grids, key=lambda grid: decode_bytes(width, height, dtype_bytes, grid)))


# The Wan2.1 VAE encoder's plain chunk loop (diffusers' AutoencoderKLWan._encode) of the 81-frame reference clip, per
# input pixel in float32: lower bounds from runs that ran out of memory at 480x832 on an H100 (bench_memory.py,
# 2026-12-07): 6.5 GiB above what was resident under an 8 GiB cap and 6.9 GiB under 12 GiB, each failing to allocate
# 0.86 GiB more; then, with the DiT moved off under the 12 GiB cap, 10.2 GiB above what stayed (an estimate of 5,400
# elements had let it try): at least 6,860 elements. The skipping path (features/image.py) checks its own extra.
ENCODE_WORK_ELEMENTS_PER_PIXEL = 7000
ENCODE_MEASURED_FRAMES = 81


def encode_bytes(width: int, height: int, dtype_bytes: int, frames: int = ENCODE_MEASURED_FRAMES) -> int:
    """The reference encode's working memory at width x height (ENCODE_WORK_ELEMENTS_PER_PIXEL), for a clip of
    `frames` frames: the encoder's activations are per chunk of 4 frames; the clip itself (3 values a pixel a frame)
    is what grows with it (a driving-video window has 201)."""
    elements = ENCODE_WORK_ELEMENTS_PER_PIXEL + 3 * (frames - ENCODE_MEASURED_FRAMES)
    return elements * width * height * dtype_bytes


@dataclass(frozen=True)
class EncodePlan:
    dit_to_host: bool  # the DiT leaves the GPU while the reference is encoded (and comes back after)
    tiled: bool  # the encode runs in spatial tiles (diffusers' tiled_encode): within a tolerance, not bit for bit
    retried: bool = False  # tiled after a whole encode ran out of memory

    def __str__(self) -> str:
        mode = "tiled after a whole encode ran out of memory" if self.retried else "tiled" if self.tiled else "whole"
        return mode + (", DiT on the host meanwhile" if self.dit_to_host else "")


def choose_encode_plan(budget: int | None, need: int, dit_bytes: int) -> EncodePlan:
    """How the reference encode (`need` bytes, encode_bytes) runs with `budget` bytes left: whole where it fits; whole
    with the DiT (`dit_bytes` on the GPU, 0 when it cannot move: offloaded or quantized) moved to the host for it
    where that makes room; else in spatial tiles (with the DiT moved too, if it can move)."""
    if fits(budget, need):
        return EncodePlan(False, False)
    if dit_bytes and fits(budget + dit_bytes, need):
        return EncodePlan(True, False)
    return EncodePlan(bool(dit_bytes), True)


def text_encoder_offloaded(budget: int | None, encoder_bytes: int, offload: str) -> bool:
    """Whether umT5 runs offloaded (its blocks streamed to the GPU one at a time): always with `--offload`, else when
    its weights (11.4 GB in bf16) do not fit beside what is loaded. It runs once per new prompt and is freed after."""
    return offload != "none" or not fits(budget, encoder_bytes)


# What an --audio run holds on the GPU besides the estimates above, for `doctor`'s forecast (GiB): the DiT and the
# other models resident beside the window-steps (4.4 GiB measured at 480x832, limits.py), what stays with
# `--offload group` (wav2vec2, the bf16 VAE, the DiT blocks in flight), the float32 CLIP ViT-H and VAE while the
# portrait is encoded, and umT5-XXL in bf16.
AUDIO_RESIDENT = round(4.4 * GIB)
AUDIO_RESIDENT_OFFLOADED = 1 * GIB
AUDIO_ENCODERS = round(2.9 * GIB)
UMT5_BYTES = round(10.6 * GIB)
AUDIO_WINDOW_LATENT_FRAMES, AUDIO_BRANCHES, AUDIO_DIM, AUDIO_FFN_DIM = 21, 3, 1536, 8960


@dataclass(frozen=True)
class MemoryPlan:
    offload: str  # "none" when the window-steps fit beside the resident DiT, else "group"
    decode: DecodeMode
    text_encoder_offloaded: bool
    fits: bool  # whether a window-step fits at all, with that offload


def audio_memory_plan(budget: int | None, width: int = 480, height: int = 832) -> MemoryPlan:
    """What an --audio run at width x height would choose with `budget` bytes free before anything loads (a
    forecast from the estimates above, for `doctor`; a run decides from the memory it finds)."""
    tokens = AUDIO_WINDOW_LATENT_FRAMES * (height // 16) * (width // 16)
    forward = dit_forward_bytes(tokens, AUDIO_BRANCHES, AUDIO_DIM, AUDIO_FFN_DIM, 2)
    offload = "none" if budget is None or fits(budget - AUDIO_RESIDENT, forward) else "group"
    resident = AUDIO_RESIDENT if offload == "none" else AUDIO_RESIDENT_OFFLOADED
    left = None if budget is None else budget - resident
    loaded = None if budget is None else budget - resident - AUDIO_ENCODERS
    decode = choose_decode_mode(left, width, height, 2, forward, "auto" if offload == "none" else "off")
    return MemoryPlan(offload, decode, text_encoder_offloaded(loaded, UMT5_BYTES, offload), fits(left, forward))
