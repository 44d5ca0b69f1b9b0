"""The mp4 sink: frames are encoded as they arrive (H.264 + the speech as AAC) and the file appears atomically.

ffmpeg writes to a hidden temporary file beside the output; only a clean close renames it to the output name,
so an interrupted or failed run never leaves a truncated video where the user expects a finished one.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from avatarcli.errors import AvatarError, EnvironmentProblem
from avatarcli.media.audio import ffmpeg_exe
from avatarcli.worker import Worker


def check_writable_output(path: str | Path) -> Path:
    """Fail fast, before any model work, when `path` cannot be written. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise AvatarError(f"output path {path} is a folder; give a file name such as {path / 'out.mp4'}")
    folder = path.parent
    if not folder.exists():
        raise AvatarError(f"output folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise AvatarError(f"output folder {folder} is not a folder; choose another output path")
    # os.access is unreliable (root, network mounts, ACLs): actually create a file there.
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".avatarcli-write-test-"):
            pass
    except OSError as error:
        raise AvatarError(
            f"cannot write to output folder {folder} ({error.strerror}); choose another output path"
        ) from error
    return path


def partial_path(path: Path) -> Path:
    """Where the video is written until it is complete."""
    return path.with_name(f".{path.stem}.partial.mp4")


class Mp4Sink:
    """Write uint8 RGB frames [n, H, W, 3] to an H.264 (yuv420p) mp4, muxing `audio_path` as AAC.

    The audio keeps its full length (no `-shortest`); the caller makes the frame count match it.
    Use as a context manager: a clean exit publishes the file, an exception or abort() deletes it.
    """

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        fps: float | Fraction,
        audio_path: str | Path | None = None,
        crf: int = 18,
        preset: str = "medium",
    ) -> None:
        if width % 2 or height % 2 or width <= 0 or height <= 0:
            raise ValueError(f"yuv420p needs a positive even frame size, got {width}x{height}")
        self.path = Path(path)
        self.width = width
        self.height = height
        self.fps = fps
        self.audio_path = None if audio_path is None else Path(audio_path)
        self.crf = crf
        self.preset = preset
        self.frames_written = 0
        self._writer: Any = None
        self._state = "new"

    def __enter__(self) -> Mp4Sink:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def open(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"sink for {self.path} was already opened")
        check_writable_output(self.path)
        if self.audio_path is not None and not self.audio_path.is_file():
            raise AvatarError(f"audio file not found: {self.audio_path}; check the path")
        import imageio_ffmpeg

        output_params = ["-crf", str(self.crf), "-preset", self.preset, "-movflags", "+faststart", "-f", "mp4"]
        self._writer = imageio_ffmpeg.write_frames(
            str(partial_path(self.path)),
            (self.width, self.height),
            fps=self.fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=None,  # None: imageio adds no -crf of its own; ours is in output_params
            output_params=output_params,
            audio_path=None if self.audio_path is None else str(self.audio_path),
            audio_codec="aac",
            macro_block_size=1,  # sizes are validated above; never let imageio rescale
            ffmpeg_log_level="error",
        )
        self._writer.send(None)  # starts ffmpeg
        self._state = "open"

    def write(self, frames: np.ndarray) -> None:
        """Append frames [n, H, W, 3] (or one frame [H, W, 3]) of dtype uint8."""
        if self._state != "open":
            raise RuntimeError(f"sink for {self.path} is {self._state}, not open")
        frames = _as_frame_batch(frames, self.width, self.height)
        try:
            for frame in frames:
                self._writer.send(np.ascontiguousarray(frame))
        except OSError as error:
            self.abort()
            first_line = str(error).splitlines()[0]
            raise EnvironmentProblem(f"video encoding failed while writing {self.path}: {first_line}") from error
        self.frames_written += len(frames)

    def close(self) -> None:
        """Finish encoding, check the file and move it to the output name. No-op after abort()."""
        if self._state != "open":
            return
        if self.frames_written == 0:
            self.abort()
            raise ValueError(f"no frames were written to {self.path}")
        self._stop_ffmpeg()
        partial = partial_path(self.path)
        problem = _unreadable_reason(partial)
        if problem is not None:
            partial.unlink(missing_ok=True)
            self._state = "aborted"
            raise EnvironmentProblem(f"video encoding failed for {self.path} ({problem}); check free disk space")
        os.replace(partial, self.path)
        self._state = "closed"

    def abort(self) -> None:
        """Stop ffmpeg and delete the partial file; nothing is left under the output name."""
        if self._state == "open":
            quiet = logging.getLogger("imageio_ffmpeg")  # its "no frames written" warning: the file goes anyway
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                self._stop_ffmpeg()
            finally:
                quiet.setLevel(level)
        partial_path(self.path).unlink(missing_ok=True)
        self._state = "aborted"

    def _stop_ffmpeg(self) -> None:
        # Closing the generator closes ffmpeg's stdin and waits for it to exit.
        writer, self._writer = self._writer, None
        writer.close()


class NullSink:
    """Same interface as Mp4Sink, but only counts frames (for timing the model without encoding)."""

    def __init__(
        self,
        path: str | Path | None = None,
        width: int | None = None,
        height: int | None = None,
        fps: float | Fraction | None = None,
        audio_path: str | Path | None = None,
        crf: int = 18,
        preset: str = "medium",
    ) -> None:
        self.path = None if path is None else Path(path)
        self.width = width
        self.height = height
        self.fps = fps
        self.frames_written = 0

    def __enter__(self) -> NullSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def open(self) -> None:
        return None

    def write(self, frames: np.ndarray) -> None:
        frames = _as_frame_batch(frames, self.width, self.height)
        self.frames_written += len(frames)

    def close(self) -> None:
        return None

    def abort(self) -> None:
        return None


def _as_frame_batch(frames: np.ndarray, width: int | None, height: int | None) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [n, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if width is not None and height is not None and frames.shape[1:3] != (height, width):
        raise ValueError(f"frames are {frames.shape[2]}x{frames.shape[1]}, the sink was opened for {width}x{height}")
    return frames


def _unreadable_reason(path: Path) -> str | None:
    """Remux the video stream to nowhere: fast (no decoding), and it fails on a truncated or missing file."""
    if not path.is_file() or path.stat().st_size == 0:
        return "ffmpeg produced no file"
    command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-i", str(path),
               "-map", "0:v:0", "-c", "copy", "-f", "null", "-"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0:
        lines = result.stderr.decode("utf-8", errors="replace").strip().splitlines()
        return lines[-1] if lines else f"ffmpeg exit status {result.returncode}"
    return None


class BackgroundSink:
    """Runs another sink's write() on a worker thread, so H.264 encoding overlaps generation.

    At most `max_pending` frame batches wait (memory stays bounded; write() blocks meanwhile); an error in the worker
    is raised by the next write(), drain() or close(), and then the wrapped sink is not closed (nothing is published).
    """

    def __init__(self, sink: Mp4Sink | NullSink, max_pending: int = 4) -> None:
        self.sink = sink
        self.max_pending = max_pending
        self._worker: Worker | None = None

    @property
    def frames_written(self) -> int:
        return self.sink.frames_written

    def open(self) -> None:
        self.sink.open()
        self._worker = Worker(self.sink.write, max_pending=self.max_pending, name="avatarcli-sink")

    def write(self, frames: np.ndarray) -> None:
        if self._worker is None:
            raise RuntimeError("the background sink is not open")
        self._worker.submit(np.ascontiguousarray(frames))

    def drain(self) -> None:
        """Wait until every written batch has reached the wrapped sink; raise the worker's error, if any."""
        if self._worker is not None:
            self._worker.drain()

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
        self.sink.close()

    def abort(self) -> None:
        """Drop the batches still waiting, stop the worker, then abort the wrapped sink."""
        if self._worker is not None:
            self._worker.abort()
        self.sink.abort()
