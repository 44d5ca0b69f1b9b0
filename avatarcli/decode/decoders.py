"""The streaming-decoder interface both video decoders implement, and the `--decoder full|tiny` choice.

    decoder = streaming_decoder(job.decoder, vae=vae, tiny_vae=tiny_vae)
    for final in sample_streaming(...):
        sink.write(decoder.push(final.latents))

Both take the normalised latents the DiT works in (the full Wan VAE de-normalises them itself) and give uint8
frames [frames, H, W, 3]: 1 for the first latent frame of a video, 4 for every later one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKLWan

    from avatarcli.models.taehv import TAEHVDecoder

DECODERS = ("full", "tiny")


class FrameDecoder(Protocol):
    @property
    def started(self) -> bool: ...

    def push(self, latents: torch.Tensor) -> np.ndarray: ...

    def decode(self, latent_chunks: Iterable[torch.Tensor]) -> Iterator[np.ndarray]: ...

    def close(self) -> None: ...


def streaming_decoder(kind: str, *, vae: AutoencoderKLWan | None = None,
                      tiny_vae: TAEHVDecoder | None = None) -> FrameDecoder:
    """"full": the Wan VAE's causal streaming decode; "tiny": the TAEHV decoder (FlashPortrait's fast path)."""
    if kind == "full":
        if vae is None:
            raise ValueError("the full decoder needs the Wan VAE")
        from avatarcli.decode.stream import StreamingDecoder

        return StreamingDecoder(vae, cache="auto")
    if kind == "tiny":
        if tiny_vae is None:
            raise ValueError("the tiny decoder needs the TAEHV decoder (fast_vae.pth)")
        from avatarcli.decode.tiny import TinyStreamingDecoder

        return TinyStreamingDecoder(tiny_vae)
    raise ValueError(f"unknown decoder {kind!r}; choose one of {', '.join(DECODERS)}")


def generation_decoder(kind: str, tiny_vae: TAEHVDecoder | None) -> FrameDecoder | None:
    """A driver's decoder for its Generation: the tiny decoder's stream for "tiny"; None for "full", whose stream the
    pipeline opens itself, sized to the memory left (pipeline.open_writer)."""
    return streaming_decoder("tiny", tiny_vae=tiny_vae) if kind == "tiny" else None
