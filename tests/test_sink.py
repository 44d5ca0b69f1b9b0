"""The mp4 sink: H.264 + AAC, streamed frame by frame, and an output file that only appears when complete."""

from __future__ import annotations

from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from avatarcli.errors import AvatarError
from avatarcli.media.audio import write_wav
from avatarcli.media.video import probe_video
from avatarcli.sink.ffmpeg import BackgroundSink, Mp4Sink, NullSink, check_writable_output, partial_path

WIDTH, HEIGHT, FPS = 64, 48, 25
FAST = dict(preset="ultrafast")


def _speech_stand_in(path: Path, seconds: float) -> Path:
    t = np.arange(int(seconds * 16000)) / 16000
    write_wav(path, 0.3 * np.sin(2 * np.pi * 440 * t), 16000)
    return path


def _frames(count: int, color: tuple[int, int, int] = (200, 40, 90)) -> np.ndarray:
    return np.broadcast_to(np.array(color, np.uint8), (count, HEIGHT, WIDTH, 3)).copy()


def test_sink_writes_h264_and_aac_with_every_frame_and_the_full_audio(tmp_path: Path) -> None:
    audio = _speech_stand_in(tmp_path / "speech.wav", 1.6)
    out = tmp_path / "talk.mp4"

    with Mp4Sink(out, WIDTH, HEIGHT, FPS, audio_path=audio, **FAST) as sink:
        for _ in range(5):  # in pieces, the way decoded chunks arrive
            sink.write(_frames(8))

    info = probe_video(out)
    assert (info["frames"], info["fps"], info["width"], info["height"]) == (40, 25.0, WIDTH, HEIGHT)
    assert (info["video_codec"], info["audio_codec"]) == ("h264", "aac")
    assert info["audio_seconds"] == pytest.approx(1.6, abs=0.03)
    assert sink.frames_written == 40
    assert not partial_path(out).exists()


def test_audio_longer_than_the_video_is_not_cut(tmp_path: Path) -> None:
    audio = _speech_stand_in(tmp_path / "speech.wav", 1.6)
    out = tmp_path / "talk.mp4"
    with Mp4Sink(out, WIDTH, HEIGHT, FPS, audio_path=audio, **FAST) as sink:
        sink.write(_frames(10))
    assert probe_video(out)["audio_seconds"] == pytest.approx(1.6, abs=0.03)


def test_sink_without_audio_writes_a_silent_video(tmp_path: Path) -> None:
    out = tmp_path / "silent.mp4"
    with Mp4Sink(out, WIDTH, HEIGHT, FPS, **FAST) as sink:
        sink.write(_frames(3))
    info = probe_video(out)
    assert (info["frames"], info["audio_codec"], info["audio_seconds"]) == (3, None, 0.0)


def test_frames_keep_their_rgb_colors(tmp_path: Path) -> None:
    out = tmp_path / "color.mp4"
    with Mp4Sink(out, WIDTH, HEIGHT, FPS, crf=0, **FAST) as sink:
        sink.write(_frames(2, color=(220, 30, 60)))
    reader = imageio_ffmpeg.read_frames(str(out))
    reader.__next__()  # metadata
    first = np.frombuffer(next(reader), np.uint8).reshape(HEIGHT, WIDTH, 3)
    reader.close()
    assert np.abs(first.reshape(-1, 3).mean(axis=0) - (220, 30, 60)).max() < 4


def test_exception_mid_way_leaves_no_file(tmp_path: Path) -> None:
    audio = _speech_stand_in(tmp_path / "speech.wav", 1.0)
    out = tmp_path / "talk.mp4"
    with pytest.raises(KeyError):
        with Mp4Sink(out, WIDTH, HEIGHT, FPS, audio_path=audio, **FAST) as sink:
            sink.write(_frames(5))
            raise KeyError("sampler failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speech.wav"]


def test_abort_leaves_no_file_even_on_clean_exit(tmp_path: Path) -> None:
    out = tmp_path / "talk.mp4"
    with Mp4Sink(out, WIDTH, HEIGHT, FPS, **FAST) as sink:
        sink.write(_frames(5))
        sink.abort()
    assert list(tmp_path.iterdir()) == []


def test_wrong_frame_size_is_rejected_and_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "talk.mp4"
    with pytest.raises(ValueError, match="64x48"):
        with Mp4Sink(out, WIDTH, HEIGHT, FPS, **FAST) as sink:
            sink.write(np.zeros((1, 32, 32, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_odd_frame_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="even"):
        Mp4Sink("out.mp4", 63, 48, FPS)


def test_missing_audio_file_fails_before_encoding(tmp_path: Path) -> None:
    with pytest.raises(AvatarError, match="not found"):
        with Mp4Sink(tmp_path / "talk.mp4", WIDTH, HEIGHT, FPS, audio_path=tmp_path / "nope.wav"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_writable_output_passes_and_leaves_nothing_behind(tmp_path: Path) -> None:
    assert check_writable_output(tmp_path / "talk.mp4") == tmp_path / "talk.mp4"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "make_output, problem",
    [
        (lambda d: d / "no-such-folder" / "talk.mp4", "does not exist"),
        (lambda d: d, "is a folder"),
        (lambda d: _file(d / "plain-file") / "talk.mp4", "is not a folder"),
    ],
    ids=["missing-folder", "output-is-a-folder", "parent-is-a-file"],
)
def test_unwritable_output_raises_avatar_error(tmp_path: Path, make_output, problem) -> None:
    with pytest.raises(AvatarError, match=problem):
        check_writable_output(make_output(tmp_path))


def test_sink_checks_the_output_before_starting_ffmpeg(tmp_path: Path) -> None:
    with pytest.raises(AvatarError, match="does not exist"):
        with Mp4Sink(tmp_path / "missing" / "talk.mp4", WIDTH, HEIGHT, FPS):
            pass


def test_null_sink_counts_frames_and_writes_nothing(tmp_path: Path) -> None:
    with NullSink(tmp_path / "talk.mp4", WIDTH, HEIGHT, FPS) as sink:
        sink.write(_frames(4))
        sink.write(_frames(1)[0])
    assert sink.frames_written == 5
    assert list(tmp_path.iterdir()) == []


def test_probe_of_a_missing_video_raises_avatar_error(tmp_path: Path) -> None:
    with pytest.raises(AvatarError, match="not found"):
        probe_video(tmp_path / "nothing.mp4")


def _file(path: Path) -> Path:
    path.write_text("x")
    return path


def test_background_sink_writes_every_frame_in_order(tmp_path: Path) -> None:
    audio = _speech_stand_in(tmp_path / "speech.wav", 1.2)
    out = tmp_path / "talk.mp4"
    sink = BackgroundSink(Mp4Sink(out, WIDTH, HEIGHT, FPS, audio_path=audio, **FAST), max_pending=2)
    sink.open()
    colors = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    for color in colors:
        sink.write(_frames(10, color))
    sink.close()
    assert probe_video(out)["frames"] == 30 and sink.frames_written == 30
    frames = list(imageio_ffmpeg.read_frames(str(out)))[1:]
    means = [np.frombuffer(f, np.uint8).reshape(HEIGHT, WIDTH, 3).mean(axis=(0, 1)) for f in frames]
    assert [int(np.argmax(means[i])) for i in (0, 10, 20)] == [0, 1, 2]


def test_background_sink_raises_the_worker_error_and_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "talk.mp4"
    sink = BackgroundSink(Mp4Sink(out, WIDTH, HEIGHT, FPS, **FAST))
    sink.open()
    sink.write(np.zeros((1, 32, 32, 3), np.uint8))  # wrong size: fails on the worker thread
    with pytest.raises(ValueError, match="64x48"):
        sink.close()
    sink.abort()
    assert list(tmp_path.iterdir()) == []


def test_animate_into_a_memory_sink_gives_the_frames_the_file_sink_encodes(tmp_path: Path) -> None:
    """animate(sink=MemorySink()) (measuring in-process, no output file): the same frames as the mp4 path, checked by
    encoding them the same lossless way and comparing the decodes."""
    import torch

    from avatarcli.pipeline import AnimateJob, animate
    from avatarcli.presets import load_preset
    from avatarcli.sink.memory import MemorySink
    from avatarcli.testing import make_tiny_weights

    weights = make_tiny_weights(tmp_path / "w", model="stableavatar")
    preset = load_preset("balanced").with_overrides(size="64x64", steps=2, overlap=18)
    portrait = Path(__file__).resolve().parents[1] / "examples" / "portrait.png"
    job = AnimateJob(portrait=portrait, audio=_speech_stand_in(tmp_path / "a.wav", 1.2), output=tmp_path / "f.mp4",
                     preset=preset, weights=weights, device="cpu", crf=0, mux_audio=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        to_file = animate(job)
        memory = MemorySink()
        in_memory = animate(AnimateJob(**{**job.__dict__, "null_sink": True}), sink=memory)
        with pytest.raises(ValueError, match="null_sink"):
            animate(job, sink=MemorySink())
    finally:
        torch.set_num_threads(threads)
    frames = memory.frames()
    assert in_memory.output is None and frames.shape == (to_file.frames, 64, 64, 3) and memory.closed
    with Mp4Sink(tmp_path / "m.mp4", 64, 64, 25, crf=0) as sink:
        sink.write(frames)

    def decoded(path: Path) -> np.ndarray:
        reader = imageio_ffmpeg.read_frames(str(path))
        next(reader)
        return np.stack([np.frombuffer(f, np.uint8).reshape(64, 64, 3) for f in reader])

    assert np.array_equal(decoded(tmp_path / "m.mp4"), decoded(tmp_path / "f.mp4"))
