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

@dataclass
class BatchEntry:
    index: int  # 1-based position in the manifest
    where: str  # "job 2" / "line 3": how errors name it
    output: Path | None = None
    job: Any = None  # AnimateJob once it validated
    models_key: tuple | None = None
    frames: int = 0  # video frames of its output (its share of the group's window-steps, for --compile auto)
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
    shard: str | None = None  # "K/N": this report covers shard K of N of the manifest (avatarcli/batch_shards.py)

    def as_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for job in self.jobs:
            counts[job.status] = counts.get(job.status, 0) + 1
        shard = {} if self.shard is None else {"shard": self.shard}
        return {"manifest": self.manifest, **shard, "jobs": [job.as_dict() for job in self.jobs], "counts": counts,
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


def _normalise(raw: Any) -> dict[str, Any]:
    """A job's (or the defaults') options by underscored name, each of the type avatarcli/options.py declares."""
    from avatarcli.options import OPTIONS

    if isinstance(raw, Exception):
        raise raw
    if not isinstance(raw, dict):
        raise AvatarError(f"a job must be a mapping of animate options, got {type(raw).__name__}")
    options = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in OPTIONS:
            raise AvatarError(f"unknown option '{key}' ({_suggest(str(key))})")
        expected = OPTIONS[name].kind
        if value is None and name != "portrait":
            continue
        kinds = expected if isinstance(expected, tuple) else (expected,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, expected):
            raise AvatarError(f"'{key}' must be {_kind_name(expected)}, got {value!r}")
        options[name] = value
    return options


def _kind_name(expected: type | tuple[type, ...]) -> str:
    from avatarcli.options import NUMBER

    if expected == NUMBER:
        return "a number"
    return getattr(expected, "__name__", None) or " or ".join(kind.__name__ for kind in expected)


def _suggest(key: str) -> str:
    """"did you mean 'seed'?" for a near miss, else the allowed keys (the caller names the job or the defaults)."""
    import difflib

    from avatarcli.options import OPTIONS

    names = [name.replace("_", "-") for name in OPTIONS]
    close = difflib.get_close_matches(key.replace("_", "-"), names, n=1, cutoff=0.6)
    if not close:
        return f"allowed: {', '.join(names)}"
    return f"did you mean '{close[0].replace('-', '_') if '_' in key else close[0]}'?"


def build_job(options: dict[str, Any], base: Path, resume: bool):
    """An AnimateJob from manifest options (already type-checked), through the same builder as the CLI; relative
    paths and preset files are relative to `base`, and the output defaults to PORTRAIT_SIGNAL.mp4 there."""
    from avatarcli.options import build_job as build, manifest_name

    if options.get("portrait") is not None and options.get("output") is None:
        signal = options.get("audio") or options.get("driving")
        stem = Path(options["portrait"]).stem
        options = {**options, "output": f"{stem}_{Path(signal).stem}.mp4" if signal is not None else f"{stem}.mp4"}
    return build(options, base=base, resume=resume, name=manifest_name)


def validate(manifest: Path, overwrite: bool = False, resume: bool = False, shard=None,
             overrides: dict[str, Any] | None = None) -> list[BatchEntry]:
    """Every job of the manifest checked as `animate` checks its input, with no model loaded. Errors are kept per
    entry (`entry.error`), so all of them can be listed at once. `shard` (avatarcli/batch_shards.py Shard): only its
    jobs are checked and returned, the others only claim their outputs; `overrides`: options that replace every
    job's (e.g. `batch --device`)."""
    from avatarcli.options import existing_output
    from avatarcli.pipeline import prepare

    manifest = Path(manifest)
    base = manifest.resolve().parent
    defaults, raw_jobs = read_manifest(manifest)
    try:
        shared = _normalise(defaults)
    except AvatarError as error:
        raise AvatarError(f"{manifest}: defaults: {error}") from error
    forced = _normalise(overrides or {})
    entries, outputs = [], {}
    for index, (where, raw) in enumerate(raw_jobs, start=1):
        entry = BatchEntry(index=index, where=where)
        mine = shard is None or shard.takes(index)
        if mine:
            entries.append(entry)
        try:
            job = build_job({**shared, **_normalise(raw), **forced}, base, resume)
            entry.output = job.output
            key = job.output.resolve()
            if key in outputs:
                raise AvatarError(f"writes {job.output}, as {outputs[key]} does; give each job its own 'output'")
            outputs[key] = where
            if not mine:  # another shard's job: it only claims its output, so a clash is found in either shard
                continue
            if existing_output(job, overwrite):
                entry.skip, entry.job = True, job
                continue
            driver, inputs = prepare(job)
            entry.job, entry.models_key, entry.frames = job, driver.models_key(job, inputs), inputs.frames
        except AvatarError as error:
            entry.error = " ".join(str(error).split())
    return entries


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
    started = time.perf_counter()
    outcomes = _unrunnable(entries)
    report = BatchReport(manifest=str(manifest), jobs=[])
    models = ModelSets(report)
    halted = False
    for group in _model_groups([e for e in entries if e.index not in outcomes]):
        models.begin_group(group)
        for entry in group:
            if halted:
                outcomes[entry.index] = JobOutcome(entry.index, str(entry.output), "not run")
                continue
            if on_job:
                on_job("start", entry, None)
            outcome = outcomes[entry.index] = _run_entry(entry, models, stop)
            report.interrupted |= outcome.status == "interrupted"
            halted = outcome.status == "interrupted" or (outcome.status == "failed" and not continue_on_error)
            if on_job:
                on_job("done", entry, outcome)
        models.end_group()
    models.release()
    report.jobs = [outcomes[entry.index] for entry in entries]
    report.wall_seconds = time.perf_counter() - started
    return report


def _unrunnable(entries: list[BatchEntry]) -> dict[int, JobOutcome]:
    """The outcomes decided before anything runs: invalid jobs, and outputs that exist (skipped)."""
    outcomes: dict[int, JobOutcome] = {}
    for entry in entries:
        if entry.error is not None:
            outcomes[entry.index] = JobOutcome(entry.index, str(entry.output) if entry.output else None, "invalid",
                                               error=f"{entry.where}: {entry.error}", exit_code=2)
        elif entry.skip:
            outcomes[entry.index] = JobOutcome(entry.index, str(entry.output), "skipped",
                                               error="output exists (use --overwrite to replace it)")
    return outcomes


def _model_groups(runnable: list[BatchEntry]) -> list[list[BatchEntry]]:
    """The jobs grouped by their driver's models key (one model set per group), in first-appearance order. Within a
    group the text encoder is kept while a later job has a prompt not yet encoded."""
    groups: dict[tuple, list[BatchEntry]] = {}
    for entry in runnable:
        groups.setdefault(entry.models_key, []).append(entry)
    for group in groups.values():
        seen: set[tuple[str, str]] = set()
        for position, entry in enumerate(group):
            seen.add((entry.job.prompt, entry.job.negative_prompt))
            entry.job.keep_text_encoder = any((later.job.prompt, later.job.negative_prompt) not in seen
                                              for later in group[position + 1 :])
    return list(groups.values())


class ModelSets:
    """The one model set a batch holds: loaded for a group's first job, kept for the rest of the group, and offered
    to the next group's driver to adapt (`reuse`, e.g. only a changed checkpoint reloaded) before it is freed."""

    def __init__(self, report: BatchReport) -> None:
        self.report = report
        self.current = None  # (driver, models_key, models) of this group, once loaded
        self.group: list[BatchEntry] = []  # the jobs that share this group's models
        self.previous = None  # the same of the last group, until the next group has its models
        self.error: BaseException | None = None  # this group's load failure: every job of the group fails with it

    def for_job(self, entry: BatchEntry, driver, inputs):
        if self.error is not None:
            raise self.error
        if self.current is None:
            try:
                self.current = (driver, entry.models_key, self._load(entry, driver, inputs))
            except Exception as error:
                self.error = error
                raise
        return self.current[2]

    def _load(self, entry: BatchEntry, driver, inputs):
        from avatarcli.runtime import resolve_device, resolve_dtype

        device = resolve_device(entry.job.device)
        dtype = resolve_dtype(entry.job.dtype, device)
        job = self._compile_decided(entry, driver, device)
        earlier, self.previous = self.previous, None
        models = None
        if earlier is not None and earlier[0] is driver and hasattr(driver, "reuse"):
            models = driver.reuse(earlier[2], earlier[1], job, inputs, device, dtype)
            self.report.partial_loads += models is not None
        earlier = None
        _free_memory()  # the earlier group's models, unless reused, before the next ones load
        if models is None:
            models = driver.load(job, inputs, device, dtype)
            self.report.model_loads += 1
        return models

    def _compile_decided(self, entry: BatchEntry, driver, device):
        """The job the group's models load with, its --compile auto decided once for all the jobs sharing them: over
        their window-steps together, since one compile serves them all (avatarcli/compilation.py)."""
        from avatarcli.compilation import decided, planned_window_steps

        group = self.group or [entry]
        window_steps = sum(planned_window_steps(driver, e.job, e.frames) for e in group)
        return decided(entry.job, device, window_steps, driver.compile_break_even(entry.job))

    def begin_group(self, group: list[BatchEntry]) -> None:
        self.group = group

    def end_group(self) -> None:
        if self.current is not None:
            self.previous = self.current
        self.current, self.error = None, None

    def release(self) -> None:
        self.current = self.previous = None
        _free_memory()


def _run_entry(entry: BatchEntry, models: ModelSets, stop) -> JobOutcome:
    """One job, its failure (or interruption) turned into its outcome."""
    from avatarcli.pipeline import animate, prepare
    from avatarcli.resume import AnimateInterrupted

    tick = time.perf_counter()
    try:
        prepared = prepare(entry.job)
        result = animate(entry.job, models=models.for_job(entry, *prepared), prepared=prepared, stop=stop)
        outcome = JobOutcome(entry.index, str(result.output), "ok", frames=result.frames, nfe=result.nfe,
                             resumed_from_frame=result.resumed_from_frame)
    except AnimateInterrupted as error:
        outcome = JobOutcome(entry.index, str(entry.output), "interrupted", frames=error.frames,
                             error=" ".join(str(error).split()), exit_code=130)
    except Exception as error:  # noqa: BLE001 - reported per job; the batch decides whether to go on
        message = str(error) if isinstance(error, AvatarError) else f"{type(error).__name__}: {error}"
        outcome = JobOutcome(entry.index, str(entry.output), "failed", error=" ".join(message.split()),
                             exit_code=_failure_code(error))
    outcome.seconds = round(time.perf_counter() - tick, 3)
    return outcome


def write_report(report: BatchReport, path: Path) -> None:
    """The JSON report, written to a temp file and renamed."""
    import os

    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(report.as_dict(), indent=1) + "\n", encoding="utf-8")
    os.replace(temp, path)
