"""`batch`: many `animate` jobs from one manifest, each model set loaded once.

A manifest is YAML (a list of jobs, or `{defaults: {...}, jobs: [...]}`) or JSON Lines (one job object per line).
A job names `portrait`, `audio` or `driving`, optionally `output`, and any `animate` option by its long name (dashes
or underscores). Relative paths are relative to the manifest's folder. Every job is validated (options, preset,
inputs, output folder, resume state) before any model loads. Jobs run grouped by their driver's `models_key`, so a
model set is loaded once for all the jobs that can share it and only one set is held at a time; the outcomes are
reported in manifest order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avatarcli.errors import AvatarError

# animate's options by long name (underscored) -> the type a manifest value must have
PATH_OPTIONS = ("portrait", "audio", "driving", "output", "weights")
OPTIONS: dict[str, type | tuple[type, ...]] = {
    "portrait": str, "audio": str, "driving": str, "output": str, "weights": str, "preset": str, "prompt": str,
    "seed": int, "size": str, "fps": int, "steps": int, "guidance": str, "overlap": int, "blend": str,
    "checkpoint": str, "device": str, "dtype": str, "vae_dtype": str, "crf": int, "compile": bool, "no_audio": bool,
    "emo_scale": (int, float), "text_scale": (int, float), "audio_scale": (int, float), "offload": str,
    "weights_dtype": str, "decoder": str, "model": str,
}
PRESET_OVERRIDES = ("size", "fps", "steps", "guidance", "overlap", "blend", "checkpoint", "seed", "emo_scale",
                    "text_scale", "audio_scale", "decoder")


@dataclass
class BatchEntry:
    index: int  # 1-based position in the manifest
    where: str  # "job 2" / "line 3": how errors name it
    output: Path | None = None
    job: Any = None  # AnimateJob once it validated
    models_key: tuple | None = None
    error: str | None = None  # validation error
    skip: bool = False  # output exists and --overwrite was not given


@dataclass
class JobOutcome:
    index: int
    output: str | None
    status: str  # ok, failed, invalid, skipped, interrupted, not run
    seconds: float = 0.0
    frames: int = 0
    nfe: int = 0
    resumed_from_frame: int = 0
    error: str | None = None
    exit_code: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class BatchReport:
    manifest: str
    jobs: list[JobOutcome]
    model_loads: int = 0
    partial_loads: int = 0  # model sets adapted from the previous group's (e.g. only the transformer reloaded)
    wall_seconds: float = 0.0
    interrupted: bool = False
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for job in self.jobs:
            counts[job.status] = counts.get(job.status, 0) + 1
        return {"manifest": self.manifest, "jobs": [job.as_dict() for job in self.jobs], "counts": counts,
                "model_loads": self.model_loads, "partial_loads": self.partial_loads, "wall_seconds": round(self.wall_seconds, 3),
                "interrupted": self.interrupted}

    @property
    def exit_code(self) -> int:
        """0 when every job succeeded or was skipped; else 130 if interrupted, 1 for an internal failure, 3 for an
        environment problem, 2 when only bad inputs failed."""
        codes = {job.exit_code for job in self.jobs if job.status not in ("ok", "skipped")}
        if self.interrupted:
            return 130
        for code in (1, 3, 2):
            if code in codes:
                return code
        return 1 if codes else 0


def read_manifest(path: Path) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """(defaults, [(where, raw job)]) from a YAML or JSON Lines manifest. Structural problems are an AvatarError."""
    path = Path(path)
    if not path.is_file():
        raise AvatarError(f"manifest not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise AvatarError(f"cannot read manifest {path} ({error})") from error
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        jobs = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                jobs.append((f"line {number}", json.loads(line)))
            except ValueError as error:
                jobs.append((f"line {number}", AvatarError(f"not valid JSON ({error})")))
        defaults: Any = {}
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise AvatarError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from error
        if isinstance(data, dict) and set(data) <= {"defaults", "jobs"} and "jobs" in data:
            defaults, raw = data.get("defaults") or {}, data["jobs"]
        else:
            defaults, raw = {}, data
        if not isinstance(raw, list):
            raise AvatarError(f"{path}: a manifest is a list of jobs or a mapping with 'defaults' and 'jobs'")
        if not isinstance(defaults, dict):
            raise AvatarError(f"{path}: 'defaults' must be a mapping of animate options")
        jobs = [(f"job {n}", job) for n, job in enumerate(raw, start=1)]
    if not jobs:
        raise AvatarError(f"{path}: the manifest has no jobs")
    return defaults, jobs


def _normalise(raw: Any, what: str) -> dict[str, Any]:
    if isinstance(raw, Exception):
        raise raw
    if not isinstance(raw, dict):
        raise AvatarError(f"a job must be a mapping of animate options, got {type(raw).__name__}")
    options = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in OPTIONS:
            allowed = ", ".join(n.replace("_", "-") for n in OPTIONS)
            raise AvatarError(f"unknown option '{key}' in {what} (allowed: {allowed})")
        expected = OPTIONS[name]
        if value is None and name not in ("portrait",):
            continue
        if isinstance(value, bool) and expected is not bool or not isinstance(value, expected):
            raise AvatarError(f"'{key}' must be {getattr(expected, '__name__', expected)}, got {value!r}")
        options[name] = value
    return options


def build_job(options: dict[str, Any], base: Path, resume: bool):
    """An AnimateJob from manifest options (already type-checked); paths relative to `base`."""
    from avatarcli.features.prompts import DEFAULT_PROMPT
    from avatarcli.pipeline import AnimateJob
    from avatarcli.presets import load_preset

    if "portrait" not in options:
        raise AvatarError("'portrait' is missing")

    def path(name: str) -> Path | None:
        value = options.get(name)
        if value is None:
            return None
        value = Path(value).expanduser()
        return value if value.is_absolute() else base / value

    preset_name = options.get("preset", "balanced")
    if preset_name.endswith((".yaml", ".yml")) or "/" in preset_name:
        preset_name = str(base / Path(preset_name).expanduser())
    portrait, audio, driving = path("portrait"), path("audio"), path("driving")
    if driving is not None and options.get("fps") is not None:
        raise AvatarError("'fps' does not apply to 'driving': the video keeps the driving video's frame rate")
    preset = load_preset(preset_name).for_driver("driving" if driving is not None else "audio")
    preset = preset.with_overrides(**{k: options.get(k) for k in PRESET_OVERRIDES})
    output = path("output")
    if output is None:
        signal = audio or driving
        output = base / (f"{portrait.stem}_{signal.stem}.mp4" if signal is not None else f"{portrait.stem}.mp4")
    crf = options.get("crf", 18)
    if not 0 <= crf <= 51:
        raise AvatarError(f"'crf' must be between 0 and 51, got {crf}")
    return AnimateJob(portrait=portrait, audio=audio, driving=driving, output=output, preset=preset,
                      prompt=options.get("prompt", DEFAULT_PROMPT),
                      seed=preset.seed if preset.seed is not None else 42, weights=path("weights"),
                      device=options.get("device", "auto"), dtype=options.get("dtype", "auto"), crf=crf,
                      vae_dtype=options.get("vae_dtype", "auto"), compile=options.get("compile", False),
                      mux_audio=not options.get("no_audio", False), resume=resume,
                      offload=options.get("offload", "none"), weights_dtype=options.get("weights_dtype", "auto"),
                      model=options.get("model", "stableavatar"))


def validate(manifest: Path, overwrite: bool = False, resume: bool = False) -> list[BatchEntry]:
    """Every job of the manifest checked as `animate` checks its input, with no model loaded. Errors are kept per
    entry (`entry.error`), so all of them can be listed at once."""
    from avatarcli.pipeline import prepare

    manifest = Path(manifest)
    base = manifest.resolve().parent
    defaults, raw_jobs = read_manifest(manifest)
    try:
        shared = _normalise(defaults, "defaults")
    except AvatarError as error:
        raise AvatarError(f"{manifest}: defaults: {error}") from error
    entries, outputs = [], {}
    for index, (where, raw) in enumerate(raw_jobs, start=1):
        entry = BatchEntry(index=index, where=where)
        entries.append(entry)
        try:
            job = build_job({**shared, **_normalise(raw, where)}, base, resume)
            entry.output = job.output
            key = job.output.resolve()
            if key in outputs:
                raise AvatarError(f"writes {job.output}, as {outputs[key]} does; give each job its own 'output'")
            outputs[key] = where
            if job.output.exists() and not overwrite and not resume_pending(job):
                entry.skip, entry.job = True, job
                continue
            driver, inputs = prepare(job)
            entry.job, entry.models_key = job, driver.models_key(job, inputs)
        except AvatarError as error:
            entry.error = " ".join(str(error).split())
    return entries


def resume_pending(job) -> bool:
    from avatarcli.resume import ResumeFolder

    return bool(job.resume) and ResumeFolder(job.output).exists()


def _failure_code(error: BaseException) -> int:
    import errno

    code = getattr(error, "exit_code", None)
    if isinstance(code, int) and code in (1, 2, 3):
        return code
    if isinstance(error, AvatarError):
        return 2
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return 3
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return 3
    return 1


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def run_batch(manifest: Path, entries: list[BatchEntry], continue_on_error: bool = False, stop=None,
              on_job: Callable[[str, BatchEntry, JobOutcome | None], None] | None = None) -> BatchReport:
    """Run the validated entries. Invalid entries are reported as such (run the rest only with
    `continue_on_error`; the caller normally refuses an invalid manifest first). `stop`: an
    avatarcli.resume.StopFlag shared with every job; `on_job("start"|"done", entry, outcome)` reports progress."""
    from avatarcli.pipeline import animate, prepare
    from avatarcli.resume import AnimateInterrupted
    from avatarcli.runtime import resolve_device, resolve_dtype

    started = time.perf_counter()
    outcomes: dict[int, JobOutcome] = {}
    for entry in entries:
        if entry.error is not None:
            outcomes[entry.index] = JobOutcome(entry.index, str(entry.output) if entry.output else None, "invalid",
                                               error=f"{entry.where}: {entry.error}", exit_code=2)
        elif entry.skip:
            outcomes[entry.index] = JobOutcome(entry.index, str(entry.output), "skipped",
                                               error="output exists (use --overwrite to replace it)")
    runnable = [e for e in entries if e.index not in outcomes]
    groups: dict[tuple, list[BatchEntry]] = {}
    for entry in runnable:
        groups.setdefault(entry.models_key, []).append(entry)
    for group in groups.values():  # keep the text encoder while a later job of the group has a prompt not yet encoded
        seen: set[tuple[str, str]] = set()
        for position, entry in enumerate(group):
            seen.add((entry.job.prompt, entry.job.negative_prompt))
            entry.job.keep_text_encoder = any((later.job.prompt, later.job.negative_prompt) not in seen
                                              for later in group[position + 1 :])

    report = BatchReport(manifest=str(manifest), jobs=[])
    halted = False
    previous = None  # (driver, models_key, models) of the last group: a driver may keep part of them
    for key, group in groups.items():
        models, load_error = None, None
        for entry in group:
            if halted:
                outcomes[entry.index] = JobOutcome(entry.index, str(entry.output), "not run")
                continue
            if on_job:
                on_job("start", entry, None)
            tick = time.perf_counter()
            try:
                if load_error is not None:
                    raise load_error
                prepared = prepare(entry.job)
                if models is None:
                    driver, inputs = prepared
                    device = resolve_device(entry.job.device)
                    dtype = resolve_dtype(entry.job.dtype, device)
                    earlier, previous = previous, None
                    try:
                        if earlier is not None and earlier[0] is driver and hasattr(driver, "reuse"):
                            models = driver.reuse(earlier[2], earlier[1], entry.job, inputs, device, dtype)
                            report.partial_loads += models is not None
                        earlier = None
                        _free_memory()  # the earlier group's models, unless reused, before the next ones load
                        if models is None:
                            models = driver.load(entry.job, inputs, device, dtype)
                            report.model_loads += 1
                        models_driver = driver
                    except Exception as error:
                        load_error = error
                        raise
                result = animate(entry.job, models=models, prepared=prepared, stop=stop)
                outcome = JobOutcome(entry.index, str(result.output), "ok", frames=result.frames, nfe=result.nfe,
                                     resumed_from_frame=result.resumed_from_frame)
            except AnimateInterrupted as error:
                outcome = JobOutcome(entry.index, str(entry.output), "interrupted", frames=error.frames,
                                     error=" ".join(str(error).split()), exit_code=130)
                report.interrupted = halted = True
            except Exception as error:  # noqa: BLE001 - reported per job; the batch decides whether to go on
                message = str(error) if isinstance(error, AvatarError) else f"{type(error).__name__}: {error}"
                outcome = JobOutcome(entry.index, str(entry.output), "failed", error=" ".join(message.split()),
                                     exit_code=_failure_code(error))
                if not continue_on_error:
                    halted = True
            outcome.seconds = round(time.perf_counter() - tick, 3)
            outcomes[entry.index] = outcome
            if on_job:
                on_job("done", entry, outcome)
        if models is not None:
            previous, models = (models_driver, key, models), None
    previous = None
    _free_memory()
    report.jobs = [outcomes[entry.index] for entry in entries]
    report.wall_seconds = time.perf_counter() - started
    return report


def write_report(report: BatchReport, path: Path) -> None:
    """The JSON report, written to a temp file and renamed."""
    import os

    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(report.as_dict(), indent=1) + "\n", encoding="utf-8")
    os.replace(temp, path)
