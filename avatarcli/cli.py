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


@app.command()
def animate(
    portrait: Path = typer.Argument(..., help="Portrait image (any format Pillow reads)."),
    audio: Optional[Path] = typer.Option(None, "--audio", "-a",
                                         help="Speech (audio driver): wav, mp3, m4a, flac, ogg or a video's audio track."),
    driving: Optional[Path] = typer.Option(None, "--driving", "-d",
                                           help="Driving face video (driving-video driver): expressions and head motion."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output mp4 [default: PORTRAIT name + .mp4]."),
    preset: str = typer.Option("balanced", "--preset", "-p", help="Preset name or YAML path (see `avatarcli presets`)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text prompt [default: 'The protagonist is talking.']."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed [default: preset's, else 42]."),
    size: Optional[str] = typer.Option(None, "--size", help="WxH (multiples of 16) or auto."),
    fps: Optional[int] = typer.Option(None, "--fps", help="Frames per second [default: 25; a --driving video's own]."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps."),
    guidance: Optional[str] = typer.Option(None, "--guidance",
                                           help="--audio: cfg (text/audio CFG) or ang (Audio Native Guidance); "
                                                "--driving: expression (expression CFG)."),
    emo_scale: Optional[float] = typer.Option(None, "--emo-scale", help="--driving: expression CFG scale [preset: 4]."),
    text_scale: Optional[float] = typer.Option(None, "--text-scale", help="Text CFG scale [preset]."),
    audio_scale: Optional[float] = typer.Option(None, "--audio-scale",
                                                help="--audio with cfg guidance: audio CFG scale [preset]."),
    overlap: Optional[int] = typer.Option(None, "--overlap", help="Latent frames shared by neighbouring windows."),
    blend: Optional[str] = typer.Option(None, "--blend", help="Overlap blend weights: log, uniform or linear."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="auto, square or rec-vec."),
    weights: Optional[Path] = typer.Option(None, "--weights",
                                           help="Folder with the model's published files (else the HF cache)."),
    offload: str = typer.Option("none", "--offload",
                                help="--driving: none, model, group or sequential CPU offload of the 14B DiT."),
    weights_dtype: str = typer.Option("auto", "--weights-dtype",
                                      help="--driving: auto or fp8 (fp8 weight storage, bf16 compute)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32."),
    vae_dtype: str = typer.Option("auto", "--vae-dtype", help="VAE decode precision: auto (bf16 on GPU), bf16, fp32."),
    decoder: Optional[str] = typer.Option(None, "--decoder",
                                          help="--driving: full (Wan VAE) or tiny (TAEHV fast_vae.pth) [preset]."),
    crf: int = typer.Option(18, "--crf", help="H.264 quality (lower is better, 0-51)."),
    overlap_decode: str = typer.Option("auto", "--overlap-decode",
                                       help="Decode finished frames while the DiT continues: auto (on a GPU), on, off."),
    precision: str = typer.Option("auto", "--precision",
                                  help="--audio: auto (--dtype) or fp8 (fp8 linear layers and self-attention; "
                                       "GPU of compute capability 8.9+, torchao, nvidia-cudnn-frontend)."),
    compile_dit: bool = typer.Option(False, "--compile", help="Compile the DiT blocks (GPU: ~30 s once, ~20% faster)."),
    no_audio: bool = typer.Option(False, "--no-audio", help="Write a silent video (no audio track muxed in)."),
    predict: Optional[bool] = typer.Option(None, "--predict/--no-predict",
                                           help="Step prediction on/off [default: preset]."),
    predict_order: Optional[int] = typer.Option(None, "--predict-order", help="Prediction: extrapolation order, 1-3."),
    predict_max: Optional[int] = typer.Option(None, "--predict-max",
                                              help="Prediction: at most K predicted steps in a row."),
    predict_tolerance: Optional[float] = typer.Option(None, "--predict-tolerance",
                                                      help="Prediction: relative latent error budget per jump."),
    predict_layer_ratio: Optional[float] = typer.Option(None, "--predict-layer-ratio",
                                                        help="Prediction: layer-signal growth limit (0: off)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary line on stdout."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run saved beside the output."),
    model: str = typer.Option("stableavatar", "--model", help="stableavatar, or demo: the small embedded model "
                              "trained on the synthetic world (no download; 128x128 unless --size)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="Split the windows over N processes, one per GPU "
                                       "(with --device cpu: N CPU processes) [default: 1, or torchrun's]."),
    context_parallel: int = typer.Option(1, "--context-parallel", help="GPUs that split each transformer forward "
                                         "(Ulysses); must divide --gpus; the rest split the windows."),
):
    """Animate PORTRAIT speaking --audio, or mimicking a --driving face video: an mp4 as long as the input."""
    from avatarcli.parallel import rank, world_size
    from avatarcli.pipeline import DEFAULT_PROMPT, AnimateJob, animate as run, prepare
    from avatarcli.presets import load_preset

    if not 0 <= crf <= 51:
        raise UserError(f"--crf must be between 0 and 51, got {crf}")
    if gpus is not None and gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}")
    if gpus is not None and world_size() > 1 and gpus != world_size():
        raise UserError(f"--gpus {gpus} inside a launch of {world_size()} processes: drop --gpus under torchrun")
    processes = max(gpus or 1, world_size())
    if context_parallel < 1 or processes % context_parallel:
        raise UserError(f"--context-parallel {context_parallel} must divide the {processes} processes (--gpus)")
    if context_parallel > 1 and device == "cpu":
        raise UserError("--context-parallel runs on GPUs (diffusers' context parallelism needs an accelerator)")
    if resume and processes > 1:
        raise UserError("--resume works with one process: drop --gpus (or torchrun) to continue a saved run")
    if offload not in ("none", "model", "group", "sequential"):
        raise UserError(f"--offload must be none, model, group or sequential, got {offload!r}")
    if precision not in ("auto", "fp8"):
        raise UserError(f"--precision must be auto or fp8, got {precision!r}")
    if overlap_decode not in ("auto", "on", "off"):
        raise UserError(f"--overlap-decode must be auto, on or off, got {overlap_decode!r}")
    if weights_dtype not in ("auto", "fp8"):
        raise UserError(f"--weights-dtype must be auto or fp8, got {weights_dtype!r}")
    if model not in ("stableavatar", "demo"):
        raise UserError(f"--model must be stableavatar or demo, got {model!r}")
    if model == "demo":
        if driving is not None:
            raise UserError("--model demo is an audio-driven model: use it with --audio")
        from avatarcli.demo.model import demo_size

        size = demo_size(size)
    if driving is not None and fps is not None:
        raise UserError("--fps does not apply to --driving: the video keeps the driving video's frame rate")
    chosen = load_preset(preset).for_driver("driving" if driving is not None else "audio")
    chosen = chosen.with_overrides(size=size, fps=fps, steps=steps, guidance=guidance, overlap=overlap, blend=blend,
                                   checkpoint=checkpoint, seed=seed, emo_scale=emo_scale, text_scale=text_scale,
                                   audio_scale=audio_scale, decoder=decoder)
    chosen = chosen.with_prediction(predict, order=predict_order, max_predicted=predict_max,
                                    tolerance=predict_tolerance, layer_ratio=predict_layer_ratio)
    job = AnimateJob(portrait=portrait, audio=audio, driving=driving, output=output or Path(portrait.stem + ".mp4"),
                     preset=chosen, prompt=prompt or DEFAULT_PROMPT,
                     seed=chosen.seed if chosen.seed is not None else 42, weights=weights, device=device,
                     dtype=dtype, crf=crf, vae_dtype=vae_dtype, compile=compile_dit, mux_audio=not no_audio,
                     resume=resume, offload=offload, weights_dtype=weights_dtype, model=model,
                     context_parallel=context_parallel, overlap_decode=overlap_decode, precision=precision)
    prepared = prepare(job)  # bad input fails here, before torch is imported and any model loads
    for warning in prepared[1].warnings if rank() == 0 else []:
        err.print(f"warning: {warning}", markup=False, highlight=False)
    if weights is not None and not weights.expanduser().is_dir():
        raise EnvironmentProblem(f"--weights folder {weights} does not exist: check the path, or drop --weights to "
                                 f"use (and fill) the Hub cache")
    if (gpus or 1) > 1 and world_size() == 1:  # start the launch: these same arguments, in `gpus` processes
        _check_gpus(gpus, device)
        from avatarcli.parallel.launch import launch

        raise typer.Exit(launch(gpus, _ARGV))
    quiet = quiet or rank() != 0  # one progress bar and one summary: rank 0's
    as_json = as_json and rank() == 0
    try:
        with stop_on_signals() as stop:
            if quiet or as_json:
                result = run(job, prepared=prepared, stop=stop)
            else:
                with _progress_bar(prepared[1].fps) as update:
                    result = run(job, on_progress=update, prepared=prepared, stop=stop)
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once; the sink removed its partial file
        raise Interrupted(f"interrupted: nothing written to {job.output}") from None
    if rank() != 0:
        return
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


class stop_on_signals:
    """SIGINT / SIGTERM ask the running job to stop after its current window-step (it saves its resume state);
    a second signal stops at once. On a requested stop: one line on stderr, exit 130."""

    def __enter__(self):
        import signal
        import threading

        from avatarcli.resume import StopFlag

        self.stop = StopFlag()

        def handler(signum, frame):
            if self.stop.requested:
                raise KeyboardInterrupt
            self.stop.request(f"interrupted by {signal.Signals(signum).name}")

        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self.stop

    def __exit__(self, exc_type, exc, traceback):
        import signal

        from avatarcli.resume import AnimateInterrupted

        for number, previous in self.previous.items():
            signal.signal(number, previous)
        if isinstance(exc, AnimateInterrupted):
            raise Interrupted(str(exc)) from None  # one line on stderr, exit 130 (main)
        return False


class _progress_bar:
    """Windows done/total, window-steps done/total (windows x steps), ETA, and seconds of video per wall second.

    Shown from the first progress event on, so input errors print nothing but their one line."""

    def __init__(self, fps: float):
        self.fps, self.bar = fps, None

    def __enter__(self):
        return self.update

    def update(self, p):
        if self.bar is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]animate"), BarColumn(), TextColumn("{task.fields[windows]}"),
                                TextColumn("{task.fields[steps]}"), TextColumn("{task.fields[speed]}"),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=err)
            self.bar.__enter__()
            self.task = self.bar.add_task("animate", total=p.window_steps_total, windows="", steps="", speed="")
        speed = p.frames_written / self.fps / p.elapsed_seconds if p.elapsed_seconds else 0.0
        self.bar.update(self.task, total=p.window_steps_total, completed=p.window_steps_done,
                        windows=f"windows {p.windows_done}/{p.windows_total} ({p.steps_per_window} steps each)",
                        steps=f"window-steps {p.window_steps_done}/{p.window_steps_total}",
                        speed=f"{speed:.3f} s video/s")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


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
    if "torch.distributed" not in sys.modules:  # never imported: not in a group (and torch stays unimported)
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


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
