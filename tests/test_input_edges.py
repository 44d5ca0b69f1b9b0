"""Portraits and audio at the edges: high bit depths, tiny and huge images, silent, multichannel and odd-rate audio.

Loading is checked in-process for the exact tones; acceptance and rejection go through the installed console script.
An accepted input is shown by `animate` getting past the input checks to a --weights folder that does not exist
(exit 3), which it checks before importing torch.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avatarcli.media.audio import SAMPLE_RATE, is_silent, load_audio, write_wav
from avatarcli.media.image import MAX_PIXELS, MAX_SIDE, MIN_SIDE, load_portrait
from avatarcli.testing.console import CLI

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SILENT_LINE = "warning: the audio is silent: the portrait will not speak"


def cli(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def png_16bit(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit PNG written byte by byte: grey [H,W], grey+alpha [H,W,2], RGB [H,W,3] or RGBA [H,W,4]."""
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height but carries one row of data: reading its size needs no decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(width + 1)))
                     + chunk(b"IEND", b""))
    return path


def tiff_rgb_16bit(path: Path, pixels: np.ndarray) -> Path:
    """An uncompressed little-endian baseline TIFF, RGB with 16 bits per sample."""
    height, width, _ = pixels.shape
    data = pixels.astype("<u2").tobytes()
    entries = [  # tag, type (3 SHORT, 4 LONG), count, value
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, None), (259, 3, 1, 1), (262, 3, 1, 2),
        (273, 4, 1, None), (277, 3, 1, 3), (278, 4, 1, height), (279, 4, 1, len(data)), (284, 3, 1, 1),
    ]
    ifd_offset = 8
    bits_offset = ifd_offset + 2 + 12 * len(entries) + 4
    data_offset = bits_offset + 6
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = {258: bits_offset, 273: data_offset}.get(tag, value)
        field = struct.pack("<HI", value, 0)[:4] if kind == 3 and count == 1 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + field
    ifd += struct.pack("<I", 0)
    path.write_bytes(b"II*\0" + struct.pack("<I", ifd_offset) + ifd + struct.pack("<HHH", 16, 16, 16) + data)
    return path


# ---- high bit depth: the real tones, not white ---------------------------------------------------------------------

GREY, ALPHA = 0x4040, 0xFFFF  # 16448 / 257 = 64 in 8 bits
GREY_8 = round(GREY / 257)


def sixteen_bit_portraits(folder: Path) -> dict[str, Path]:
    size = (MIN_SIDE, MIN_SIDE + 16)
    grey = np.full(size, GREY, np.uint16)
    tiff = folder / "grey16.tif"
    Image.fromarray(grey).save(tiff)  # Pillow writes I;16 TIFF itself
    return {
        "grey": png_16bit(folder / "grey16.png", grey),
        "grey+alpha": png_16bit(folder / "la16.png", np.stack([grey, np.full(size, ALPHA, np.uint16)], -1)),
        "rgb": png_16bit(folder / "rgb16.png", np.stack([grey] * 3, -1)),
        "rgba": png_16bit(folder / "rgba16.png", np.stack([grey] * 3 + [np.full(size, ALPHA, np.uint16)], -1)),
        "tiff grey": tiff,
        "tiff rgb": tiff_rgb_16bit(folder / "rgb16.tif", np.stack([grey] * 3, -1)),
    }


@pytest.mark.parametrize("kind", ["grey", "grey+alpha", "rgb", "rgba", "tiff grey", "tiff rgb"])
def test_sixteen_bit_portraits_keep_their_tones(tmp_path, kind):
    image = load_portrait(sixteen_bit_portraits(tmp_path)[kind])
    assert image.mode == "RGB" and image.size == (MIN_SIDE + 16, MIN_SIDE)
    pixels = np.asarray(image).astype(int)
    assert np.abs(pixels - GREY_8).max() <= 1, (kind, pixels.min(), pixels.max())


def test_float_and_32_bit_grey_keep_their_tones(tmp_path):
    Image.fromarray(np.full((MIN_SIDE, MIN_SIDE), 0.25, np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.full((MIN_SIDE, MIN_SIDE), GREY, np.int32)).save(tmp_path / "i.tif")
    for name in ("f.tif", "i.tif"):
        assert np.abs(np.asarray(load_portrait(tmp_path / name)).astype(int) - GREY_8).max() <= 1, name


def test_sixteen_bit_grey_png_runs_through_the_cli(tmp_path):
    portrait = sixteen_bit_portraits(tmp_path)["grey"]
    nowhere = tmp_path / "no-weights"  # never created: the run stops right after the input checks
    result = cli("animate", portrait, "--audio", EXAMPLES / "speech.wav", "-o", tmp_path / "o.mp4", "--weights", nowhere)
    assert result.returncode == 3, result.stderr  # past the input checks, stopped at the missing weights
    assert "--weights folder" in result.stderr and "does not exist" in result.stderr


# ---- too small, very large, beyond the limit -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (MIN_SIDE - 1, 400)])
def test_a_portrait_below_the_minimum_exits_2_naming_it(tmp_path, size):
    portrait = tmp_path / "small.png"
    Image.new("RGB", size, (90, 90, 90)).save(portrait)
    result = cli("animate", portrait, "--audio", EXAMPLES / "speech.wav", "-o", tmp_path / "o.mp4")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and f"{size[0]}x{size[1]}" in line and f"at least {MIN_SIDE} pixels" in line


def test_a_very_large_portrait_is_downscaled_without_warnings(tmp_path, recwarn):
    big = tmp_path / "big.jpg"
    Image.new("RGB", (12000, 12000), (20, 160, 60)).save(big, quality=90)
    recwarn.clear()
    image = load_portrait(big)
    assert not recwarn.list
    assert max(image.size) == MAX_SIDE and np.abs(np.asarray(image)[5, 5].astype(int) - (20, 160, 60)).max() <= 3
    nowhere = tmp_path / "no-weights"  # never created: the run stops right after the input checks
    result = cli("animate", big, "--audio", EXAMPLES / "speech.wav", "-o", tmp_path / "o.mp4", "--weights", nowhere)
    assert result.returncode == 3, result.stderr
    assert "Warning" not in result.stderr and "DecompressionBomb" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_loading_a_large_portrait_raises_no_warning(tmp_path, recwarn):
    big = tmp_path / "big.png"
    Image.new("L", (10000, 9500), 128).save(big, compress_level=1)  # 95 MP: above Pillow's own warning limit
    recwarn.clear()
    image = load_portrait(big)
    assert not recwarn.list
    assert image.size == (MAX_SIDE, round(9500 * MAX_SIDE / 10000))


def test_a_portrait_beyond_the_limit_exits_2_stating_it(tmp_path):
    side = int(MAX_PIXELS**0.5) + 1024
    huge = tmp_path / "huge.png"
    png_header_only(huge, side, side)
    result = cli("animate", huge, "--audio", EXAMPLES / "speech.wav", "-o", tmp_path / "o.mp4")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and f"{side}x{side}" in line and f"{MAX_PIXELS // 1_000_000} megapixels" in line


# ---- audio ---------------------------------------------------------------------------------------------------------


def test_silent_audio_warns_once_and_is_accepted(tmp_path):
    audio = tmp_path / "silent.wav"
    write_wav(audio, np.zeros(SAMPLE_RATE))
    nowhere = tmp_path / "no-weights"  # never created: the run stops right after the input checks
    result = cli("animate", EXAMPLES / "portrait.png", "--audio", audio, "-o", tmp_path / "o.mp4", "--weights", nowhere)
    assert result.returncode == 3, result.stderr  # accepted: it stops only at the missing weights
    lines = result.stderr.strip().splitlines()
    assert lines.count(SILENT_LINE) == 1 and len(lines) == 2


def test_silence_is_below_speech_level_not_only_zeros():
    rng = np.random.default_rng(0)
    assert is_silent(np.zeros(SAMPLE_RATE, np.float32))
    assert is_silent(rng.normal(0, 0.0005, SAMPLE_RATE).astype(np.float32))  # faint hiss, about -66 dBFS
    quiet_word = np.zeros(5 * SAMPLE_RATE, np.float32)
    quiet_word[SAMPLE_RATE : SAMPLE_RATE + 4000] = 0.02 * np.sin(np.arange(4000) * 0.07)  # one soft word, -37 dBFS
    assert not is_silent(quiet_word)
    assert not is_silent(load_audio(EXAMPLES / "speech.wav"))


@pytest.mark.parametrize("channels,rate", [(6, 96000), (1, 8000)])
def test_multichannel_and_odd_rate_audio_is_accepted(tmp_path, channels, rate):
    seconds = 1.5
    t = np.arange(int(seconds * rate)) / rate
    voice = 0.3 * np.sin(2 * np.pi * 180 * t)
    audio = tmp_path / f"a{channels}x{rate}.wav"
    write_wav(audio, np.stack([voice] * channels, 1) if channels > 1 else voice, sample_rate=rate)
    samples = load_audio(audio)
    assert abs(len(samples) - seconds * SAMPLE_RATE) <= 2
    assert abs(np.sqrt(np.mean(samples**2)) - 0.3 / np.sqrt(2)) < 0.02  # down-mixed to the mean, not summed
    nowhere = tmp_path / "no-weights"  # never created: the run stops right after the input checks
    result = cli("animate", EXAMPLES / "portrait.png", "--audio", audio, "-o", tmp_path / "o.mp4", "--weights", nowhere)
    assert result.returncode == 3, result.stderr
    assert "--weights folder" in result.stderr and "silent" not in result.stderr


def test_unreadable_audio_exits_2(tmp_path):
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all\n" * 50)
    result = cli("animate", EXAMPLES / "portrait.png", "--audio", text, "-o", tmp_path / "o.mp4")
    assert result.returncode == 2
    assert re.fullmatch(r"error: cannot decode audio .*notes\.wav: .*", result.stderr.strip())
