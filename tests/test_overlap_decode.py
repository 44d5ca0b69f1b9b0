"""Decoding overlapped with denoising: the worker writes exactly the frames of the inline path, stops where it is
told, and hands its failures to the caller as the exceptions it met."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from avatarcli.decode.overlap import OverlappedWriter, SerialWriter
from avatarcli.decode.stream import StreamingDecoder
from avatarcli.errors import EnvironmentProblem

CHUNKS = [1, 2, 1, 3]  # latent frames per chunk, as the sampler hands them over
FRAMES_TOTAL = 22  # 1 + 4 * 6 = 25 decoded frames, 1 skipped: the last 2 are padding and must not be written


class RecordingSink:
    def __init__(self, fail_on_write: int | None = None) -> None:
        self.batches: list[np.ndarray] = []
        self.fail_on_write = fail_on_write
        self.threads: set[str] = set()

    def write(self, frames: np.ndarray) -> None:
        self.threads.add(threading.current_thread().name)
        if self.fail_on_write is not None and len(self.batches) == self.fail_on_write:
            raise EnvironmentProblem("disk full")
        self.batches.append(np.array(frames))


@pytest.fixture(scope="module")
def vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


@pytest.fixture(scope="module")
def chunks() -> list[torch.Tensor]:
    latents = torch.randn(1, 16, sum(CHUNKS), 4, 6, generator=torch.Generator().manual_seed(1))
    return list(latents.split(CHUNKS, dim=2))


def run(writer, chunks) -> None:
    for chunk in chunks:
        writer.submit(chunk)
    writer.close()


@pytest.fixture(scope="module")
def inline_frames(vae, chunks) -> np.ndarray:
    sink = RecordingSink()
    writer = SerialWriter(StreamingDecoder(vae), sink, FRAMES_TOTAL, skip_frames=1)
    run(writer, chunks)
    assert writer.frames == FRAMES_TOTAL
    return np.concatenate(sink.batches)


def test_the_worker_writes_the_inline_frames_bit_for_bit_on_its_own_thread(vae, chunks, inline_frames):
    sink = RecordingSink()
    writer = OverlappedWriter(StreamingDecoder(vae), sink, FRAMES_TOTAL, skip_frames=1, max_pending=1)
    run(writer, chunks)
    assert sink.threads == {"avatarcli-decode"}
    assert writer.frames == len(inline_frames) == FRAMES_TOTAL  # skipped frame and padding dropped
    assert np.array_equal(np.concatenate(sink.batches), inline_frames)
    assert not any(t.name == "avatarcli-decode" for t in threading.enumerate())


def test_drain_is_a_consistent_point_to_save_and_resume_from(vae, chunks, inline_frames):
    """After drain() the frame count, the sink and the decoder's cache describe the same moment, so a new writer
    started from them (as --resume does) continues with the same frames."""
    first, second = RecordingSink(), RecordingSink()
    decoder = StreamingDecoder(vae)
    writer = OverlappedWriter(decoder, first, FRAMES_TOTAL, skip_frames=1)
    for chunk in chunks[:2]:
        writer.submit(chunk)
    writer.drain()
    saved_frames, saved_cache = writer.frames, decoder.state_dict()
    assert saved_frames == sum(len(b) for b in first.batches) == 8  # 1 + 4 * 2 frames, minus the skipped one
    writer.abort()

    resumed = OverlappedWriter(StreamingDecoder(vae), second, FRAMES_TOTAL, skip_frames=1, frames=saved_frames)
    resumed.load_decoder_state(saved_cache)
    run(resumed, chunks[2:])
    assert np.array_equal(np.concatenate(first.batches + second.batches), inline_frames)


def test_a_worker_failure_is_raised_on_the_caller_thread_as_itself_and_stops_writing(vae, chunks):
    sink = RecordingSink(fail_on_write=1)
    writer = OverlappedWriter(StreamingDecoder(vae), sink, FRAMES_TOTAL)
    with pytest.raises(EnvironmentProblem, match="disk full"):
        for chunk in chunks:
            writer.submit(chunk)
        writer.drain()
    writer.abort()
    assert len(sink.batches) == 1  # nothing after the failed chunk reached the sink
    with pytest.raises(RuntimeError, match="stopped"):
        writer.submit(chunks[0])


def test_abort_drops_waiting_chunks_and_stops_the_worker(vae, chunks):
    gate = threading.Event()

    class SlowSink(RecordingSink):
        def write(self, frames):
            gate.wait(10)
            super().write(frames)

    sink = SlowSink()
    writer = OverlappedWriter(StreamingDecoder(vae), sink, FRAMES_TOTAL, max_pending=3)
    for chunk in chunks:
        writer.submit(chunk)  # the first is being written (held at the gate), the rest wait in the queue
    aborter = threading.Thread(target=writer.abort)
    aborter.start()
    gate.set()
    aborter.join(10)
    assert not aborter.is_alive() and len(sink.batches) < len(chunks)
    assert not any(t.name == "avatarcli-decode" for t in threading.enumerate())
