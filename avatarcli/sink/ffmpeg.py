"""The mp4 sink: frames are encoded as they arrive (H.264 + the speech as AAC) and the file appears atomically.

ffmpeg writes to a hidden temporary file beside the output; only a clean close renames it to the output name,
so an interrupted or failed run never leaves a truncated video where the user expects a finished one. ffmpeg runs
in a session of its own (a Ctrl-C at the terminal reaches avatarcli, which stops it) and its messages go to a
temporary file: a failure is one line naming the output ("no space left on device" for a full disk), ffmpeg's own
lines ride along as the error's cause (shown with --debug).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from avatarcli.errors import AvatarError, EnvironmentProblem, is_disk_full, no_space_left
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
    `name`: the file named in error messages (default `path`; a segment of a resumable run names the output).
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
        name: str | Path | None = None,
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
        self.name = Path(name) if name is not None else self.path
        self.frames_written = 0
        self._process: subprocess.Popen | None = None
        self._log: Any = None  # ffmpeg's stderr
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
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(self._command(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=self._log, start_new_session=True)
        self._state = "open"

    def _command(self) -> list[str]:
        """imageio-ffmpeg's `write_frames` command for these settings (rgb24 frames on stdin -> H.264 yuv420p)."""
        fps = self.fps if isinstance(self.fps, Fraction) else Fraction(self.fps).limit_denominator()
        command = [ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{self.width}x{self.height}",
                   "-pix_fmt", "rgb24", "-r", str(fps), "-i", "-"]
        command += ["-an"] if self.audio_path is None else ["-i", str(self.audio_path)]
        command += ["-vcodec", "libx264", "-pix_fmt", "yuv420p", "-v", "error", "-crf", str(self.crf), "-preset",
                    self.preset, "-movflags", "+faststart", "-f", "mp4"]
        if self.audio_path is not None:
            command += ["-acodec", "aac", "-map", "0:v:0", "-map", "1:a:0"]
        return [*command, str(partial_path(self.path))]

    def write(self, frames: np.ndarray) -> None:
        """Append frames [n, H, W, 3] (or one frame [H, W, 3]) of dtype uint8."""
        if self._state != "open":
            raise RuntimeError(f"sink for {self.path} is {self._state}, not open")
        frames = _as_frame_batch(frames, self.width, self.height)
        try:
            self._process.stdin.write(np.ascontiguousarray(frames).data)
        except OSError as error:  # ffmpeg has stopped: its messages say why
            _wait(self._process)
            problem = self._failure(error)
            self.abort()
            raise problem from problem.__cause__
        self.frames_written += len(frames)

    def close(self) -> None:
        """Finish encoding, check the file and move it to the output name. No-op after abort()."""
        if self._state != "open":
            return
        if self.frames_written == 0:
            self.abort()
            raise ValueError(f"no frames were written to {self.path}")
        try:
            self._process.stdin.close()
        except OSError:
            pass  # ffmpeg has stopped: its exit status and messages tell
        _wait(self._process)
        partial = partial_path(self.path)
        problem = self._failure(None) if self._process.returncode != 0 else None
        reason = None if problem is not None else _unreadable_reason(partial)
        if reason is not None:
            problem = self._failure(reason)
        if problem is not None:
            partial.unlink(missing_ok=True)
            self._finish("aborted")
            raise problem from problem.__cause__
        os.replace(partial, self.path)
        self._finish("closed")

    def abort(self) -> None:
        """Stop ffmpeg at once and delete the partial file; nothing is left under the output name."""
        if self._state == "open":
            self._process.kill()
            self._process.wait()
            try:
                self._process.stdin.close()
            except OSError:
                pass
        partial_path(self.path).unlink(missing_ok=True)
        self._finish("aborted")

    def _finish(self, state: str) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        self._state = state

    def _failure(self, detail) -> EnvironmentProblem:
        """One line for a failed encode, with ffmpeg's messages as its cause."""
        messages = ""
        if self._log is not None:
            self._log.seek(0)
            messages = self._log.read().decode("utf-8", errors="replace").strip()
        cause = FfmpegMessages(messages or f"ffmpeg exit status {self._process.returncode}")
        if is_disk_full(messages) or is_disk_full(str(detail)) or _disk_is_full(self.path.parent):
            problem = no_space_left(self.name)
        else:
            last = messages.splitlines()[-1] if messages else str(detail or f"exit status {self._process.returncode}")
            problem = EnvironmentProblem(f"video encoding failed for {self.name} ({' '.join(last.split())}); "
                                         "check free disk space")
        problem.__cause__ = cause
        return problem


def _wait(process: subprocess.Popen, timeout: float = 60.0) -> None:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class FfmpegMessages(Exception):
    """What ffmpeg printed before it failed: the cause of the one-line error (shown by --debug)."""


def _disk_is_full(folder: Path) -> bool:
    try:
        return os.statvfs(folder).f_bavail == 0
    except (OSError, AttributeError):
        return False


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
