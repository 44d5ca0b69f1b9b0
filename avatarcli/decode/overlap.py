"""Finished latent frames -> decoded frames -> the sink, either inline or overlapped with the denoising.

`animate` hands every chunk of final latent frames to one of two writers with the same interface:
  * `SerialWriter` decodes and writes it at once, on the caller's thread (the sampler waits for the VAE);
  * `OverlappedWriter` queues it (at most `max_pending` chunks) for a worker thread that decodes and writes while
    the caller's thread runs the next window-steps. On CUDA the worker decodes on its own stream, ordered after the
    kernels that produced the latents by an event, so the transformer's stream never waits for the VAE.
Both run the same per-chunk code in the same order (one decoder, one feature cache), so the frames are identical.

`drain()` returns once everything submitted is decoded and written: the point where the decoder's cache, the sink's
segments and `frames` agree, which is what a resume state must capture. A failure on the worker is raised on the
caller's thread by the next `submit`, `drain` or `close`, as the exception the worker met (so exit codes keep their
meaning); the queue, the error hand-over and the stopping are avatarcli/worker.py's.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from avatarcli.worker import Worker


class SerialWriter:
    """Decode each chunk and write its frames before returning: the reference behaviour.

    `frames_total`: frames of the output (later decoded frames are padding and dropped); `skip_frames`: leading
    frames of the video that are not output (dropped once, from the first chunk); `dtype`: the decoder's input dtype.
    """

    def __init__(self, decoder: Any, sink: Any, frames_total: int, skip_frames: int = 0,
                 dtype: torch.dtype | None = None, frames: int = 0) -> None:
        self.decoder, self.sink = decoder, sink
        self.frames_total, self.skip_frames, self.dtype = frames_total, skip_frames, dtype
        self.frames = frames  # frames written to the sink so far (a resumed run starts at its saved count)
        self.decode_seconds = 0.0  # time spent in the decoder
        self.write_seconds = 0.0  # time spent handing frames to the sink
        self.wait_seconds = 0.0  # time the caller's thread spent on decoding and writing (all of it, here)

    def _decode_and_write(self, latents: torch.Tensor | None) -> None:
        """Decode `latents` (None: the frames a paused decoder left pending) and write their frames."""
        if self.frames >= self.frames_total:
            return  # the padding frames of a video shorter than one window
        if latents is None and not getattr(self.decoder, "pending_frames", 0):
            return
        tick = time.perf_counter()
        skip = 0 if self.decoder.started else self.skip_frames  # leading frames only, once per video
        with torch.no_grad():
            if latents is None:
                pixels = self.decoder.flush()[skip:]
            else:
                pixels = self.decoder.push(latents if self.dtype is None else latents.to(self.dtype))[skip:]
        pixels = pixels[: self.frames_total - self.frames]
        tock = time.perf_counter()
        if len(pixels):  # a decoder paused by a stop may give none
            self.sink.write(pixels)
        self.decode_seconds += tock - tick
        self.write_seconds += time.perf_counter() - tock
        self.frames += len(pixels)

    def load_decoder_state(self, state: dict) -> None:
        self.decoder.load_state_dict(state)

    def submit(self, latents: torch.Tensor) -> None:
        tick = time.perf_counter()
        try:
            self._decode_and_write(latents)
        finally:
            self.wait_seconds += time.perf_counter() - tick

    def drain(self) -> None:
        return None

    def close(self) -> None:
        """Every frame decoded and written, the ones a stop left pending included."""
        self.submit(None)

    def abort(self) -> None:
        return None


class OverlappedWriter(SerialWriter):
    """The same per-chunk work on a worker thread (and, on CUDA, a stream of its own); see the module docstring.

    Memory stays bounded: `submit` blocks while `max_pending` chunks wait (that time counts as `wait_seconds`).
    """

    def __init__(self, decoder: Any, sink: Any, frames_total: int, skip_frames: int = 0,
                 dtype: torch.dtype | None = None, frames: int = 0, device: torch.device | str = "cpu",
                 max_pending: int = 2) -> None:
        super().__init__(decoder, sink, frames_total, skip_frames, dtype, frames)
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._worker = Worker(self._work, max_pending=max_pending, name="avatarcli-decode")

    def _work(self, item: tuple[torch.Tensor | None, Any]) -> None:
        latents, ready = item
        if self.stream is None:
            self._decode_and_write(latents)
            return
        with torch.cuda.stream(self.stream):
            if latents is not None:  # None: the frames a stop left pending, after every chunk submitted
                self.stream.wait_event(ready)  # the latents are written on the producer's stream
                latents.record_stream(self.stream)  # and must outlive this stream's use of them
            self._decode_and_write(latents)  # ends in a copy to the host: synchronous

    def load_decoder_state(self, state: dict) -> None:
        """Restore the decoder's cache with its tensors allocated on the worker's stream (before any submit)."""
        if self.stream is None:
            self.decoder.load_state_dict(state)
            return
        with torch.cuda.stream(self.stream):
            self.decoder.load_state_dict(state)
        self.stream.synchronize()

    def submit(self, latents: torch.Tensor | None) -> None:
        ready = None
        if self.stream is not None and latents is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        tick = time.perf_counter()
        self._worker.submit((latents, ready))  # blocks while max_pending chunks wait
        self.wait_seconds += time.perf_counter() - tick

    def drain(self) -> None:
        """Wait until every submitted chunk is decoded and written; raise the worker's error, if any."""
        tick = time.perf_counter()
        try:
            self._worker.drain()
        finally:
            self.wait_seconds += time.perf_counter() - tick

    def close(self) -> None:
        """Finish the submitted work (and the frames a stop left pending), then stop the worker."""
        tick = time.perf_counter()
        try:
            self._worker.submit((None, None))
            self._worker.close()
        finally:
            self.wait_seconds += time.perf_counter() - tick

    def abort(self) -> None:
        """Drop the chunks still waiting, let the one being decoded finish, stop the worker; errors are not raised."""
        self._worker.abort()
