"""Inputs: the portrait image and the speech audio, including every bad input a user can give."""

from __future__ import annotations

import subprocess
import sys
import types
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avatarcli.errors import AvatarError
from avatarcli.media.audio import ffmpeg_exe, load_audio, write_wav
from avatarcli.media.image import load_portrait

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
TONE_HZ = 440.0


def _close(pixel: tuple[int, ...], color: tuple[int, int, int], tolerance: int = 12) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, color))


def _tone(seconds: float, sample_rate: int, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return amplitude * np.sin(2 * np.pi * TONE_HZ * t)


def _dominant_hz(samples: np.ndarray, sample_rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / sample_rate)[np.argmax(spectrum)])


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture
def tone_wav(tmp_path: Path) -> Path:
    path = tmp_path / "tone.wav"
    write_wav(path, _tone(1.0, 16000), 16000)
    return path


# --- portrait ----------------------------------------------------------------------------------------------


def test_portrait_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = Image.new("RGB", (128, 64), BLUE)
    stored.paste(RED, (0, 0, 64, 64))  # red on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the camera was turned, display rotated 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    stored.save(path, quality=95, exif=exif)

    portrait = load_portrait(path)

    assert portrait.size == (64, 128)
    assert _close(portrait.getpixel((32, 16)), RED)  # left edge went to the top
    assert _close(portrait.getpixel((32, 112)), BLUE)


def test_portrait_alpha_is_flattened_onto_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (192, 64))  # three 64 px squares (the smallest portrait is 64 px)
    rgba.paste((0, 0, 0, 0), (0, 0, 64, 64))  # fully transparent black
    rgba.paste((255, 0, 0, 128), (64, 0, 128, 64))  # half-transparent red
    rgba.paste((0, 0, 255, 255), (128, 0, 192, 64))  # opaque blue
    path = tmp_path / "cutout.png"
    rgba.save(path)

    portrait = load_portrait(path)

    assert portrait.mode == "RGB"
    assert portrait.getpixel((0, 0)) == WHITE
    assert _close(portrait.getpixel((64, 0)), (255, 127, 127), tolerance=1)
    assert portrait.getpixel((128, 0)) == BLUE


def test_portrait_palette_transparency_is_flattened_onto_white(tmp_path: Path) -> None:
    palette = Image.new("P", (128, 64))
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    palette.paste(0, (0, 0, 64, 64))
    palette.paste(1, (64, 0, 128, 64))
    path = tmp_path / "palette.png"
    palette.save(path, transparency=0)

    portrait = load_portrait(path)

    assert portrait.getpixel((0, 0)) == WHITE
    assert portrait.getpixel((64, 0)) == (0, 255, 0)


def test_portrait_grayscale_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.new("L", (64, 64), 77).save(path)
    portrait = load_portrait(path)
    assert portrait.mode == "RGB"
    assert portrait.getpixel((0, 0)) == (77, 77, 77)


def test_portrait_falls_back_to_opencv_for_formats_pil_cannot_read(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "photo.exotic"
    path.write_bytes(b"not a format PIL knows")
    bgr = np.zeros((64, 96, 3), np.uint8)
    bgr[..., 0] = 200  # blue channel first, as OpenCV returns it
    fake_cv2 = types.SimpleNamespace(IMREAD_COLOR=1, imread=lambda name, flags: bgr if name == str(path) else None)
    monkeypatch.setitem(sys.modules, "cv2", fake_cv2)

    portrait = load_portrait(path)

    assert portrait.size == (96, 64)
    assert portrait.getpixel((0, 0)) == (0, 0, 200)


@pytest.mark.parametrize(
    "make_bad_input, problem",
    [
        (lambda d: d / "missing.png", "not found"),
        (lambda d: d, "folder"),
        (lambda d: _write(d / "corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\0garbage" * 20), "corrupt"),
        (lambda d: _write(d / "notes.txt", b"this is a text file, not a picture\n"), "corrupt"),
        (lambda d: _truncated_jpeg(d / "cut.jpg"), "corrupt"),
    ],
    ids=["missing", "directory", "corrupt-png", "text-file", "truncated-jpeg"],
)
def test_bad_portrait_raises_one_line_avatar_error(tmp_path: Path, monkeypatch, make_bad_input, problem) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # same answer whether or not OpenCV is installed
    path = make_bad_input(tmp_path)
    with pytest.raises(AvatarError) as raised:
        load_portrait(path)
    message = str(raised.value)
    assert problem in message
    assert str(path) in message
    assert "\n" not in message


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated_jpeg(path: Path) -> Path:
    Image.new("RGB", (64, 64), RED).save(path)
    path.write_bytes(path.read_bytes()[:200])
    return path


# --- audio -------------------------------------------------------------------------------------------------


def test_wav_is_resampled_to_16k_mono_float32(tmp_path: Path) -> None:
    path = tmp_path / "stereo44k.wav"
    write_wav(path, np.stack([_tone(1.0, 44100, 0.3), _tone(1.0, 44100, 0.1)], axis=1), 44100)

    samples = load_audio(path)

    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - 16000) <= 1
    assert abs(_dominant_hz(samples) - TONE_HZ) <= 2


def test_plain_16k_mono_wav_is_read_without_ffmpeg_and_equals_its_decode(tmp_path: Path, monkeypatch) -> None:
    import subprocess

    from avatarcli.media import audio

    path = tmp_path / "mono16k.wav"
    rng = np.random.default_rng(0)
    write_wav(path, np.clip(rng.normal(0.0, 0.4, 8000), -1, 1), 16000)  # every int16 code path, incl. extremes
    raw = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-ac", "1", "-ar", "16000", "-f", "f32le",
                          "pipe:1"], capture_output=True, check=True).stdout
    by_ffmpeg = np.frombuffer(raw, dtype="<f4")

    def no_ffmpeg():
        raise AssertionError("ffmpeg was used for a plain WAV")

    monkeypatch.setattr(audio, "ffmpeg_exe", no_ffmpeg)
    direct = load_audio(path)
    assert direct.dtype == np.float32 and np.array_equal(direct, by_ffmpeg)
    write_wav(tmp_path / "8k.wav", np.zeros(800), 8000)  # another rate still needs ffmpeg (resampling)
    with pytest.raises(AssertionError, match="ffmpeg was used"):
        load_audio(tmp_path / "8k.wav")


def test_stereo_is_down_mixed_to_the_channel_mean(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    write_wav(path, np.stack([_tone(0.5, 16000, 0.3), _tone(0.5, 16000, 0.1)], axis=1), 16000)
    assert np.abs(load_audio(path) - _tone(0.5, 16000, 0.2)).max() < 2e-4


def test_mp3_decodes(tmp_path: Path, tone_wav: Path) -> None:
    mp3 = tmp_path / "tone.mp3"
    _ffmpeg("-i", str(tone_wav), "-c:a", "libmp3lame", "-b:a", "64k", str(mp3))

    samples = load_audio(mp3)

    assert abs(len(samples) - 16000) < 1200  # mp3 frames are 1152 samples
    assert abs(_dominant_hz(samples) - TONE_HZ) <= 2


def test_audio_track_of_a_video_decodes(tmp_path: Path, tone_wav: Path) -> None:
    video = tmp_path / "talk.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25", "-i", str(tone_wav), "-t", "1",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(video))  # fmt: skip

    samples = load_audio(video)

    assert abs(len(samples) - 16000) < 1100  # aac frames are 1024 samples
    assert abs(_dominant_hz(samples) - TONE_HZ) <= 2


def test_load_audio_honours_the_requested_sample_rate(tone_wav: Path) -> None:
    assert abs(len(load_audio(tone_wav, sample_rate=8000)) - 8000) <= 1


def test_write_wav_is_16_bit_pcm_that_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "out.wav"
    original = _tone(0.5, 16000)
    write_wav(path, original, 16000)

    with wave.open(str(path)) as stored:
        assert (stored.getsampwidth(), stored.getnchannels(), stored.getframerate()) == (2, 1, 16000)
    assert np.abs(load_audio(path) - original).max() < 2 / 32767


def test_ffmpeg_exe_honours_imageio_ffmpeg_exe(tmp_path: Path, monkeypatch) -> None:
    alias = tmp_path / "my-ffmpeg"
    alias.symlink_to(ffmpeg_exe())
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(alias))
    assert ffmpeg_exe() == str(alias)


def _video_without_audio(path: Path) -> Path:
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25", "-t", "0.4", "-pix_fmt", "yuv420p", str(path))
    return path


def _empty_wav(path: Path) -> Path:
    write_wav(path, np.zeros(0, np.float32), 16000)
    return path


@pytest.mark.parametrize(
    "make_bad_input, problem",
    [
        (lambda d: d / "missing.wav", "not found"),
        (lambda d: d, "folder"),
        (lambda d: _write(d / "speech.txt", b"hello, this is a transcript, not audio\n"), "not an audio or video file"),
        (lambda d: _write(d / "zero-bytes.wav", b""), "not an audio or video file"),
        (lambda d: _empty_wav(d / "zero-length.wav"), "empty"),
        (lambda d: _video_without_audio(d / "silent-film.mp4"), "no audio track"),
    ],
    ids=["missing", "directory", "text-file", "zero-byte-file", "zero-length-wav", "video-without-audio"],
)
def test_bad_audio_raises_one_line_avatar_error(tmp_path: Path, make_bad_input, problem) -> None:
    path = make_bad_input(tmp_path)
    with pytest.raises(AvatarError) as raised:
        load_audio(path)
    message = str(raised.value)
    assert problem in message
    assert str(path) in message
    assert "\n" not in message
