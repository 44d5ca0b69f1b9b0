"""Speech input: any file ffmpeg can decode (wav, mp3, m4a, flac, ogg, or a video's audio track) as mono float32.

A mono 16-bit PCM WAV already at the wanted rate is read directly (the same samples ffmpeg would give, without a
subprocess and without needing ffmpeg at all); everything else goes through the bundled ffmpeg."""

from __future__ import annotations

import re
import subprocess
import wave
from pathlib import Path

import numpy as np

from avatarcli.errors import AvatarError, EnvironmentProblem
from avatarcli.limits import check_audio_seconds

SAMPLE_RATE = 16000  # wav2vec2's rate; StableAvatar's audio features are computed at 16 kHz


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary bundled with imageio-ffmpeg, or the one named by IMAGEIO_FFMPEG_EXE."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as error:
        raise EnvironmentProblem(f"ffmpeg not found ({error}); reinstall imageio-ffmpeg or set IMAGEIO_FFMPEG_EXE") from error


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, max_seconds: int | None = None) -> np.ndarray:
    """Decode the first audio stream of `path`, down-mixed to mono and resampled to `sample_rate`.

    Returns float32 samples in [-1, 1]. Raises AvatarError naming the file when it is missing, is not
    audio or video, has no audio track, holds no samples, or is longer than `max_seconds` (checked on the header
    before decoding where it states a length, and the decode stops just past the limit).
    """
    path = Path(path)
    if not path.exists():
        raise AvatarError(f"audio file not found: {path}; check the path")
    if path.is_dir():
        raise AvatarError(f"audio path is a folder, not a file: {path}")
    direct = _read_plain_wav(path, sample_rate, max_seconds)
    if direct is not None:
        return direct
    if max_seconds is not None:
        _check_stated_length(path, max_seconds)
    limit = ["-t", str(max_seconds + 1)] if max_seconds is not None else []
    # rematrix_maxval 1 makes ffmpeg's down-mix the channel mean (its default sums at -3 dB each), which is
    # what librosa.load(mono=True), used by the reference preprocessing, computes.
    command = [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error",
        "-i", str(path), "-map", "0:a:0", "-vn", "-rematrix_maxval", "1.0", "-ac", "1", "-ar", str(sample_rate),
        *limit, "-f", "f32le", "pipe:1",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0:
        raise AvatarError(f"cannot decode audio {path}: {_explain_ffmpeg_failure(result.stderr)}")
    samples = np.frombuffer(result.stdout, dtype="<f4").astype(np.float32)
    if samples.size == 0:
        raise AvatarError(f"audio {path} is empty (zero samples); give a file with speech in it")
    if max_seconds is not None:
        check_audio_seconds(samples.size / sample_rate, path)
    return samples


def _check_stated_length(path: Path, max_seconds: int) -> None:
    """The length the file's header states (ffmpeg reads it without decoding), against `max_seconds`."""
    command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)]  # no output: ffmpeg stops after the header
    stderr = subprocess.run(command, capture_output=True, check=False).stderr.decode("utf-8", errors="replace")
    stated = re.search(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)", stderr)
    if stated is not None:
        hours, minutes, seconds = stated.groups()
        check_audio_seconds(int(hours) * 3600 + int(minutes) * 60 + float(seconds), path)


def _read_plain_wav(path: Path, sample_rate: int, max_seconds: int | None = None) -> np.ndarray | None:
    """Samples of a mono 16-bit PCM WAV at `sample_rate` as ffmpeg converts them (x / 32768), else None."""
    try:
        with wave.open(str(path), "rb") as wav:
            if (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) != (1, 2, sample_rate):
                return None
            if max_seconds is not None:  # the header's length, before anything is read
                check_audio_seconds(wav.getnframes() / sample_rate, path)
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError, OSError):
        return None  # not a plain WAV (or a damaged one): ffmpeg decides and explains
    samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / np.float32(32768.0)
    if samples.size == 0:
        raise AvatarError(f"audio {path} is empty (zero samples); give a file with speech in it")
    return samples


SILENCE_DBFS = -50.0  # loudest 50 ms below this: no speech (quiet speech is around -40 dBFS, room noise -60)


def is_silent(samples: np.ndarray, sample_rate: int = SAMPLE_RATE, threshold_dbfs: float = SILENCE_DBFS) -> bool:
    """True when even the loudest 50 ms of `samples` is below speech level (all zeros, or faint noise)."""
    frame = max(1, sample_rate // 20)
    usable = len(samples) // frame * frame
    frames = samples[:usable].reshape(-1, frame) if usable else samples.reshape(1, -1)
    loudest = float(np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1)).max()) if frames.size else 0.0
    return loudest < 10.0 ** (threshold_dbfs / 20.0)


def _explain_ffmpeg_failure(stderr: bytes) -> str:
    text = stderr.decode("utf-8", errors="replace")
    if "matches no streams" in text:
        return "it has no audio track"
    if "Invalid data found" in text:
        return "not an audio or video file ffmpeg can read"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "ffmpeg failed without a message"


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write float samples in [-1, 1] (shape [n] or [n, channels]) as 16-bit PCM WAV."""
    samples = np.asarray(samples)
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    if samples.dtype != np.int16:
        samples = np.round(np.clip(samples.astype(np.float64), -1.0, 1.0) * 32767.0).astype(np.int16)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(int(sample_rate))
        out.writeframes(samples.astype("<i2").tobytes())
