"""Streaming causal VAE decode: latent chunks in, uint8 RGB frames out, bit-identical to one `vae.decode`.

The Wan VAE decoder is causal in time and already decodes one latent frame at a time, carrying the last two
time steps of every causal conv in a feature cache. Decoding windows with separate `vae.decode` calls is NOT
the same (each call treats its first latent frame as the start of the video), so this class keeps one cache
alive across calls. That lets the sampler hand over finished latent frames and the sink write them to disk
without ever holding the whole video.

Resuming a stream does not need the cache itself (1.8 GB in bf16 at 480x832: the last two time steps of every
causal conv, up to full resolution). Every causal conv sees a fixed number of past time steps (its temporal kernel
minus one) and nothing else in the decoder carries state across frames (attention and norms are per frame), so
the cache after latent frame t is a function of the latent frames t - R .. t only, R being at most the sum of
those look-backs. Replaying the last R + 2 frames into an empty cache (the 2 cover the first-frame special case of
the temporal upsamplers) therefore rebuilds the cache exactly, bit for bit: the same operations on the same inputs.
`state_dict()` keeps those frames (about 13 MB at 480x832) instead of the cache.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from diffusers import AutoencoderKLWan

# Private module of diffusers: the causal-conv class and the decoder's (feat_cache, feat_idx, first_chunk)
# calling convention are internals, which is why pyproject pins diffusers <0.43.
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify


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
    decoding other things with the same VAE between pushes does not disturb the stream. Spatial tiling
    is not used: every chunk is decoded at full size.
    """

    def __init__(self, vae: AutoencoderKLWan) -> None:
        self.vae = vae
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
        hidden = self.vae.post_quant_conv(denormalise_latents(self.vae, latents))
        video = torch.cat([self._decode_frame(hidden[:, :, index : index + 1]) for index in range(hidden.shape[2])],
                          dim=2)
        if self.vae.config.patch_size is not None:
            video = unpatchify(video, patch_size=self.vae.config.patch_size)
        return video_to_uint8(video.clamp(-1.0, 1.0))

    def _decode_frame(self, hidden: torch.Tensor) -> torch.Tensor:
        """One latent frame (after post_quant_conv) through the decoder, advancing the cache; remembered for replay
        (a view of its chunk, which nothing writes to afterwards)."""
        video = self.vae.decoder(hidden, feat_cache=self._feat_cache, feat_idx=[0], first_chunk=not self.started)
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
        post_quant_conv, on the CPU), from which `load_state_dict` rebuilds the causal cache (module docstring)."""
        replay = torch.cat(list(self._recent), dim=2).to("cpu") if self._recent else None
        return {"replay": replay, "pushed": self._pushed, "replay_frames": self.replay_frames}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Continue the stream saved by `state_dict()` (same VAE): the next push decodes exactly as it would have."""
        self.close()
        replay, pushed = state["replay"], int(state["pushed"])
        frames = 0 if replay is None else replay.shape[2]
        if int(state["replay_frames"]) != self.replay_frames or frames != min(pushed, self.replay_frames):
            raise ValueError(f"decoder state replays {frames} of {pushed} frames with a horizon of "
                             f"{state['replay_frames']}; this VAE needs the last {self.replay_frames}")
        if replay is not None:
            replay = replay.to(device=self.vae.device, dtype=self.vae.dtype)
            for index in range(frames):  # the outputs were written before the save: only the cache is wanted
                self._decode_frame(replay[:, :, index : index + 1])
        self._pushed = pushed

    def close(self) -> None:
        """Drop the feature cache; the next push starts a new video."""
        self._feat_cache: list[torch.Tensor | str | None] = [None] * self._cache_size
        self._recent: deque[torch.Tensor] = deque(maxlen=self.replay_frames)
        self._pushed = 0  # latent frames decoded since the video started
