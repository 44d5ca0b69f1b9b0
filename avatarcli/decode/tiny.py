"""Streaming decode with the tiny video decoder (TAEHV): a drop-in for `StreamingDecoder` (decode/stream.py).

Same contract: push the next normalised latent frames of one video, get its next uint8 frames (1 for the video's
first latent frame, 4 for every later one), any split into chunks giving the frames of one whole-video decode. The
carried state is one frame per MemBlock (see models/taehv.py), so memory does not grow with the video.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from avatarcli.decode.stream import video_to_uint8
from avatarcli.models.taehv import DecoderMemory, TAEHVDecoder


class TinyStreamingDecoder:
    """Decode successive chunks of one latent video with the TAEHV decoder, carrying its frame memory."""

    def __init__(self, decoder: TAEHVDecoder, latent_frames_per_call: int = 4) -> None:
        """`latent_frames_per_call` bounds the activation memory (all frames of a call go through each layer at
        once, 4 output frames per latent frame); any value gives the same frames."""
        if latent_frames_per_call < 1:
            raise ValueError("latent_frames_per_call must be >= 1")
        self.decoder = decoder
        self.latent_frames_per_call = latent_frames_per_call
        self.close()

    @property
    def latent_channels(self) -> int:
        return self.decoder.config.latent_channels

    @property
    def started(self) -> bool:
        """True once a latent frame has been decoded since construction or the last close()."""
        return self._memory is not None

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[0] != 1 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must have shape [1, {self.latent_channels}, F, h, w], got {list(latents.shape)}")

    @torch.no_grad()
    def push_video(self, latents: torch.Tensor) -> torch.Tensor:
        """The next latent frames [1, C, n, h, w] -> their frames [1, 3, frames, H, W] in [-1, 1]."""
        self._check_latents(latents)
        if latents.shape[2] == 0:
            return latents.new_zeros(1, 3, 0, 8 * latents.shape[3], 8 * latents.shape[4])
        weight = self.decoder.decoder[1].weight
        latents = latents.to(device=weight.device, dtype=weight.dtype)
        pieces = []
        for start in range(0, latents.shape[2], self.latent_frames_per_call):
            video, memory = self.decoder(latents[:, :, start : start + self.latent_frames_per_call], self._memory)
            if self._memory is None:
                video = video[:, :, self.decoder.config.frames_to_trim :]
            self._memory = memory
            pieces.append(video)
        return torch.cat(pieces, dim=2) * 2 - 1

    def push(self, latents: torch.Tensor) -> np.ndarray:
        """Decode the next normalised latent frames [1, C, n, h, w] -> uint8 frames [frames, H, W, 3]."""
        return video_to_uint8(self.push_video(latents))

    def decode(self, latent_chunks: Iterable[torch.Tensor]) -> Iterator[np.ndarray]:
        """Generator form of push(): yields the frames of each chunk, then forgets the video."""
        try:
            for chunk in latent_chunks:
                yield self.push(chunk)
        finally:
            self.close()

    def state_dict(self) -> dict:
        """The carried frame memory (on the CPU), None at the start of a video: where the stream stands, for resuming."""
        memory = None if self._memory is None else [entry.detach().to("cpu") for entry in self._memory]
        return {"memory": memory}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream saved by `state_dict()` (same decoder): the next push decodes exactly as it would have."""
        memory = state["memory"]
        device = self.decoder.decoder[1].weight.device
        self._memory = None if memory is None else [entry.to(device) for entry in memory]

    def close(self) -> None:
        """Drop the carried memory; the next push starts a new video."""
        self._memory: DecoderMemory | None = None
