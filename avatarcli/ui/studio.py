"""The web app's engine, without Gradio: sessions, the models kept loaded between requests, and one run as a stream
of page updates.

Everything goes through the library, as the CLI and batch do: a form's values are `animate` options by their
avatarcli/options.py names and become a job through its `build_job`; `pipeline.prepare` checks the inputs (bad
input is an AvatarError whose message the page shows); batch's `ModelSets` loads the models once per models key;
`pipeline.animate` runs the job, reporting through its `Progress` callback and stopping at a `StopFlag` after the
current window-step with its resume state saved, which a resumed job continues with the same frames. The finished
segments that each save leaves in the resume folder (avatarcli/resume.py) are joined into the preview while the rest
generates.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avatarcli.errors import AvatarError, as_environment_problem
from avatarcli.job import AnimateJob, AnimateResult, Progress

log = logging.getLogger("avatarcli.ui")

# The form fields a generation takes: `animate` options by their avatarcli/options.py names.
FORM_OPTIONS = ("portrait", "audio", "driving", "model", "weights", "preset", "steps", "seed", "size", "text_scale",
                "audio_scale", "emo_scale", "overlap", "precision", "decoder")
INPUT_FILES = ("portrait", "audio", "driving")
NUMBERS = ("steps", "seed", "text_scale", "audio_scale", "emo_scale", "overlap")  # typed as text: empty = not given
STAGE_WORDS = {"load": "loading the models", "features": "extracting features (text, portrait, audio)",
               "resume": "restoring the saved run", "sample": "sampling", "finish": "writing the last frames"}


@dataclass
class Update:
    """What the page shows after one event of a run."""

    text: str  # one line: the stage, windows and window-steps, frames, time and ETA; or the outcome
    fraction: float = 0.0  # of the run's work
    preview: Path | None = None  # the frames finished so far, as an mp4, when they changed
    video: Path | None = None  # the finished video
    summary: dict | None = None  # the run summary (`animate --json`'s fields)
    error: bool = False  # `text` says what went wrong
    cancelled: bool = False
    resumable: bool = False  # a cancelled run's state is kept: Resume continues it


class Session:
    """One browser tab (or API client): its own folder for inputs, outputs and previews, removed by `close`; the
    stop flag of its running job; the cancelled job that Resume continues."""

    def __init__(self, root: Path) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="session-", dir=root))
        self.stop = None  # avatarcli.resume.StopFlag of the running job
        self.paused: AnimateJob | None = None  # cancelled with its state saved
        self.takes = 0

    def next_output(self) -> Path:
        self.takes += 1
        return self.folder / f"take-{self.takes}.mp4"

    def keep(self, path: str | Path, name: str) -> Path:
        """A copy of an uploaded file in the session folder (uploads may be cleaned up before a resume)."""
        source = Path(path)
        if not source.is_file():
            raise AvatarError(f"the {name} upload is missing; upload it again")
        target = self.folder / "inputs" / f"take-{self.takes}" / source.name  # the upload's own name, for messages
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return target

    def plain(self, text: str) -> str:
        """A message without the session folder's paths: uploads and outputs by their own names."""
        return re.sub(re.escape(str(self.folder)) + r"/(inputs/take-\d+/)?", "", text)

    def cancel(self) -> bool:
        """Ask the running job to stop after its current window-step (its state is saved). False when none runs."""
        if self.stop is None:
            return False
        self.stop.request("cancelled in the app")
        return True

    def discard_paused(self) -> None:
        if self.paused is not None:
            from avatarcli.resume import ResumeFolder

            ResumeFolder(self.paused.output).remove()
            self.paused = None

    def close(self) -> None:
        self.cancel()
        shutil.rmtree(self.folder, ignore_errors=True)


class LoadedModels:
    """The models of the last job, kept for the next: batch's `ModelSets`, loaded once per models key (another key
    adapts them or loads afresh). `loads` counts the loads."""

    def __init__(self) -> None:
        from avatarcli.batch import BatchReport, ModelSets

        self.report = BatchReport(manifest="ui", jobs=[])
        self.sets = ModelSets(self.report)

    @property
    def loads(self) -> int:
        return self.report.model_loads

    def get(self, job: AnimateJob, driver, inputs):
        from avatarcli.batch import BatchEntry

        key = driver.models_key(job, inputs)
        current = self.sets.current
        if self.sets.error is not None or (current is not None and current[1] != key):
            self.sets.end_group()  # a failed load is tried again; other models replace (or adapt) these
        entry = BatchEntry(index=1, where="ui", job=job, models_key=key)
        entry.frames = inputs.frames  # the job's window-steps decide --compile auto, as for a batch group
        return self.sets.for_job(entry, driver, inputs)


class Studio:
    """The app's state shared by every session: its folder, the loaded models, one job at a time."""

    def __init__(self, device: str = "auto", weights: Path | None = None, save_every: float = 10.0) -> None:
        self.device, self.weights, self.save_every = device, weights, save_every
        self.root = Path(tempfile.mkdtemp(prefix="avatarcli-ui-"))
        self.models = LoadedModels()
        self.lock = threading.Lock()  # Gradio's queue runs one job at a time; this guards other callers

    def new_session(self) -> Session:
        return Session(self.root)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- jobs --------------------------------------------------------------------------------------------------

    def job(self, session: Session, values: dict[str, Any]) -> AnimateJob:
        """The job of a form (option values by name; None or "": not given), through the CLI's builder. Inputs are
        copied into the session folder; the output is the session's next take. Raises AvatarError."""
        from avatarcli.options import build_job

        unknown = set(values) - set(FORM_OPTIONS)
        if unknown:
            raise ValueError(f"not form options: {sorted(unknown)}")
        given = {key: value for key, value in values.items()
                 if value is not None and not (isinstance(value, str) and not value.strip())}
        if "portrait" not in given:
            raise AvatarError("upload a portrait (or take one with the webcam)")
        if not ("audio" in given or "driving" in given):
            raise AvatarError("add speech (upload or record it) or a driving video")
        if "audio" in given and "driving" in given:
            raise AvatarError("give speech or a driving video, not both")
        output = session.next_output()
        for name in INPUT_FILES:
            if name in given:
                given[name] = str(session.keep(given[name], name))
        if given.get("model") == "stableavatar" and "weights" not in given and self.weights is not None:
            given["weights"] = str(self.weights)
        for key in NUMBERS:
            if key in given:
                given[key] = form_number(given[key], key)
        job = build_job({**given, "output": str(output), "device": self.device})
        session.discard_paused()  # a new take replaces the cancelled one
        job.allow_download = False  # a button does not start a 24 GB download: `avatarcli download` does
        job.save_every = self.save_every
        return job

    def resume_job(self, session: Session) -> AnimateJob:
        if session.paused is None:
            raise AvatarError("nothing to resume: Cancel keeps a run's state, Resume continues it")
        return dataclasses.replace(session.paused, resume=True)

    # ---- a run -------------------------------------------------------------------------------------------------

    def run(self, session: Session, job: AnimateJob) -> Iterator[Update]:
        """Run `job` for `session`, as page updates: checks, model loading, progress with ETA, previews of the
        finished frames, and the outcome (the video and its summary, a cancellation, or what went wrong)."""
        from avatarcli.pipeline import prepare
        from avatarcli.resume import StopFlag

        try:
            prepared = prepare(job)  # bad input: a message at once, before anything loads
        except Exception as error:  # noqa: BLE001 - every failure goes to the page
            yield failure(session, error)
            return
        warnings = [f"warning: {warning}" for warning in prepared[1].warnings]
        session.stop, session.paused = StopFlag(), None
        events: queue.Queue = queue.Queue()
        worker = threading.Thread(target=self._work, args=(session, job, prepared, events), daemon=True,
                                  name="avatarcli-ui-job")
        worker.start()
        meter, preview = ProgressText(), Preview(job.output, session.folder)
        try:
            yield Update(" · ".join(["starting", *warnings]))
            while True:
                event = events.get()
                if isinstance(event, Progress):
                    yield Update(" · ".join([meter(event), *warnings]), fraction(event), preview.refresh())
                    continue
                yield self._outcome(session, job, event, preview, warnings)
                return
        finally:
            if worker.is_alive():  # the page went away: the job stops after its window-step, its state kept
                session.cancel()

    def _work(self, session: Session, job: AnimateJob, prepared, events: queue.Queue) -> None:
        from avatarcli.pipeline import animate

        try:
            with self.lock:
                events.put(Progress(0, 0, 0, 0, 0, 0, prepared[1].frames, 0.0, stage="load"))
                models = self.models.get(job, *prepared)
                events.put(animate(job, on_progress=events.put, models=models, prepared=prepared,
                                   stop=session.stop))
        except BaseException as error:  # noqa: BLE001 - every outcome goes to the page
            events.put(error)

    def _outcome(self, session: Session, job: AnimateJob, event, preview: Preview, warnings: list[str]) -> Update:
        from avatarcli.resume import AnimateInterrupted

        session.stop = None
        if isinstance(event, AnimateResult):
            text = (f"done: {event.frames} frames, {event.video_seconds:.2f} s of video in "
                    f"{event.wall_seconds:.1f} s")
            return Update(" · ".join([text, *warnings]), 1.0, preview.refresh(), event.output,
                          {**summary(event), "output": event.output.name})
        if isinstance(event, AnimateInterrupted):
            if event.saved:
                session.paused = job
                text = (f"cancelled at frame {event.frames} of {event.frames_total}: the state is kept, Resume "
                        "continues it")
            else:
                text = f"cancelled at frame {event.frames} of {event.frames_total}: nothing to resume yet"
            return Update(text, preview=preview.refresh(), cancelled=True, resumable=event.saved)
        return failure(session, event)

    # ---- eval --------------------------------------------------------------------------------------------------

    def evaluate(self, session: Session, video, reference, audio=None, layout: str = "auto",
                 face_box: str | None = None, preset: str = "balanced") -> tuple[dict, Path]:
        """`avatarcli eval`'s numbers (its JSON summary) and plot for uploaded files. Raises AvatarError."""
        from avatarcli.eval import EvalJob, evaluate
        from avatarcli.eval.layout import parse_box
        from avatarcli.eval.plot import draw_report
        from avatarcli.presets import load_preset

        if not video or not reference:
            raise AvatarError("upload the video and the portrait it was made from")
        job = EvalJob(video=Path(video), reference=Path(reference), audio=Path(audio) if audio else None,
                      layout=layout, face_box=parse_box(face_box) if face_box else None,
                      overlap=load_preset(preset).overlap)
        report = evaluate(job)
        session.takes += 1
        plot = draw_report(report, session.folder / f"eval-{session.takes}.png")
        return report.summary(), plot


def failure(session: Session, error: BaseException) -> Update:
    """What went wrong, in one line: the message of bad input or of an environment problem (as the CLI's exit 2 and
    3), else an internal error whose traceback goes to the app's log."""
    problem = error if isinstance(error, AvatarError) else as_environment_problem(error)
    if problem is not None:
        return Update(session.plain(one_line(problem)), error=True)
    log.error("the job failed", exc_info=error)
    return Update(f"internal error: {type(error).__name__}: {one_line(error)} (the app's console has the traceback; "
                  "please report it)", error=True)


class ProgressText:
    """A `Progress` as one line: the stage, windows and window-steps, frames, elapsed time and the ETA (from the
    window-step rate of this run, then from the frame rate while the last frames are written)."""

    def __init__(self) -> None:
        self.first: dict[str, tuple[float, int]] = {}  # stage -> (elapsed, count) when it was first seen

    def __call__(self, p: Progress) -> str:
        if p.stage not in ("sample", "finish"):
            return f"{STAGE_WORDS.get(p.stage, p.stage)} · {p.elapsed_seconds:.0f} s"
        parts = [STAGE_WORDS[p.stage], f"window {p.windows_done}/{p.windows_total}",
                 f"window-step {p.window_steps_done}/{p.window_steps_total}",
                 f"frames {p.frames_written}/{p.frames_total}", f"{p.elapsed_seconds:.0f} s"]
        done, total = ((p.window_steps_done, p.window_steps_total) if p.stage == "sample"
                       else (p.frames_written, p.frames_total))
        eta = self.eta(p.stage, p.elapsed_seconds, done, total)
        if eta is not None:
            parts.append(f"about {eta:.0f} s left")
        return " · ".join(parts)

    def eta(self, stage: str, elapsed: float, done: int, total: int) -> float | None:
        start, count = self.first.setdefault(stage, (elapsed, done))
        if done <= count or elapsed <= start:
            return None
        return (total - done) * (elapsed - start) / (done - count)


def fraction(p: Progress) -> float:
    """Of the run's work: window-steps, then frames written (decoding trails the sampler)."""
    steps = p.window_steps_done / p.window_steps_total if p.window_steps_total else 0.0
    frames = p.frames_written / p.frames_total if p.frames_total else 0.0
    return 0.8 * steps + 0.2 * frames


class Preview:
    """The finished segments of a running job (those its resume folder holds at its last save) joined into one mp4
    in `folder`, without re-encoding; a new file each time they change, so the page reloads it."""

    def __init__(self, output: Path, folder: Path) -> None:
        self.output, self.folder = Path(output), Path(folder)
        self.segments: list[str] = []
        self.count = 0

    def refresh(self) -> Path | None:
        """A new preview when segments were added since the last one, else None."""
        from avatarcli.resume import ResumeFolder

        folder = ResumeFolder(self.output)
        try:
            segments = folder.meta()["segments"] if folder.exists() else []
        except (AvatarError, KeyError):
            return None
        if not segments or segments == self.segments:
            return None
        self.count += 1
        target = self.folder / f"{self.output.stem}-preview-{self.count}.mp4"
        if not join_segments([folder.path / name for name in segments], target):
            return None  # the run finished meanwhile and removed its folder: the video itself comes next
        self.segments = segments
        return target


def join_segments(segments: list[Path], target: Path) -> bool:
    """ffmpeg's concat demuxer, stream copy: False when a segment is gone or ffmpeg fails."""
    from avatarcli.media.audio import ffmpeg_exe

    listing = target.with_suffix(".txt")
    listing.write_text("".join(f"file '{path}'\n" for path in segments), encoding="utf-8")
    command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y", "-f", "concat", "-safe", "0", "-i",
               str(listing), "-c", "copy", "-movflags", "+faststart", str(target)]
    try:
        result = subprocess.run(command, capture_output=True, check=False)
    finally:
        listing.unlink(missing_ok=True)
    if result.returncode != 0:
        target.unlink(missing_ok=True)
        return False
    return True


def summary(result: AnimateResult) -> dict[str, Any]:
    """The run summary the page shows: `animate --json`'s fields."""
    return {
        "output": str(result.output), "driver": result.driver, "frames": result.frames, "fps": result.fps,
        "size": f"{result.width}x{result.height}", "video_seconds": round(result.video_seconds, 3),
        "wall_seconds": round(result.wall_seconds, 3), "windows": result.windows, "steps": result.steps,
        "nfe": result.nfe, "branch_forwards": result.branch_forwards,
        "timings": {key: round(value, 3) for key, value in result.timings.items()},
        "background_timings": {key: round(value, 3) for key, value in result.background_timings.items()},
        "peak_gpu_bytes": result.peak_gpu_bytes, "peak_rss_bytes": result.peak_rss_bytes,
        "resumed_from_frame": result.resumed_from_frame,
    }


def form_number(value: Any, name: str) -> int | float:
    """A number typed in the page (text, or a number from the API), of the option's kind: whole for `int` options."""
    from avatarcli.options import OPTIONS

    label = name.replace("_", " ")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise AvatarError(f"{label} must be a number, got {value!r}") from None
    if OPTIONS[name].kind is not int:
        return number
    if not number.is_integer():
        raise AvatarError(f"{label} must be a whole number, got {value!r}")
    return int(number)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
