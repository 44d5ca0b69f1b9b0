"""`avatarcli batch`: run a manifest of animate jobs with the models loaded once (see avatarcli/batch.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("batch")
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
    ) -> None:
        """Run many animate jobs from MANIFEST; models load once for the jobs that share them."""
        from avatarcli.errors import AvatarError
        from avatarcli.parallel import world_size

        if world_size() > 1:
            raise AvatarError("avatarcli batch runs in one process: start it without torchrun (animate takes --gpus)")

        from avatarcli.batch import run_batch, validate
        from avatarcli.cli_signals import stop_on_signals

        entries = validate(manifest, overwrite=overwrite, resume=resume)
        if any(entry.error is not None for entry in entries) and not continue_on_error:
            refuse_invalid(manifest, entries, report)
        with stop_on_signals() as stop:
            result = run_batch(manifest, entries, continue_on_error=continue_on_error, stop=stop,
                               on_job=JobLines(len(entries), silent=quiet or as_json))
        finish(result, report, as_json, quiet)


def refuse_invalid(manifest: Path, entries, report: Path | None) -> None:
    """Every invalid job on its own line, the report if asked for, exit 2: nothing runs."""
    from avatarcli.batch import BatchReport, JobOutcome, write_report

    invalid = [entry for entry in entries if entry.error is not None]
    for entry in invalid:
        print(f"error: {manifest}: {entry.where}: {entry.error}", file=sys.stderr)
    if report is not None:
        write_report(BatchReport(str(manifest), [
            JobOutcome(e.index, str(e.output) if e.output else None, "invalid" if e.error else "not run",
                       error=f"{e.where}: {e.error}" if e.error else None, exit_code=2 if e.error else 0)
            for e in entries]), report)
    print(f"error: {len(invalid)} of {len(entries)} jobs are invalid; nothing was run "
          "(--continue-on-error runs the valid ones)", file=sys.stderr)
    raise typer.Exit(2)


class JobLines:
    """A line per job started, and one per job that did not succeed (on stderr)."""

    def __init__(self, total: int, silent: bool) -> None:
        from rich.console import Console

        self.total, self.silent, self.err = total, silent, Console(stderr=True)

    def __call__(self, event, entry, outcome) -> None:
        if self.silent:
            return
        if event == "start":
            self.err.print(f"[bold]job {entry.index}/{self.total}[/bold] {entry.output}")
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
