"""Driving video input: any file the bundled ffmpeg can decode, read frame by frame (never whole into memory).

`probe_video` reads the container header and counts the video packets with a stream copy (no decoding), so it is
fast even for long files; `iter_video_frames` decodes to RGB24 through a pipe and yields one HxWx3 uint8 frame at a
time. Both are torch-free. Attached pictures (cover art in audio files) are not video: a file whose only picture is
cover art is an audio file.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from avatarcli.errors import AvatarError
from avatarcli.media.audio import ffmpeg_exe

# "V" (upper case) selects video streams that are not attached pictures.
_VIDEO_STREAM = "0:V:0"


@dataclass(frozen=True)
class VideoInfo:
    """What a driving video is: display size (after rotation metadata), frame rate, frame count, audio presence."""

    path: Path
    width: int
    height: int
    fps: float
    frame_count: int
    has_audio: bool

    @property
    def seconds(self) -> float:
        return self.frame_count / self.fps if self.fps > 0 else 0.0


def _check_file(path: Path) -> None:
    if not path.exists():
        raise AvatarError(f"driving video not found: {path}; check the path")
    if path.is_dir():
        raise AvatarError(f"driving video path is a folder, not a file: {path}")


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


def probe_video(path: str | Path) -> VideoInfo:
    """Size, fps, frame count and audio presence of `path`; AvatarError naming it when it holds no readable video."""
    path = Path(path)
    _check_file(path)
    command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path), "-map", _VIDEO_STREAM, "-c", "copy",
               "-f", "null", "-"]
    result = subprocess.run(command, capture_output=True, check=False)
    stderr = result.stderr.decode("utf-8", errors="replace")
    if result.returncode != 0:
        raise AvatarError(f"cannot read driving video {path}: {_ffmpeg_reason(stderr)}")
    header = stderr.split("Stream mapping:")[0]
    video_lines = [line for line in header.splitlines()
                   if re.search(r"Stream #0:\d+.*: Video:", line) and "attached pic" not in line]
    if not video_lines:
        raise AvatarError(f"cannot read driving video {path}: it has no video stream")
    stream = video_lines[0]
    size = re.search(r", (\d{1,5})x(\d{1,5})[ ,]", stream)
    if size is None:
        raise AvatarError(f"cannot read driving video {path}: ffmpeg reports no frame size")
    width, height = int(size.group(1)), int(size.group(2))
    # ffmpeg auto-rotates on decode; a quarter turn in the display matrix swaps the decoded width and height.
    rotation = re.search(r"rotation of (-?\d+(?:\.\d+)?) degrees", header[header.find(stream):])
    if rotation is not None and round(abs(float(rotation.group(1)))) % 180 == 90:
        width, height = height, width
    counts = re.findall(r"frame=\s*(\d+)", stderr)
    frame_count = int(counts[-1]) if counts else 0
    if frame_count == 0:
        raise AvatarError(f"driving video {path} has no frames")
    fps = _parse_fps(stream)
    if fps <= 0:
        raise AvatarError(f"cannot tell the frame rate of driving video {path}; re-encode it at a constant rate")
    has_audio = re.search(r"Stream #0:\d+.*: Audio:", header) is not None
    return VideoInfo(path=path, width=width, height=height, fps=fps, frame_count=frame_count, has_audio=has_audio)


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
