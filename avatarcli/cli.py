"""The `avatarcli` command: parses flags, builds a job, calls the library, turns results into output and exit codes.

Exit codes: 0 ok, 1 a bug, 2 bad input or usage, 3 environment (network, offline without weights, missing or corrupt
weights, ffmpeg, out of memory, disk full), 130 interrupted; always one line on stderr, a traceback only with --debug
(or AVATARCLI_DEBUG=1). torch, diffusers and transformers are imported only inside the commands that use them, so
`--help` and rejected input stay fast.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand

from avatarcli.cli_signals import progress_bar as _progress_bar, stop_on_signals

from avatarcli.errors import EXIT_BUG, EXIT_ENVIRONMENT, EXIT_INTERRUPTED, EXIT_USAGE, AvatarError, \
    EnvironmentProblem, Interrupted, as_environment_problem, exit_code_for

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Talking-portrait video from one image and speech, streamed to mp4.")
err = Console(stderr=True)
out = Console()


class UserError(AvatarError):
    """Raised inside commands for exit code 2 (bad flag values)."""


def _show_version(value: bool) -> None:
    if value:
        from avatarcli import __version__

        print(f"avatarcli {__version__}")
        raise typer.Exit(0)


@app.callback(epilog="Exit codes: 0 ok, 1 bug, 2 bad input or usage, 3 environment (network, weights, ffmpeg, "
                     "memory, disk), 130 interrupted.")
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback when something fails."),
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Talking-portrait video from one image and speech, streamed to mp4."""
    # --debug is acted on by main(), which also accepts it after the command name.


def _opt(name: str, default=None, *short: str, **extra):
    """A typer option for an `animate` option of avatarcli/options.py, with its help text from there."""
    from avatarcli.options import HELP, cli_name

    return typer.Option(default, cli_name(name), *short, help=HELP[name], **extra)


@app.command()
def animate(
    portrait: Path = typer.Argument(..., help="Portrait image (any format Pillow reads)."),
    audio: Optional[Path] = _opt("audio", None, "-a"),
    driving: Optional[Path] = _opt("driving", None, "-d"),
    output: Optional[Path] = _opt("output", None, "-o"),
    preset: str = _opt("preset", "balanced", "-p"),
    prompt: Optional[str] = _opt("prompt"),
    seed: Optional[int] = _opt("seed"),
    size: Optional[str] = _opt("size"),
    fps: Optional[int] = _opt("fps"),
    steps: Optional[int] = _opt("steps"),
    guidance: Optional[str] = _opt("guidance"),
    emo_scale: Optional[float] = _opt("emo_scale"),
    text_scale: Optional[float] = _opt("text_scale"),
    audio_scale: Optional[float] = _opt("audio_scale"),
    overlap: Optional[int] = _opt("overlap"),
    blend: Optional[str] = _opt("blend"),
    checkpoint: Optional[str] = _opt("checkpoint"),
    weights: Optional[Path] = _opt("weights"),
    offload: str = _opt("offload", "none"),
    weights_dtype: str = _opt("weights_dtype", "auto"),
    device: str = _opt("device", "auto"),
    dtype: str = _opt("dtype", "auto"),
    vae_dtype: str = _opt("vae_dtype", "auto"),
    decoder: Optional[str] = _opt("decoder"),
    crf: int = _opt("crf", 18),
    overlap_decode: str = _opt("overlap_decode", "auto"),
    precision: str = _opt("precision", "auto"),
    compile: bool = _opt("compile", False),
    no_audio: bool = _opt("no_audio", False),
    predict: Optional[bool] = typer.Option(None, "--predict/--no-predict", help="Step prediction on/off [default: "
                                           "preset]."),
    predict_order: Optional[int] = _opt("predict_order"),
    predict_max: Optional[int] = _opt("predict_max"),
    predict_tolerance: Optional[float] = _opt("predict_tolerance"),
    predict_layer_ratio: Optional[float] = _opt("predict_layer_ratio"),
    model: str = _opt("model", "stableavatar"),
    context_parallel: int = _opt("context_parallel", 1),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary line on stdout."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run saved beside the output."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="Split the windows over N processes, one per GPU "
                                       "(with --device cpu: N CPU processes) [default: 1, or torchrun's]."),
):
    """Animate PORTRAIT speaking --audio, or mimicking a --driving face video: an mp4 as long as the input."""
    from avatarcli.options import OPTIONS, build_job
    from avatarcli.parallel import rank, world_size
    from avatarcli.pipeline import animate as run, prepare

    values = {name: value for name, value in locals().items() if name in OPTIONS}
    processes = _processes(gpus)
    job = build_job(values, resume=resume, processes=processes)
    prepared = prepare(job)  # bad input fails here, before torch is imported and any model loads
    for warning in prepared[1].warnings if rank() == 0 else []:
        err.print(f"warning: {warning}", markup=False, highlight=False)
    if weights is not None and not weights.expanduser().is_dir():
        raise EnvironmentProblem(f"--weights folder {weights} does not exist: check the path, or drop --weights to "
                                 f"use (and fill) the Hub cache")
    if processes > 1 and world_size() == 1:  # start the launch: these same arguments, in `gpus` processes
        _check_gpus(gpus, device)
        from avatarcli.parallel.launch import launch

        raise typer.Exit(launch(gpus, _ARGV))
    quiet = quiet or rank() != 0  # one progress bar and one summary: rank 0's
    as_json = as_json and rank() == 0
    result = _run_job(run, job, prepared, quiet or as_json)
    if rank() == 0:
        _report(result, as_json, quiet)


def _processes(gpus: int | None) -> int:
    """The processes that will share the job: --gpus, or the launch this process is part of."""
    from avatarcli.parallel import world_size

    if gpus is not None and gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}")
    if gpus is not None and world_size() > 1 and gpus != world_size():
        raise UserError(f"--gpus {gpus} inside a launch of {world_size()} processes: drop --gpus under torchrun")
    return max(gpus or 1, world_size())


def _run_job(run, job, prepared, silent: bool):
    """`animate` with Ctrl-C / SIGTERM turned into a saved stop, and a progress bar unless `silent`."""
    try:
        with stop_on_signals() as stop:
            if silent:
                return run(job, prepared=prepared, stop=stop)
            with _progress_bar(prepared[1].fps) as update:
                return run(job, on_progress=update, prepared=prepared, stop=stop)
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once; the sink removed its partial file
        raise Interrupted(f"interrupted: nothing written to {job.output}") from None


def _report(result, as_json: bool, quiet: bool) -> None:
    summary = {
        "output": str(result.output), "driver": result.driver, "frames": result.frames, "fps": result.fps,
        "size": f"{result.width}x{result.height}", "video_seconds": round(result.video_seconds, 3),
        "wall_seconds": round(result.wall_seconds, 3), "windows": result.windows, "steps": result.steps,
        "nfe": result.nfe, "world_size": result.world_size, "nfe_per_rank": result.nfe_per_rank,
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
        "peak_gpu_bytes": result.peak_gpu_bytes, "peak_rss_bytes": result.peak_rss_bytes,
        "resumed_from_frame": result.resumed_from_frame,
    }
    if as_json:
        print(json.dumps(summary), flush=True)
    elif not quiet:
        err.print(f"wrote {result.output}: {result.frames} frames, {result.video_seconds:.2f} s of video "
                  f"in {result.wall_seconds:.1f} s")


def _check_gpus(gpus: int, device: str) -> None:
    """--gpus N needs N GPUs unless the job runs on the CPU."""
    if device == "cpu":
        return
    import torch

    found = torch.cuda.device_count()
    if found < gpus:
        raise EnvironmentProblem(f"--gpus {gpus} needs {gpus} CUDA GPUs, {found} visible; use fewer, or --device cpu "
                                 f"for CPU processes")
    if device not in ("auto", "cuda"):
        raise UserError(f"--device {device} picks one GPU; with --gpus use --device cuda (or auto)")


class _DownloadCommand(TyperCommand):
    """`download --help` ends with the downloadable models, read from the hub's registry when help is shown."""

    def format_epilog(self, ctx, formatter) -> None:
        from avatarcli.hub import MODELS

        with formatter.section("Models"):
            formatter.write_dl([(name, spec.description) for name, spec in sorted(MODELS.items())])
        super().format_epilog(ctx, formatter)


@app.command(cls=_DownloadCommand)
def download(
    model: str = typer.Argument("stableavatar", help="Model to fetch (one of the models listed below)."),
    directory: Optional[Path] = typer.Option(None, "--dir", help="Put the files here instead of the HF cache."),
):
    """Fetch only the files the pipeline uses (resumable; honours HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE)."""
    from avatarcli.hub import download as fetch

    path = fetch(model, local_dir=directory, progress=True)
    err.print(f"{model}: {path}")
    print(path)


@app.command()
def presets(name: Optional[str] = typer.Argument(None, help="Show one preset in full.")):
    """List the presets, or show one."""
    import dataclasses

    from avatarcli.presets import list_presets, load_preset

    if name:
        for key, value in dataclasses.asdict(load_preset(name)).items():
            if key == "seed" and value is None:
                value = "not set (--seed, else 42)"
            out.print(f"{key}: {value}", markup=False, highlight=False)
        return
    table = Table("name", "steps", "guidance", "overlap", "blend", "size", "description")
    for p in list_presets():
        table.add_row(p.name, str(p.steps), p.guidance, str(p.overlap), p.blend, p.size, p.description)
    out.print(table)


@app.command()
def doctor(weights: Optional[Path] = typer.Option(None, "--weights", help="A weights folder to check.")):
    """Check torch, the device, ffmpeg, weights and free memory."""
    from avatarcli.doctor import doctor_report

    table = Table("check", "status", "detail")
    failed = False
    for check, status, detail in doctor_report(weights):
        colour = {"ok": "green", "warn": "yellow", "fail": "red"}.get(status, "white")
        table.add_row(check, f"[{colour}]{status}[/{colour}]", detail)
        failed |= status == "fail"
    out.print(table)
    if failed:
        raise typer.Exit(EXIT_ENVIRONMENT)


def _register_optional_commands() -> None:
    from avatarcli.cli_demo import register as register_demo

    register_demo(app)
    try:
        from avatarcli.cli_sfd import register
    except ImportError:
        return
    register(app)


from avatarcli.cli_batch import register as _register_batch  # noqa: E402

_register_batch(app)


_register_optional_commands()
from avatarcli.cli_eval import register as _register_eval  # noqa: E402

_register_eval(app)


_ARGV: list[str] = []  # the arguments of this command line: `--gpus N` starts N processes with them


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (see the module docstring)."""
    args = list(argv if argv is not None else sys.argv[1:])
    # --debug is a global option; accept it anywhere on the line (people add it at the end of a failed command).
    debug = "--debug" in args or bool(os.environ.get("AVATARCLI_DEBUG"))
    if "--debug" in args:
        args = ["--debug", *(a for a in args if a != "--debug")]
    global _ARGV
    _ARGV = args
    joined = _in_process_group()
    try:
        return _run(args, debug)
    finally:
        if not joined and _in_process_group():  # a process of a launch leaves the group its command joined
            from avatarcli.parallel.group import leave

            leave()


def _in_process_group() -> bool:
    dist = sys.modules.get("torch.distributed")
    if dist is None:  # never imported: not in a group (and torch stays unimported)
        return False
    try:
        return bool(dist.is_available() and dist.is_initialized())
    except Exception:  # noqa: BLE001 - a torch whose import a Ctrl-C cut short: not in a group
        return False


def _say(line: str, code: int) -> None:
    """One line on stderr. In a launch of several processes, rank 0 alone reports what every rank meets alike
    (bad input, an interruption); other failures name the rank."""
    from avatarcli.parallel import rank, world_size

    if world_size() > 1 and rank() != 0:
        if code in (EXIT_USAGE, EXIT_INTERRUPTED):
            return
        line = f"rank {rank()}: {line}"
    print(line, file=sys.stderr)


def _run(args: list[str], debug: bool) -> int:
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="avatarcli", standalone_mode=False)
    except (AvatarError, UserError) as error:
        if debug:
            traceback.print_exc()
        _say(f"error: {_one_line(error)}", exit_code_for(error))
        return exit_code_for(error)
    except Interrupted as error:
        _say(_one_line(error), EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _say("interrupted", EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except Exception as error:
        # Click's exceptions (typer may vendor its own copy, so they are recognised by shape, not class).
        name = type(error).__name__
        if name == "Exit":
            return error.exit_code
        if name == "Abort":
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        if hasattr(error, "format_message") and isinstance(getattr(error, "exit_code", None), int):
            print(f"error: {_one_line(error.format_message())} (see --help)", file=sys.stderr)
            return error.exit_code
        if debug:
            traceback.print_exc()
        problem = as_environment_problem(error)  # out of memory, disk full
        if problem is not None:
            _say(f"error: {_one_line(problem)}", exit_code_for(problem))
            return exit_code_for(problem)
        _say(f"internal error: {name}: {_one_line(error)} (run with --debug for the traceback)", EXIT_BUG)
        return EXIT_BUG
    # Without standalone mode typer returns the code of typer.Exit (and 130 for a Ctrl-C it caught) instead of
    # exiting; a command that finishes normally returns None.
    if code == EXIT_INTERRUPTED:
        print("interrupted", file=sys.stderr)
    return code if isinstance(code, int) else 0
