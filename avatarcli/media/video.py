"""Video files through the bundled ffmpeg: what one is (`probe_video` -> `VideoInfo`) and its frames, one at a time.

`probe_video` reads the container header and counts the video packets with a stream copy (no decoding), so it is
fast even for long files; `iter_video_frames` decodes to RGB24 through a pipe and yields one HxWx3 uint8 frame at a
time. Both are torch-free. Attached pictures (cover art in audio files) are not video: a file whose only picture is
cover art is an audio file. `VideoInfo` is also what the eval reader (avatarcli/eval/video.py) reports, with only
the fields its header gives.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, fields
from functools import cached_property
from fractions import Fraction
from pathlib import Path

import numpy as np

from avatarcli.errors import AvatarError
from avatarcli.media.audio import SAMPLE_RATE, ffmpeg_exe, load_audio

# "V" (upper case) selects video streams that are not attached pictures.
_VIDEO_STREAM = "0:V:0"


@dataclass(frozen=True)
class VideoInfo:
    """What a video is: display size (after rotation metadata) and frame rate; from `probe_video` also its frame
    count, codecs and audio presence (None where a reader did not look, as the eval reader, which reads the header).

    `info["frames"]`, `info["audio_seconds"]`, ...: the same values by name, for callers that treat it as a record
    (fields and properties by their names, and "frames" for `frame_count`).
    """

    path: Path
    width: int
    height: int
    fps: float
    frame_count: int | None = None
    has_audio: bool | None = None
    video_codec: str | None = None  # e.g. "h264"
    audio_codec: str | None = None  # e.g. "aac"; None without audio
    audio_rate: int | None = None  # the audio track's sample rate in Hz

    @property
    def seconds(self) -> float:
        """Video duration from the frame count (0.0 when the frames were not counted)."""
        return self.frame_count / self.fps if self.frame_count and self.fps > 0 else 0.0

    @cached_property
    def audio_seconds(self) -> float:
        """Seconds of audio actually decodable (not the container's claim; 0.0 without audio). Decodes the track on
        first use."""
        if not self.has_audio:
            return 0.0
        rate = self.audio_rate or SAMPLE_RATE
        return len(load_audio(self.path, sample_rate=rate)) / rate

    def __getitem__(self, key: str):
        name = _RECORD_KEYS.get(key, key)
        if name not in _READABLE:
            raise KeyError(key)
        return getattr(self, name)


_RECORD_KEYS = {"frames": "frame_count"}  # record names that differ from the attribute names
_READABLE = frozenset(f.name for f in fields(VideoInfo)) | {"seconds", "audio_seconds"}


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise AvatarError(f"{what} not found: {path}; check the path")
    if path.is_dir():
        raise AvatarError(f"{what} path is a folder, not a file: {path}")


def _ffmpeg_reason(stderr: str) -> str:
    if "matches no streams" in stderr:
        return "it has no video stream"
    if "Invalid data found" in stderr or "moov atom not found" in stderr:
        return "not a video file ffmpeg can read"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else "ffmpeg failed without a message"


def _snap_fps(value: float) -> float:
    """ffmpeg prints rates rounded to 2 decimals; restore the NTSC rationals (24000/1001, 30000/1001, ...)."""
    for base in (24, 30, 48, 60, 120):
        ntsc = base * 1000 / 1001
        if abs(value - ntsc) < 0.006:
            return ntsc
    return float(Fraction(value).limit_denominator(1001))


def _parse_fps(stream_line: str) -> float:
    for unit in ("fps", "tbr"):
        match = re.search(r"(\d+(?:\.\d+)?)(k?) " + unit, stream_line)
        if match:
            value = float(match.group(1)) * (1000 if match.group(2) else 1)
            if value > 0:
                return _snap_fps(value)
    return 0.0


def probe_video(path: str | Path, what: str = "driving video") -> VideoInfo:
    """Size, fps, frame count, codecs and audio presence of `path`; AvatarError naming it (as `what`) when it holds
    no readable video. The decodable audio length is read on demand (`VideoInfo.audio_seconds`)."""
    path = Path(path)
    _check_file(path, what)
    # One framecrc line per packet on stdout: the count every ffmpeg version gives (the "frame=" of the stats line is
    # missing for a stream copy in some, e.g. the 7.0 of imageio-ffmpeg 0.7).
    command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path), "-map", _VIDEO_STREAM, "-c", "copy",
               "-f", "framecrc", "-"]
    result = subprocess.run(command, capture_output=True, check=False)
    stderr = result.stderr.decode("utf-8", errors="replace")
    if result.returncode != 0:
        raise AvatarError(f"cannot read {what} {path}: {_ffmpeg_reason(stderr)}")
    header = stderr.split("Stream mapping:")[0]
    video_lines = [line for line in header.splitlines()
                   if re.search(r"Stream #0:\d+.*: Video:", line) and "attached pic" not in line]
    if not video_lines:
        raise AvatarError(f"cannot read {what} {path}: it has no video stream")
    stream = video_lines[0]
    size = re.search(r", (\d{1,5})x(\d{1,5})[ ,]", stream)
    if size is None:
        raise AvatarError(f"cannot read {what} {path}: ffmpeg reports no frame size")
    width, height = int(size.group(1)), int(size.group(2))
    # ffmpeg auto-rotates on decode; a quarter turn in the display matrix swaps the decoded width and height.
    rotation = re.search(r"rotation of (-?\d+(?:\.\d+)?) degrees", header[header.find(stream):])
    if rotation is not None and round(abs(float(rotation.group(1)))) % 180 == 90:
        width, height = height, width
    frame_count = sum(1 for line in result.stdout.splitlines() if line.strip() and not line.startswith(b"#"))
    if frame_count == 0:
        raise AvatarError(f"{what} {path} has no frames")
    fps = _parse_fps(stream)
    if fps <= 0:
        raise AvatarError(f"cannot tell the frame rate of {what} {path}; re-encode it at a constant rate")
    video_codec = re.search(r": Video: (\w+)", stream)
    audio = re.search(r"Stream #0:\d+.*: Audio: (\w+)(.*)", header)
    audio_rate = re.search(r", (\d+) Hz", audio.group(2)) if audio is not None else None
    return VideoInfo(path=path, width=width, height=height, fps=fps, frame_count=frame_count,
                     has_audio=audio is not None, video_codec=video_codec.group(1) if video_codec else None,
                     audio_codec=audio.group(1) if audio is not None else None,
                     audio_rate=int(audio_rate.group(1)) if audio_rate is not None else None)


def iter_video_frames(path: str | Path, info: VideoInfo | None = None) -> Iterator[np.ndarray]:
    """Decode the first video stream of `path` as HxWx3 uint8 RGB frames, one at a time, in display order.

    Every decoded frame is yielded once (no frame-rate conversion), so the count matches `probe_video`'s for
    constant-frame-rate files. The ffmpeg process is stopped when the iterator is closed early.
    """
    path = Path(path)
    info = info or probe_video(path)
    frame_bytes = info.width * info.height * 3
    command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path),
               "-map", _VIDEO_STREAM, "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    # stderr goes to a file: a damaged stream can log more than a pipe holds while we are blocked reading frames
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log)
        finished = False
        try:
            assert process.stdout is not None
            while True:
                frame = bytearray(frame_bytes)  # a fresh, writable buffer per frame
                if process.stdout.readinto(frame) < frame_bytes:
                    break
                yield np.frombuffer(frame, dtype=np.uint8).reshape(info.height, info.width, 3)
            finished = True
        finally:
            if not finished:
                process.kill()
            process.stdout.close()
            process.wait()
        if process.returncode != 0:
            log.seek(0)
            stderr = log.read().decode("utf-8", errors="replace")
            raise AvatarError(f"cannot decode driving video {path}: {_ffmpeg_reason(stderr)}")
