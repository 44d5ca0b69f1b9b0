"""Resumable `animate`: the saved state of an unfinished video, and the segmented sink that makes it possible.

While a video is generated, its resume folder `.NAME.resume/` (beside the output, like the temp output) holds
  * `segment-NNNN.mp4`: the frames encoded so far, as complete H.264 files, one per save;
  * `state.pt`: the wavefront sampler's live state (done steps per window, live window outputs, emitted frames,
    add-on extras), the last latent frames the streaming VAE decoder saw and, where it is cheaper than replaying
    them, its causal cache (decode/stream.py), and the count of encoded frames, saved with `torch.save` (tensors,
    numbers, strings only: it loads with `weights_only=True`);
  * `state.json`: the fingerprint of the job (hashes of the input files, every setting) and the progress, small
    enough to check before any model loads;
  * `lock`: the pid of the process writing this output, locked (`flock`) while it runs, so a second run on the
    same output stops at once naming it; the kernel drops the lock when its process dies, so a stale file is
    taken over.
At every save the current segment is finished (ffmpeg closes it and it is renamed into place), then the state is
written to a temp file, flushed and renamed, so whatever is on disk after a kill or a power loss is consistent.
When the video is complete the segments are joined without re-encoding (ffmpeg's concat demuxer, `-c copy`), the
audio is muxed in, the result is renamed to the output name and the folder is removed. The initial noise is a
function of the seed and the latent frame index, so no RNG state has to be saved.

The same frames come out as in an uninterrupted run: the sampler and the decoder continue from exactly the saved
tensors. With `--crf 0` (lossless) the decoded video is identical too; with a lossy CRF the encoder starts a new
keyframe at each segment boundary, so the compressed bits differ there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from avatarcli.errors import AvatarError, is_disk_full, no_space_left

if TYPE_CHECKING:
    from avatarcli.job import AnimateJob

STATE_VERSION = 3  # 2: the decoder's state is its last latent frames (replayed); 3: and its cache, where cheaper
READABLE_VERSIONS = (2, 3)
# Job fields that do not change the frames: where they go, and how the models are held.
NOT_FINGERPRINTED = {"output", "allow_download", "keep_text_encoder", "null_sink", "resume", "save_every",
                     "context_parallel", "overlap_decode"}


class StopFlag:
    """A cooperative stop request: `animate` checks it after every window-step, saves its state and stops by
    raising AnimateInterrupted. Setting it is safe from a signal handler."""

    def __init__(self) -> None:
        self.requested = False
        self.reason: str | None = None

    def request(self, reason: str = "stop requested") -> None:
        self.requested = True
        self.reason = reason

    def is_set(self) -> bool:
        return self.requested


class AnimateInterrupted(Exception):
    """`animate` stopped on request. `saved`: the resume folder holds a state to continue from."""

    def __init__(self, output: Path, frames: int, frames_total: int, saved: bool, reason: str | None = None):
        self.output, self.frames, self.frames_total, self.saved, self.reason = (output, frames, frames_total, saved,
                                                                                reason)
        where = f"at frame {frames} of {frames_total}"
        then = (f"state saved in {resume_dir(output)}; run again with --resume to continue" if saved
                else "nothing to resume yet")
        super().__init__(f"{reason or 'interrupted'} {where} of {output}; {then}")


def resume_dir(output: Path) -> Path:
    output = Path(output)
    return output.with_name(f".{output.stem}.resume")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def fingerprint(job: AnimateJob) -> dict[str, str]:
    """What the frames depend on, by name: the content of every input file, every setting (preset included) and
    the versions of avatarcli, torch and diffusers.

    Generic over drivers: the portrait and whichever driving input the job names are hashed; every other job
    field (including ones other drivers add) enters by its value."""
    from avatarcli.job import DRIVING_INPUTS

    inputs = {"portrait", *DRIVING_INPUTS}
    facts: dict[str, str] = {}
    for field in dataclasses.fields(job):
        name, value = field.name, getattr(job, field.name)
        if name in NOT_FINGERPRINTED:
            continue
        if name in inputs:
            facts[name] = "none" if value is None else file_digest(Path(value))
        elif name == "preset":
            for key, setting in dataclasses.asdict(value).items():
                if key not in ("name", "description"):
                    facts[f"preset {key}"] = repr(setting)
        else:
            facts[name] = str(value) if isinstance(value, Path) else repr(value)
    from importlib.metadata import PackageNotFoundError, version

    import avatarcli

    facts["avatarcli version"] = avatarcli.__version__
    for package in ("torch", "diffusers"):  # their kernels decide the floats
        try:
            facts[f"{package} version"] = version(package)
        except PackageNotFoundError:
            pass
    return facts


def describe_differences(saved: dict[str, str], now: dict[str, str]) -> str:
    parts = []
    for name in sorted(set(saved) | set(now)):
        before, after = saved.get(name, "(not set)"), now.get(name, "(not set)")
        if before != after:
            if before.startswith("sha256:") or after.startswith("sha256:"):
                parts.append(f"{name} (file content changed)")
            else:
                parts.append(f"{name} ({before} -> {after})")
    return ", ".join(parts)


def _write_atomically(path: Path, write) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    try:
        with open(temp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk, or a stop that cut the write short: the last complete save stays
        temp.unlink(missing_ok=True)
        raise
    os.replace(temp, path)
    try:  # make the rename itself durable (power loss)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:
        pass


class ResumeFolder:
    """The resume folder of one output: validation against a job, loading, saving, removal."""

    def __init__(self, output: Path) -> None:
        self.output = Path(output)
        self.path = resume_dir(output)
        self.state_file = self.path / "state.pt"
        self.meta_file = self.path / "state.json"

    def exists(self) -> bool:
        return self.state_file.is_file() and self.meta_file.is_file()

    def meta(self) -> dict[str, Any]:
        try:
            meta = json.loads(self.meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise AvatarError(f"the resume state in {self.path} is unreadable ({error}); delete that folder to "
                              "start over") from error
        if meta.get("version") not in READABLE_VERSIONS:
            raise AvatarError(f"the resume state in {self.path} was written by another avatarcli version; delete "
                              "that folder to start over")
        return meta

    def check(self, job: AnimateJob) -> dict[str, Any] | None:
        """Before any model loads: the saved progress when `job.resume` and a matching state exists, None for a fresh
        start. A state that does not match the job, or a state found without --resume, is an AvatarError."""
        if not self.exists():
            return None
        if not job.resume:
            raise AvatarError(f"{job.output} has an unfinished run saved in {self.path}: add --resume to continue "
                              "it, or delete that folder to start over")
        meta = self.meta()
        differences = describe_differences(meta["fingerprint"], fingerprint(job))
        if differences:
            raise AvatarError(f"cannot resume {job.output}: the saved run differs in {differences}; use the same "
                              f"inputs and settings, or delete {self.path} to start over")
        return meta

    def start_fresh(self) -> None:
        """Clear leftovers of a run killed before its first save (no state: nothing there is usable); the lock of
        this run stays."""
        if self.path.exists() and not self.exists():
            for leftover in self.path.iterdir():
                if leftover.name != LOCK_NAME:
                    shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
        self.path.mkdir(exist_ok=True)

    def load(self) -> dict[str, Any]:
        import torch

        try:
            return torch.load(self.state_file, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure means the same thing to the user
            raise AvatarError(f"the resume state {self.state_file} is unreadable ({type(error).__name__}); delete "
                              f"{self.path} to start over") from error

    def save(self, job_fingerprint: dict[str, str], frames: int, frames_total: int, segments: list[str],
             sampler: dict[str, Any], decoder: dict[str, Any]) -> None:
        import torch

        state = {"version": STATE_VERSION, "fingerprint": job_fingerprint, "frames": frames,
                 "frames_total": frames_total, "segments": list(segments), "sampler": sampler, "decoder": decoder}
        meta = {key: state[key] for key in ("version", "fingerprint", "frames", "frames_total", "segments")}
        try:
            _write_atomically(self.state_file, lambda f: torch.save(state, f))
            _write_atomically(self.meta_file, lambda f: f.write(json.dumps(meta, indent=1).encode()))
        except OSError as error:
            if is_disk_full(error):
                raise no_space_left(self.output) from error
            raise

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def discard_if_unsaved(self) -> None:
        if not self.exists():
            self.remove()

    def saved_frames(self) -> tuple[int, int] | None:
        """(frames, frames_total) of the saved run, None when there is none (or it cannot be read)."""
        try:
            meta = self.meta() if self.exists() else None
        except AvatarError:
            return None
        return None if meta is None else (int(meta["frames"]), int(meta["frames_total"]))


LOCK_NAME = "lock"


class OutputLock:
    """One run per output: the resume folder's `lock` file, `flock`ed while the run holds it, holding its pid.

    The kernel releases the lock when its process ends, however it ends, so a file left by a dead process is simply
    taken over (where `flock` is unavailable, the recorded pid is checked instead). `release` removes the folder when
    it holds no saved run, else only the lock file."""

    def __init__(self, output: Path) -> None:
        self.output, self.folder = Path(output), ResumeFolder(output)
        self.path = self.folder.path / LOCK_NAME
        self._fd: int | None = None

    def check(self) -> None:
        """Before anything else: AvatarError (exit 2) when another live process holds the lock (nothing changes)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            if not _try_lock(fd, shared=True):
                raise self._busy(fd)
        finally:
            os.close(fd)  # also drops the shared lock just taken

    def _busy(self, fd: int) -> AvatarError:
        pid = _pid_in(fd)
        if pid is None:  # its holder has just taken it and not yet written its pid
            time.sleep(0.05)
            pid = _pid_in(fd)
        kill = f"stop it (kill {pid})" if pid else "stop it"
        return AvatarError(f"{self.output} is being written by another avatarcli process (pid {pid or 'unknown'}); "
                           f"wait for it to finish, {kill}, or choose another -o")

    def acquire(self) -> OutputLock:
        """Take the lock, or raise AvatarError (exit 2) naming the process that holds it."""
        for _ in range(20):  # the folder may be removed under us by a run that just finished: try again
            self.folder.path.mkdir(exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue
            if not _try_lock(fd, shared=False):
                try:
                    raise self._busy(fd)
                finally:
                    os.close(fd)
            if _same_file(fd, self.path):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return self
            os.close(fd)  # locked a file that was removed meanwhile
        raise AvatarError(f"cannot lock {self.path}: it keeps changing; is another run starting on {self.output}?")

    def release(self) -> None:
        if self._fd is None:
            return
        if self.folder.exists():
            self.path.unlink(missing_ok=True)
        else:
            self.folder.remove()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(fd: int, shared: bool) -> bool:
    """Take the lock on `fd` without waiting; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the recorded pid decides
        pid = _pid_in(fd)
        return pid is None or pid == os.getpid() or not _alive(pid)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without flock: the recorded pid decides
        pid = _pid_in(fd)
        return pid is None or pid == os.getpid() or not _alive(pid)
    return True


def _pid_in(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


class Checkpointer:
    """The resume folder of one run, as the sampler sees it: the saved run to continue from (`begin`), a save every
    `job.save_every` seconds of work or when the run stops (`due`, `save`), and the folder's removal once the video
    is complete (`finish`) or, when nothing was saved, after a failure (`abandon`)."""

    def __init__(self, job: AnimateJob, clock: Any = None) -> None:
        self.job, self.clock = job, clock
        self.folder = ResumeFolder(job.output)
        self.job_fingerprint: dict[str, str] | None = None
        self.state: dict[str, Any] | None = None  # the saved run's state, once `begin` loaded it
        self.last_save = time.perf_counter()

    def begin(self) -> dict[str, Any] | None:
        """The saved state (sampler, decoder, segments, frames) when the job resumes one; else None, after clearing
        what a run killed before its first save left behind."""
        saved = self.folder.check(self.job)
        self.job_fingerprint = fingerprint(self.job)
        if saved is None:
            self.folder.start_fresh()
        else:
            with self.clock("resume") if self.clock is not None else contextlib.nullcontext():
                self.state = self.folder.load()
        self.last_save = time.perf_counter()
        return self.state

    @property
    def frames(self) -> int:
        return self.state["frames"] if self.state is not None else 0

    def sink(self, width: int, height: int, fps: float, audio_path: Path | None, crf: int) -> SegmentedSink:
        segments = self.state["segments"] if self.state is not None else []
        return SegmentedSink(self.folder.path, self.job.output, width, height, fps, audio_path, crf,
                             segments=segments, frames_written=self.frames)

    def due(self) -> bool:
        return time.perf_counter() - self.last_save >= self.job.save_every

    def save(self, frames: int, frames_total: int, segments: list[str], sampler: dict[str, Any],
             decoder: dict[str, Any]) -> None:
        with self.clock("save") if self.clock is not None else contextlib.nullcontext():
            self.folder.save(self.job_fingerprint, frames, frames_total, segments, sampler, decoder)
        self.last_save = time.perf_counter()

    def finish(self) -> None:
        self.folder.remove()

    def abandon(self) -> None:
        self.folder.discard_if_unsaved()


class SegmentedSink:
    """Writes frames as a sequence of H.264 segments in the resume folder (each encoded on a background thread).

    `cut()` finishes the current segment (the next write starts a new one) and returns the finished segments;
    `close()` joins them losslessly, muxes the audio, and publishes the output atomically."""

    def __init__(self, folder: Path, output: Path, width: int, height: int, fps: float, audio_path: Path | None,
                 crf: int, segments: list[str] | None = None, frames_written: int = 0) -> None:
        self.folder, self.output = Path(folder), Path(output)
        self.width, self.height, self.fps, self.audio_path, self.crf = width, height, fps, audio_path, crf
        self.segments = list(segments or [])
        self.frames_written = frames_written
        self._current = None

    def open(self) -> None:
        from avatarcli.sink.ffmpeg import check_writable_output

        check_writable_output(self.output)
        if self.audio_path is not None and not Path(self.audio_path).is_file():
            raise AvatarError(f"audio file not found: {self.audio_path}; check the path")
        missing = [name for name in self.segments if not (self.folder / name).is_file()]
        if missing:
            raise AvatarError(f"the resume state in {self.folder} lacks {missing[0]}; delete that folder to start over")
        for stray in self.folder.glob("*segment-*.mp4"):  # written after the last save: superseded
            if stray.name not in self.segments:
                stray.unlink()

    def write(self, frames) -> None:
        from avatarcli.sink.ffmpeg import BackgroundSink, Mp4Sink

        if self._current is None:
            name = f"segment-{len(self.segments):04d}.mp4"
            self._current = (name, BackgroundSink(Mp4Sink(self.folder / name, self.width, self.height, self.fps,
                                                          crf=self.crf, name=self.output)))
            self._current[1].open()
        self._current[1].write(frames)
        self.frames_written += len(frames)

    def cut(self) -> list[str]:
        if self._current is not None:
            name, sink = self._current
            self._current = None
            sink.close()  # ffmpeg finishes the segment; it is renamed into place
            self.segments.append(name)
        return list(self.segments)

    def close(self) -> None:
        from avatarcli.errors import EnvironmentProblem
        from avatarcli.sink.ffmpeg import partial_path

        self.cut()
        if not self.segments:
            raise ValueError(f"no frames were written to {self.output}")
        partial = partial_path(self.output)
        try:
            problem, messages = self._join(partial)
        except BaseException as error:  # e.g. a Ctrl-C (ffmpeg was killed) or a full disk: the partial file goes
            partial.unlink(missing_ok=True)
            if isinstance(error, OSError) and is_disk_full(error):
                raise no_space_left(self.output) from error
            raise
        if problem is not None:
            partial.unlink(missing_ok=True)
            if is_disk_full(problem) or is_disk_full(messages):
                raise no_space_left(self.output) from messages
            raise EnvironmentProblem(f"video encoding failed for {self.output} ({problem}); check free disk space") \
                from messages
        os.replace(partial, self.output)

    def _join(self, partial: Path):
        """The segments joined (and the audio muxed) into `partial`: (what went wrong or None, ffmpeg's messages)."""
        from avatarcli.media.audio import ffmpeg_exe
        from avatarcli.sink.ffmpeg import FfmpegMessages, _unreadable_reason

        listing = self.folder / "segments.txt"
        listing.write_text("".join(f"file '{name}'\n" for name in self.segments), encoding="utf-8")
        command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y", "-f", "concat", "-safe", "0",
                   "-i", str(listing)]
        if self.audio_path is not None:
            command += ["-i", str(self.audio_path), "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac"]
        command += ["-c:v", "copy", "-movflags", "+faststart", "-f", "mp4", str(partial)]
        result = subprocess.run(command, capture_output=True, check=False, start_new_session=True)
        messages = result.stderr.decode("utf-8", errors="replace").strip()
        problem = None
        if result.returncode != 0:
            problem = messages.splitlines()[-1] if messages else f"ffmpeg exit status {result.returncode}"
        problem = problem or _unreadable_reason(partial)
        return problem, FfmpegMessages(messages or str(problem))

    def abort(self) -> None:
        """Stop encoding the current segment and drop it; finished segments stay for a resume."""
        if self._current is not None:
            _, sink = self._current
            self._current = None
            sink.abort()
