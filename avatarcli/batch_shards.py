"""Job arrays: one manifest split over N independent `avatarcli batch` runs (SLURM array tasks, or any scheduler's),
and their reports joined into the report of one run.

Shard K of N (0-based) takes the jobs at manifest positions p (1-based) with (p - 1) mod N = K: the split needs no
coordination, stays the same when jobs are appended, and spreads neighbouring (often similar) jobs over the shards.
Without `--shard`, a SLURM array task takes its shard from SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (counted
from SLURM_ARRAY_TASK_MIN in steps of SLURM_ARRAY_TASK_STEP, so `--array=1-8` and `--array=0-14:2` work as well).
Each shard writes its own report, REPORT.shard-K-of-N.json; `merge_reports` checks that the shards cover the
manifest exactly once and joins them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from avatarcli.errors import AvatarError


@dataclass(frozen=True)
class Shard:
    index: int  # K, 0-based
    count: int  # N

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def takes(self, position: int) -> bool:
        """Whether the job at 1-based manifest `position` is this shard's."""
        return (position - 1) % self.count == self.index

    def report_path(self, report: Path) -> Path:
        """This shard's report beside `report`: batch.json -> batch.shard-1-of-3.json."""
        report = Path(report)
        return report.with_name(f"{report.stem}.shard-{self.index}-of-{self.count}{report.suffix or '.json'}")


def parse_shard(text: str) -> Shard:
    """`--shard K/N` (K counted from 0). AvatarError for anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise AvatarError(f"--shard {text}: give K/N, shard K of N counted from 0 (e.g. --shard 0/3)")
    shard = Shard(int(match[1]), int(match[2]))
    if not 0 <= shard.index < shard.count:
        raise AvatarError(f"--shard {text}: K counts from 0 to N-1 (shards 0/{max(shard.count, 1)} to "
                          f"{max(shard.count, 1) - 1}/{max(shard.count, 1)})")
    return shard


def shard_from_environment(environ: Mapping[str, str] = os.environ) -> Shard | None:
    """The shard of a SLURM array task, None outside one."""
    if "SLURM_ARRAY_TASK_ID" not in environ or "SLURM_ARRAY_TASK_COUNT" not in environ:
        return None
    try:
        task, count = int(environ["SLURM_ARRAY_TASK_ID"]), int(environ["SLURM_ARRAY_TASK_COUNT"])
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = int(environ.get("SLURM_ARRAY_TASK_STEP", "1") or "1")
    except ValueError as error:
        raise AvatarError(f"the SLURM array variables are not numbers ({error}): give --shard K/N") from error
    index, off_step = divmod(task - first, max(step, 1))
    if off_step or not 0 <= index < count:
        raise AvatarError(f"SLURM array task {task} is not one of {count} tasks from {first} in steps of {step} "
                          f"(an --array list?): give --shard K/N")
    return Shard(index, count)


def default_report(manifest: Path) -> Path:
    """Where a shard's report goes without --report: beside the manifest, JOBS.report.json (then shard-suffixed)."""
    manifest = Path(manifest)
    return manifest.with_name(f"{manifest.stem}.report.json")


def merge_reports(manifest: Path, report: Path):
    """The shard reports of `report` (REPORT.shard-K-of-N.json) joined into one BatchReport: the jobs in manifest
    order, their counts and exit code as one run gives them, model loads added up, the wall time of the slowest
    shard. AvatarError when a shard's report is missing or the shards do not cover the manifest exactly once."""
    from avatarcli.batch import BatchReport, JobOutcome, read_manifest

    report = Path(report)
    found = _shard_reports(report)
    counts = sorted({shard.count for shard in found})
    if len(counts) != 1:
        raise AvatarError(f"the shard reports beside {report} come from splits into {' and '.join(map(str, counts))}: "
                          "delete the stale ones")
    count = counts[0]
    missing = [k for k in range(count) if Shard(k, count) not in found]
    if missing:
        shard = Shard(missing[0], count)
        raise AvatarError(f"shard {shard} has no report ({shard.report_path(report)}): run it (avatarcli batch "
                          f"{manifest} --shard {shard}) before merging")
    jobs: dict[int, JobOutcome] = {}
    merged = BatchReport(manifest=str(manifest), jobs=[])
    for shard, path in sorted(found.items(), key=lambda item: item[0].index):
        data = _read_report(path)
        if data.get("shard") != str(shard):
            raise AvatarError(f"{path} is the report of shard {data.get('shard')}, not {shard}: rename or delete it")
        for job in data["jobs"]:
            if not shard.takes(job["index"]) or job["index"] in jobs:
                raise AvatarError(f"{path} lists job {job['index']}, which is not shard {shard}'s")
            jobs[job["index"]] = JobOutcome(**job)
        merged.model_loads += data.get("model_loads", 0)
        merged.partial_loads += data.get("partial_loads", 0)
        merged.wall_seconds = max(merged.wall_seconds, data.get("wall_seconds", 0.0))
        merged.interrupted |= bool(data.get("interrupted"))
    total = len(read_manifest(manifest)[1])
    absent = [index for index in range(1, total + 1) if index not in jobs]
    if absent or len(jobs) != total:
        raise AvatarError(f"the shard reports of {report} do not cover {manifest}'s {total} jobs "
                          f"({f'job {absent[0]} is in none' if absent else 'they list more jobs'}): was the manifest "
                          "changed since? run the shards again")
    merged.jobs = [jobs[index] for index in sorted(jobs)]
    return merged


def _shard_reports(report: Path) -> dict[Shard, Path]:
    pattern = re.compile(rf"{re.escape(report.stem)}\.shard-(\d+)-of-(\d+){re.escape(report.suffix or '.json')}")
    found = {}
    folder = report.parent
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = pattern.fullmatch(path.name)
        if match:
            found[Shard(int(match[1]), int(match[2]))] = path
    if not found:
        example = Shard(0, 3).report_path(report).name.replace("0-of-3", "K-of-N")
        raise AvatarError(f"no shard reports ({example}) in {folder}: run the shards first, with the same --report")
    return found


def _read_report(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AvatarError(f"cannot read the shard report {path} ({error}); run that shard again") from error
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise AvatarError(f"{path} is not an avatarcli batch report; run that shard again")
    return data
