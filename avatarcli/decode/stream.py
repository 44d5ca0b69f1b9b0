"""Streaming causal VAE decode: latent chunks in, uint8 RGB frames out, bit-identical to one `vae.decode`.

The Wan VAE decoder is causal in time and already decodes one latent frame at a time, carrying the last two
time steps of every causal conv in a feature cache. Decoding windows with separate `vae.decode` calls is NOT
the same (each call treats its first latent frame as the start of the video), so this class keeps one cache
alive across calls. That lets the sampler hand over finished latent frames and the sink write them to disk
without ever holding the whole video.

Resuming a stream needs the cache back, and there are two exact ways to get it; `state_dict()` takes the cheaper.
  * Store it: the last two time steps of every causal conv, up to full resolution. Small at small sizes (5 MB at
    64x64, 19 MB at 128x128 in float32), but 1.8 GB in bf16 at 480x832, too much to write at every save.
  * Replay: every causal conv sees a fixed number of past time steps (its temporal kernel minus one) and nothing
    else in the decoder carries state across frames (attention and norms are per frame), so the cache after latent
    frame t is a function of the latent frames t - R .. t only, R being at most the sum of those look-backs.
    Replaying the last R + 2 frames into an empty cache (the 2 cover the first-frame special case of the temporal
    upsamplers) rebuilds the cache exactly, bit for bit: the same operations on the same inputs. The frames are
    small (about 13 MB at 480x832) but the replay decodes up to R + 2 = 66 latent frames again, most of a short
    video's decode on the CPU.
The state always holds the frames; it holds the cache too when writing it takes less time than the replay would
(the decode time per frame is measured while the stream runs) and fits the budget of a save on Ctrl-C.

Where memory is short (avatarcli/budget.py), `tiles` decodes every latent frame as overlapping spatial tiles, each
with its own cache (decode/tiles.py): within a stated tolerance of the full decode, no longer bit-identical, and
resumed by replay only. Whatever the mode, each latent frame's pixels go to the host as uint8 as soon as they are
decoded, so a chunk's video is never held on the device in full.

A stop should not wait for a whole chunk to decode (21 latent frames take seconds on the CPU): with `interrupt` set,
`push` pauses between latent frames once `interrupt()` is true and keeps the rest (after post_quant_conv, as
computed for their chunk) as `pending`; the state holds them, and the next push (or `flush`) decodes them first.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from diffusers import AutoencoderKLWan

# Private module of diffusers: the causal-conv class and the decoder's (feat_cache, feat_idx, first_chunk)
# calling convention are internals, which is why pyproject pins diffusers <0.43.
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

# A save writes about this many bytes per second (torch.save and fsync on a local disk, conservatively), and the
# cache's share of a save may take at most this long (a save on Ctrl-C has to fit in the 2 s an interruption takes).
CACHE_BYTES_PER_SECOND = 400e6
CACHE_MAX_SECONDS = 0.25


def denormalise_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Undo the per-channel latent normalisation, written as diffusers' Wan pipelines write it.

    `z / (1/std) + mean` rather than `z * std + mean`: the two round differently in float32, and decoding
    must match the pipelines bit for bit.
    """
    config = vae.config
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    shape = (1, config.z_dim, 1, 1, 1)
    mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
    return latents / inverse_std + mean


def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """[1, 3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8, rounding as diffusers' VideoProcessor does."""
    frames = video[0].permute(1, 2, 3, 0)
    unit = (frames * 0.5 + 0.5).clamp(0, 1).float()
    return (unit * 255).round().to(torch.uint8).cpu().numpy()


def _check_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> None:
    expected = f"[1, {vae.config.z_dim}, F, h, w]"
    if latents.ndim != 5 or latents.shape[0] != 1 or latents.shape[1] != vae.config.z_dim:
        raise ValueError(f"latents must have shape {expected}, got {list(latents.shape)}")


@torch.no_grad()
def decode_all(vae: AutoencoderKLWan, latents: torch.Tensor) -> np.ndarray:
    """Decode a whole normalised latent video at once with `vae.decode` (the reference the stream must match)."""
    _check_latents(vae, latents)
    video = vae.decode(denormalise_latents(vae, latents)).sample
    return video_to_uint8(video)


class StreamingDecoder:
    """Decode successive chunks of one latent video with one causal feature cache carried across chunks.

    The first latent frame of the video gives 1 frame, every later latent frame gives 4
    (`vae.config.scale_factor_temporal`). The cache lives in this object, not in the VAE, so encoding or
    decoding other things with the same VAE between pushes does not disturb the stream. Every latent frame is
    decoded at full size, or as `tiles` (rows, cols) spatial tiles (module docstring).
    """

    def __init__(self, vae: AutoencoderKLWan, cache: str = "replay", tiles: tuple[int, int] = (1, 1)) -> None:
        """`cache`: what `state_dict()` keeps to rebuild the causal cache: "replay" (the last frames only) or "auto"
        (the cache too, when that is cheaper; module docstring)."""
        if cache not in ("replay", "auto"):
            raise ValueError(f"cache must be 'replay' or 'auto', got {cache!r}")
        self.vae, self.cache, self.tiles = vae, cache, tuple(tiles)
        self.interrupt = None  # () -> bool: pause a push between latent frames (a stop was asked for)
        convs = [module for module in vae.decoder.modules() if isinstance(module, WanCausalConv3d)]
        self._cache_size = len(convs)
        # Latent frames of history the cache depends on (an upper bound: every look-back counted at the latent rate,
        # though after the temporal upsamplers a time step is a half or a quarter of a latent frame), plus 2.
        self.replay_frames = sum(conv.kernel_size[0] - 1 for conv in convs) + 2
        self.close()

    @property
    def started(self) -> bool:
        """True once a latent frame has been decoded since construction or the last close()."""
        return self._pushed > 0

    @torch.no_grad()
    def push(self, latents: torch.Tensor) -> np.ndarray:
        """Decode the next normalised latent frames [1, 16, n, h, w] -> uint8 frames [frames, H, W, 3]."""
        _check_latents(self.vae, latents)
        # post_quant_conv is a 1x1x1 conv: no temporal context, safe to run per chunk. (vae.decode runs it on
        # the whole video; backends give the same floats for a chunk except on toy sizes of a few voxels.)
        return self._decode(self.vae.post_quant_conv(denormalise_latents(self.vae, latents)), pause=True)

    @torch.no_grad()
    def flush(self) -> np.ndarray:
        """Decode the frames a paused push left pending (none: no frames)."""
        return self._decode(None, pause=False)

    @property
    def pending_frames(self) -> int:
        return 0 if self._pending is None else self._pending.shape[2]

    def _decode(self, hidden: torch.Tensor | None, pause: bool) -> np.ndarray:
        """The pending latent frames, then `hidden`'s, through the decoder; with `pause`, stops before a frame once
        `interrupt()` says so, keeping the rest pending."""
        tick, pause = time.perf_counter(), pause and self.interrupt is not None
        parts = [part for part in (self._pending, hidden) if part is not None]
        if not parts:
            return np.zeros((0, 0, 0, 3), np.uint8)
        hidden = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        self._pending, pieces = None, []
        for index in range(hidden.shape[2]):
            if pause and self.interrupt():
                self._pending = hidden[:, :, index:]
                break
            pieces.append(self._to_uint8(self._decode_frame(hidden[:, :, index : index + 1])))
        if not pieces:
            scale = self.vae.config.scale_factor_spatial
            return np.zeros((0, hidden.shape[3] * scale, hidden.shape[4] * scale, 3), np.uint8)
        frames = np.concatenate(pieces)
        self._timed = (self._timed[0] + time.perf_counter() - tick, self._timed[1] + len(pieces))
        return frames

    def _to_uint8(self, video: torch.Tensor) -> np.ndarray:
        """One latent frame's decoded video -> uint8 frames on the host (a copy: its time is the decode's). Every
        step is per pixel, so frame by frame gives what the whole chunk at once would."""
        if self.vae.config.patch_size is not None:
            video = unpatchify(video, patch_size=self.vae.config.patch_size)
        return video_to_uint8(video.clamp(-1.0, 1.0))

    def _decode_frame(self, hidden: torch.Tensor) -> torch.Tensor:
        """One latent frame (after post_quant_conv) through the decoder, advancing the cache; remembered for replay
        (a view of its chunk, which nothing writes to afterwards)."""
        if self.tiles != (1, 1):
            if self._tiled is None:  # the tile layout needs the frame size
                from avatarcli.decode.tiles import TiledFrames

                self._tiled = TiledFrames(self.vae.decoder, self._cache_size, self.tiles, hidden.shape[3],
                                          hidden.shape[4], self.vae.config.scale_factor_spatial)
            video = self._tiled(hidden, first_chunk=not self.started)
        else:
            video = self.vae.decoder(hidden, feat_cache=self._feat_cache, feat_idx=[0],
                                     first_chunk=not self.started)
        self._recent.append(hidden)
        self._pushed += 1
        return video

    def decode(self, latent_chunks: Iterable[torch.Tensor]) -> Iterator[np.ndarray]:
        """Generator form of push(): yields the frames of each chunk, then clears the cache."""
        try:
            for chunk in latent_chunks:
                yield self.push(chunk)
        finally:
            self.close()

    def state_dict(self) -> dict:
        """Where the stream stands, for resuming it: the last `replay_frames` latent frames it decoded (after
        post_quant_conv, on the CPU), and the causal cache itself when that is cheaper than replaying the frames
        (module docstring)."""
        replay = torch.cat(list(self._recent), dim=2).to("cpu") if self._recent else None
        cache = None
        if self.keeps_cache():
            cache = [entry.detach().to("cpu", copy=True) if isinstance(entry, torch.Tensor) else entry
                     for entry in self._feat_cache]
        pending = None if self._pending is None else self._pending.to("cpu", copy=True)
        return {"replay": replay, "pushed": self._pushed, "replay_frames": self.replay_frames, "cache": cache,
                "pending": pending}

    def cache_bytes(self) -> int:
        caches = self._tiled.caches if self._tiled is not None else [self._feat_cache]
        tensors = [entry for cache in caches for entry in cache if isinstance(entry, torch.Tensor)]
        return sum(entry.numel() * entry.element_size() for entry in tensors)

    def replay_seconds(self) -> float:
        """What a replay of the saved frames would take, at the decode speed measured so far (inf: none measured)."""
        seconds, frames = self._timed
        return min(self._pushed, self.replay_frames) * (seconds / frames) if frames else float("inf")

    def keeps_cache(self) -> bool:
        """Whether `state_dict()` stores the cache ("auto", untiled): writing it is quicker than a replay, and than a
        save's budget."""
        writing = self.cache_bytes() / CACHE_BYTES_PER_SECOND
        return (self.cache == "auto" and self.tiles == (1, 1) and self.started and writing <= CACHE_MAX_SECONDS
                and writing < self.replay_seconds())

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Continue the stream saved by `state_dict()` (same VAE): the next push decodes exactly as it would have."""
        self.close()
        replay, pushed = state["replay"], int(state["pushed"])
        frames = 0 if replay is None else replay.shape[2]
        if int(state["replay_frames"]) != self.replay_frames or frames != min(pushed, self.replay_frames):
            raise ValueError(f"decoder state replays {frames} of {pushed} frames with a horizon of "
                             f"{state['replay_frames']}; this VAE needs the last {self.replay_frames}")
        pending = state.get("pending")
        self._pending = None if pending is None else pending.to(device=self.vae.device, dtype=self.vae.dtype)
        if replay is None:
            return
        replay = replay.to(device=self.vae.device, dtype=self.vae.dtype)
        cache = state.get("cache")
        if cache is not None and len(cache) != self._cache_size:
            raise ValueError(f"decoder state has {len(cache)} cached convolutions; this VAE has {self._cache_size}")
        if cache is None or self.tiles != (1, 1):  # a tiled stream's caches are rebuilt by the replay
            for index in range(frames):  # the outputs were written before the save: only the cache is wanted
                self._decode_frame(replay[:, :, index : index + 1])
        else:
            self._feat_cache = [entry.to(self.vae.device) if isinstance(entry, torch.Tensor) else entry
                                for entry in cache]
            self._recent.extend(replay[:, :, index : index + 1] for index in range(frames))
        self._pushed = pushed

    def close(self) -> None:
        """Drop the feature cache; the next push starts a new video."""
        self._feat_cache: list[torch.Tensor | str | None] = [None] * self._cache_size
        self._tiled = None  # decode/tiles.py TiledFrames: the tiles' caches, when decoding in tiles
        self._recent: deque[torch.Tensor] = deque(maxlen=self.replay_frames)
        self._pushed = 0  # latent frames decoded since the video started
        self._pending: torch.Tensor | None = None  # latent frames (after post_quant_conv) a paused push left
        self._timed = getattr(self, "_timed", (0.0, 0))  # seconds and latent frames of the pushes (kept across videos)
