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

from avatarcli.cli_signals import interrupted_line, interrupts_for_command, progress_bar as _progress_bar, \
    say_interrupted, stop_on_signals

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


def _limits() -> str:
    from avatarcli.limits import limits_help

    return limits_help()


def _help(name: str) -> str:
    from avatarcli.options import HELP

    return HELP[name]


_TRACE_HELP = ("Record the run's DiT forwards (window, step, guidance branches; predicted steps) to FILE, JSON Lines: "
               "benchmarks/bench_animate.py --replay FILE times them at full size.")


@app.command(epilog=_limits())
def animate(
    portrait: Path = typer.Argument(..., metavar="PORTRAIT", help=_help("portrait")),
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
    numerics: Optional[str] = _opt("numerics"),
    compile: str = _opt("compile", "auto", metavar="[auto|on|off]"),
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
    trace: Optional[Path] = typer.Option(None, "--trace", metavar="FILE", help=_TRACE_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run saved beside the output."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output (else exit 2)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="Split the windows over N processes, one per GPU "
                                       "(with --device cpu: N CPU processes) [default: 1, or torchrun's]."),
):
    """Animate PORTRAIT speaking --audio, or mimicking a --driving face video: an mp4 as long as the input."""
    from avatarcli.options import OPTIONS, build_job
    from avatarcli.parallel import rank
    from avatarcli.pipeline import animate as run, prepare

    values = {name: value for name, value in locals().items() if name in OPTIONS}
    processes = _processes(gpus)
    job = build_job(values, resume=resume, processes=processes)
    _check_output(job, overwrite)
    prepared = prepare(job)  # bad input fails here, before torch is imported and any model loads
    _warn(prepared[1].warnings)
    _check_weights(weights)
    _launch_if_asked(processes, gpus, device)
    quiet = quiet or rank() != 0  # one progress bar and one summary: rank 0's
    as_json = as_json and rank() == 0
    recorder = _recorder(trace, processes)
    result = _run_job(run, job, prepared, quiet or as_json, recorder)
    _write_trace(recorder, trace)
    if rank() == 0:
        _report(result, as_json, quiet, added_mp4=output is not None and job.output.name != output.name)


def _warn(warnings: list[str]) -> None:
    """The input's warnings on stderr, from one process of a launch."""
    from avatarcli.parallel import rank

    for warning in warnings if rank() == 0 else []:
        err.print(f"warning: {warning}", markup=False, highlight=False)


def _launch_if_asked(processes: int, gpus: int | None, device: str) -> None:
    """With --gpus N in a process not yet part of a launch: start the launch (these same arguments in N processes)
    and exit with its code."""
    from avatarcli.parallel import world_size

    if processes > 1 and world_size() == 1:
        _check_gpus(gpus, device)
        from avatarcli.parallel.launch import launch

        raise typer.Exit(launch(gpus, _ARGV))


def _write_trace(recorder, path: Path | None) -> None:
    if recorder is not None:
        from avatarcli.sampling.trace import write_trace

        write_trace(recorder.trace, path)


def _processes(gpus: int | None) -> int:
    """The processes that will share the job: --gpus, or the launch this process is part of."""
    from avatarcli.parallel import world_size

    if gpus is not None and gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}")
    if gpus is not None and world_size() > 1 and gpus != world_size():
        raise UserError(f"--gpus {gpus} inside a launch of {world_size()} processes: drop --gpus under torchrun")
    return max(gpus or 1, world_size())


def _recorder(trace: Path | None, processes: int):
    """The recorder of --trace FILE (the forwards of one process); None without it."""
    if trace is None:
        return None
    if processes > 1:
        raise UserError("--trace records the forwards of one process: drop --gpus (or torchrun)")
    if trace.is_dir() or not trace.parent.is_dir():
        raise UserError(f"--trace {trace}: give a file in an existing folder")
    from avatarcli.sampling.trace import TraceRecorder

    return TraceRecorder()


def _run_job(run, job, prepared, silent: bool, trace=None):
    """`animate` with Ctrl-C / SIGTERM turned into a stop (cli_signals.py: saved at the next window-step, or at
    once), and the stages shown (a status line, then the progress bar) unless `silent`."""
    guard = stop_on_signals(job.output, stage="start")
    try:
        with guard as stop, _progress_bar(prepared[1].fps, guard, silent) as update:
            return run(job, on_progress=update, prepared=prepared, stop=stop, trace=trace)
    except KeyboardInterrupt:  # stopped at once: the sink removed its partial file, a saved run stays
        raise Interrupted(guard.line()) from None


def _check_weights(weights: Path | None) -> None:
    """A --weights folder that is not there (exit 3) or is a file (exit 2): said before anything loads."""
    if weights is not None:
        from avatarcli.hub import check_weights_dir

        check_weights_dir(weights)


def _check_output(job, overwrite: bool) -> None:
    """An existing output is replaced only with --overwrite (or by a --resume of the run saved beside it)."""
    from avatarcli.options import existing_output

    if existing_output(job, overwrite):
        raise UserError(f"{job.output} exists: add --overwrite to replace it, or choose another -o")


def _report(result, as_json: bool, quiet: bool, added_mp4: bool = False) -> None:
    summary = {
        "output": str(result.output), "driver": result.driver, "frames": result.frames, "fps": result.fps,
        "size": f"{result.width}x{result.height}", "video_seconds": round(result.video_seconds, 3),
        "wall_seconds": round(result.wall_seconds, 3), "windows": result.windows, "steps": result.steps,
        "nfe": result.nfe, "branch_forwards": result.branch_forwards, "compiled": result.compiled,
        "world_size": result.world_size,
        "nfe_per_rank": result.nfe_per_rank,
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
        "background_timings": {k: round(v, 3) for k, v in result.background_timings.items()},
        "peak_gpu_bytes": result.peak_gpu_bytes, "peak_rss_bytes": result.peak_rss_bytes,
        "offload": result.offload, "decode_mode": result.decode_mode, "encode_mode": result.encode_mode,
        "branch_batch": result.branch_batch,
        "resumed_from_frame": result.resumed_from_frame,
    }
    if as_json:
        print(json.dumps(summary), flush=True)
    elif not quiet:
        added = " (.mp4 added to the name given)" if added_mp4 else ""
        compiled = ", DiT blocks compiled" if result.compiled else ""
        err.print(f"wrote {result.output}{added}: {result.frames} frames, {result.video_seconds:.2f} s of video "
                  f"in {result.wall_seconds:.1f} s{compiled}", markup=False, highlight=False, soft_wrap=True)


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


class _Usage(TyperCommand):
    """The usage line names arguments by their metavar, PORTRAIT or [NAME], not typer's `{portrait}`."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]


class _DownloadCommand(_Usage):
    """`download --help` ends with the downloadable models, read from the hub's registry when help is shown."""

    def format_epilog(self, ctx, formatter) -> None:
        from avatarcli.hub import MODELS

        with formatter.section("Models"):
            formatter.write_dl([(name, spec.description) for name, spec in sorted(MODELS.items())])
        super().format_epilog(ctx, formatter)


@app.command(cls=_DownloadCommand)
def download(
    model: str = typer.Argument("stableavatar", metavar="MODEL", help="Model to fetch (one of the models listed "
                                "below)."),
    directory: Optional[Path] = typer.Option(None, "--dir", help="Put the files here instead of the HF cache."),
):
    """Fetch only the files the pipeline uses (resumable; honours HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE)."""
    from avatarcli.hub import download as fetch

    path = fetch(model, local_dir=directory, progress=True)
    err.print(f"{model}: {path}")
    print(path)


@app.command()
def presets(name: Optional[str] = typer.Argument(None, metavar="NAME", help="Show one preset in full."),
            as_yaml: bool = typer.Option(False, "--yaml", help="Show it as a preset file (loads back with "
                                                               "--preset FILE.yaml).")):
    """List the presets, or show one."""
    import dataclasses

    from avatarcli.presets import list_presets, load_preset, preset_yaml

    if name and as_yaml:
        sys.stdout.write(preset_yaml(load_preset(name)))
        return
    if as_yaml:
        raise UserError("--yaml shows one preset: give its NAME")
    if name:
        for key, value in dataclasses.asdict(load_preset(name)).items():
            if key == "seed" and value is None:
                value = "not set (--seed, else 42)"
            elif value is None:  # an optional section the preset leaves out (e.g. guidance_reuse)
                value = "off"
            out.print(f"{key}: {value}", markup=False, highlight=False)
        return
    table = Table("name", "steps", "guidance", "overlap", "blend", "size", "description")
    for p in list_presets():
        table.add_row(p.name, str(p.steps), p.guidance, str(p.overlap), p.blend, p.size, p.description)
    out.print(table)


@app.command()
def doctor(weights: Optional[Path] = typer.Option(None, "--weights", help="A weights folder to check."),
           models: list[str] = typer.Option(["stableavatar"], "--model", metavar="NAME",
                                            help="A model you mean to use (repeatable): the disk check compares "
                                                 "free space with those not yet downloaded.")):
    """Check torch, the device, ffmpeg, weights and free memory."""
    from avatarcli.doctor import doctor_report

    table = Table("check", "status", "detail")
    failed = False
    for check, status, detail in doctor_report(weights, models):
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
from avatarcli.cli_ui import register as _register_ui  # noqa: E402

_register_eval(app)
_register_ui(app)
for _command in app.registered_commands:  # typer's own command class gets the plain usage line
    _command.cls = _Usage if _command.cls in (None, TyperCommand) else _command.cls


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
    args = _bare_compile(args)
    global _ARGV
    _ARGV = args
    with interrupts_for_command(console=argv is None) as command:  # SIGTERM during start-up is exit 130 too
        joined = _in_process_group()
        try:
            return command.ended(_run(args, debug))
        finally:
            if not joined and _in_process_group():  # a process of a launch leaves the group its command joined
                from avatarcli.parallel.group import leave

                leave()


def _bare_compile(args: list[str]) -> list[str]:
    """`animate --compile` without a mode means on: it was a flag before it took auto, on or off."""
    from avatarcli.compilation import COMPILE_MODES

    if next((a for a in args if not a.startswith("-")), None) != "animate":
        return args
    spelled = []
    for i, arg in enumerate(args):
        spelled.append(arg)
        if arg == "--compile" and (i + 1 == len(args) or args[i + 1] not in COMPILE_MODES):
            spelled.append("on")
    return spelled


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
    if code == EXIT_INTERRUPTED:
        say_interrupted(line)  # once: a stop that ends the process itself may have said it already
    else:
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
        _say(interrupted_line(), EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except Exception as error:
        # Click's exceptions (typer may vendor its own copy, so they are recognised by shape, not class).
        name = type(error).__name__
        if name == "Exit":
            return error.exit_code
        if name == "Abort":  # click's form of a KeyboardInterrupt
            _say(interrupted_line(), EXIT_INTERRUPTED)
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
        _say(interrupted_line(), EXIT_INTERRUPTED)
    return code if isinstance(code, int) else 0
