"""`avatarcli batch`: run a manifest of animate jobs with the models loaded once (see avatarcli/batch.py)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand

DEFAULT_CLUSTER = ""  # the value of a bare --ray: RAY_ADDRESS, a cluster on this machine, else a new local one


class BatchCommand(TyperCommand):
    """`--ray` takes an optional ADDRESS: given alone (last, or before another option) it means the default cluster.
    The usage line names the manifest MANIFEST, not typer's `{MANIFEST}` (as avatarcli/cli.py's other commands)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        given = list(args)
        for position in reversed(range(len(given))):
            following = given[position + 1] if position + 1 < len(given) else None
            if given[position] == "--ray" and (following is None or following.startswith("-")):
                given.insert(position + 1, DEFAULT_CLUSTER)
        return super().parse_args(ctx, given)

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]


def register(app: typer.Typer) -> None:
    @app.command("batch", cls=BatchCommand)
    def batch(
        manifest: Path = typer.Argument(..., metavar="MANIFEST",
                                        help="Jobs: YAML (a list, or defaults + jobs) or JSON Lines."),
        continue_on_error: bool = typer.Option(False, "--continue-on-error",
                                               help="Run the valid jobs even if others are invalid or fail."),
        report: Path = typer.Option(None, "--report", help="Write the JSON report (per job: status, output, "
                                                           "seconds, frames, nfe, error) to this file."),
        as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON line on stdout."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Redo jobs whose output already exists."),
        resume: bool = typer.Option(False, "--resume", help="Continue jobs that were interrupted."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-job lines and no table."),
        device: Optional[str] = typer.Option(None, "--device", help="Device of every job, in place of the "
                                             "manifest's: auto, cpu, cuda or cuda:N."),
        shard: Optional[str] = typer.Option(None, "--shard", metavar="K/N", help="Run only shard K of N (K from 0; "
                                            "default: a SLURM array task's); its report is REPORT.shard-K-of-N.json "
                                            "(REPORT: --report, else MANIFEST.report.json)."),
        merge_reports: bool = typer.Option(False, "--merge-reports", help="Run nothing: join the shard reports of "
                                           "MANIFEST into one (--report, --json, the table, the exit code)."),
        ray: Optional[str] = typer.Option(None, "--ray", metavar="[ADDRESS]", help="Run the jobs on a Ray cluster "
                                          "(ADDRESS, else RAY_ADDRESS, this machine's, or a new local one): one actor "
                                          "per GPU, or per CPU slot for --device cpu. Needs avatarcli[ray]."),
    ) -> None:
        """Run many animate jobs from MANIFEST; models load once for the jobs that share them."""
        from avatarcli.errors import AvatarError
        from avatarcli.parallel import world_size

        if world_size() > 1:
            raise AvatarError("avatarcli batch runs in one process: start it without torchrun (animate takes --gpus)")
        if merge_reports:
            if shard is not None or ray is not None:
                raise AvatarError("--merge-reports runs nothing: drop --shard and --ray")
            return merged(manifest, report, as_json, quiet)
        if ray is not None:
            from avatarcli.batch_ray import import_ray

            import_ray()  # a missing extra: exit 3 before anything else

        from avatarcli.batch import run_batch, validate
        from avatarcli.batch_shards import default_report, parse_shard, shard_from_environment
        from avatarcli.cli_signals import stop_on_signals

        part = parse_shard(shard) if shard is not None else shard_from_environment()
        if part is not None:
            report = part.report_path(report or default_report(manifest))
        entries = validate(manifest, overwrite=overwrite, resume=resume, shard=part,
                           overrides={"device": device} if device is not None else None)
        if any(entry.error is not None for entry in entries) and not continue_on_error:
            refuse_invalid(manifest, entries, report, part)
        lines = JobLines(None if part else len(entries), silent=quiet or as_json)
        with stop_on_signals() as stop:
            if ray is None:
                result = run_batch(manifest, entries, continue_on_error=continue_on_error, stop=stop, on_job=lines)
            else:
                from avatarcli.batch_ray import run_on_cluster

                with contextlib.redirect_stdout(sys.stderr):  # Ray's own notices (an actor died): stdout is --json's
                    result = run_on_cluster(ray or None, manifest, entries, continue_on_error=continue_on_error,
                                            stop=stop, on_job=lines)
        result.shard = None if part is None else str(part)
        finish(result, report, as_json, quiet)


def merged(manifest: Path, report: Path | None, as_json: bool, quiet: bool) -> None:
    """The shard reports of MANIFEST joined: the table, --report and --json, the exit code of the whole batch."""
    from avatarcli.batch_shards import default_report, merge_reports

    finish(merge_reports(manifest, report or default_report(manifest)), report, as_json, quiet)


def refuse_invalid(manifest: Path, entries, report: Path | None, shard=None) -> None:
    """Every invalid job on its own line, the report if asked for, exit 2: nothing runs."""
    from avatarcli.batch import BatchReport, JobOutcome, write_report

    invalid = [entry for entry in entries if entry.error is not None]
    for entry in invalid:
        print(f"error: {manifest}: {entry.where}: {entry.error}", file=sys.stderr)
    if report is not None:
        write_report(BatchReport(str(manifest), [
            JobOutcome(e.index, str(e.output) if e.output else None, "invalid" if e.error else "not run",
                       error=f"{e.where}: {e.error}" if e.error else None, exit_code=2 if e.error else 0)
            for e in entries], shard=None if shard is None else str(shard)), report)
    print(f"error: {len(invalid)} of {len(entries)} jobs are invalid; nothing was run "
          "(--continue-on-error runs the valid ones)", file=sys.stderr)
    raise typer.Exit(2)


class JobLines:
    """A line per job started, and one per job that did not succeed or goes back to the queue (on stderr).
    `total`: the manifest's jobs (None for a shard: its jobs keep their manifest numbers)."""

    def __init__(self, total: int | None, silent: bool) -> None:
        from rich.console import Console

        self.total, self.silent, self.err = total, silent, Console(stderr=True)

    def __call__(self, event, entry, outcome) -> None:
        if self.silent:
            return
        if event == "start":
            of = "" if self.total is None else f"/{self.total}"
            self.err.print(f"[bold]job {entry.index}{of}[/bold] {entry.output}")
        elif outcome.status != "ok":
            self.err.print(f"  {outcome.status}: {outcome.error}")


def finish(result, report: Path | None, as_json: bool, quiet: bool) -> None:
    """The report, the summary table and the exit code of a batch that ran."""
    from rich.console import Console

    from avatarcli.batch import write_report

    if report is not None:
        write_report(result, report)
    if not quiet:
        Console(stderr=True).print(summary_table(result))
    if as_json:
        print(json.dumps(result.as_dict()), flush=True)
    if result.interrupted:
        from avatarcli.errors import Interrupted

        stopped = next(job for job in result.jobs if job.status == "interrupted")
        raise Interrupted(f"batch interrupted at job {stopped.index}: {stopped.error}")  # one line, exit 130
    if result.exit_code and not quiet:
        failed = sum(job.status in ("failed", "invalid") for job in result.jobs)
        print(f"error: {failed} of {len(result.jobs)} jobs failed", file=sys.stderr)
    raise typer.Exit(result.exit_code)


def summary_table(result):
    from rich.table import Table

    colours = {"ok": "green", "skipped": "cyan", "failed": "red", "invalid": "red", "interrupted": "yellow"}
    table = Table("#", "status", "output", "seconds", "frames", "nfe", "error",
                  title=f"batch: {result.model_loads} model load(s), {result.wall_seconds:.1f} s")
    for job in result.jobs:
        colour = colours.get(job.status, "white")
        table.add_row(str(job.index), f"[{colour}]{job.status}[/{colour}]", job.output or "", f"{job.seconds:.1f}",
                      str(job.frames), str(job.nfe), job.error or "")
    return table
