"""`avatarcli eval`: lip sync, identity drift (also by region against the portrait), window seams, flicker and
PSNR/SSIM of a generated video, offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from avatarcli.errors import AvatarError


def _overlap(preset: str, overlap: Optional[int]) -> int:
    if overlap is not None:
        return overlap
    from avatarcli.presets import load_preset

    return load_preset(preset).overlap


def _print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    table = Table("metric", "value", "what it is")
    ls = summary["lip_sync"]
    if ls is not None:
        table.add_row("lip sync r", fmt(ls["correlation"]), "mouth openness vs audio loudness, Pearson at lag 0")
        table.add_row("lip sync best lag", f"{ls['best_lag']} frames (r {fmt(ls['best_correlation'])})",
                      f"within +-{ls['max_lag']}; + = mouth moves after the sound")
    drift = summary["drift"]
    table.add_row("drift first / last", f"{fmt(drift['start'], '.2f')} / {fmt(drift['end'], '.2f')}",
                  f"face DeltaE76 from the reference; last/first {fmt(drift['end_over_start'], '.2f')}")
    seams = summary["seams"]
    table.add_row("seam score", f"{fmt(seams['score'], '.2f')} (worst {fmt(seams['worst'], '.2f')}, "
                  f"whole overlaps {fmt(seams['overlap_score'], '.2f')})",
                  f"difference at {len(summary['boundaries'])} window boundaries / interior; 1 = seamless")
    table.add_row("flicker", fmt(summary["flicker"]), "mean |2nd difference| of mean luma; 0 = none")
    if "compare" in summary:
        c = summary["compare"]
        table.add_row("PSNR mean / min", f"{fmt(c['psnr_mean'], '.2f')} / {fmt(c['psnr_min'], '.2f')} dB",
                      f"{c['compared']} frames against the comparison video")
        table.add_row("SSIM mean / min", f"{fmt(c['ssim_mean'], '.4f')} / {fmt(c['ssim_min'], '.4f')}", "luma")
        table.add_row("mouth vs comparison", f"r {fmt(c['mouth_correlation'])}, best lag {c['mouth_best_lag']} "
                      f"(r {fmt(c['mouth_best_correlation'])})", "+ = this video's mouth moves later")
    _region_rows(table, summary["portrait"], fmt)
    console = Console()
    console.print(f"{summary['video']}: {summary['frames']} frames at {summary['fps']:g} fps, {summary['size']}, "
                  f"layout {summary['layout']}, {summary['windows']} window{'s' if summary['windows'] != 1 else ''}")
    console.print(table)
    if "plot" in summary:
        console.print(f"plot: {summary['plot']}")
    for note in summary.get("notes", []):
        console.print(f"note: {note}")


def _region_rows(table, portrait: dict, fmt) -> None:
    """Identity against the portrait by region: one row per measured region, one for those not measured."""
    span = portrait["span_frames"]
    missing = []
    for name, region in portrait["regions"].items():
        if region is None:
            missing.append(name)
            continue
        table.add_row(f"vs portrait: {name}",
                      f"PSNR {fmt(region['psnr_start'], '.2f')} / {fmt(region['psnr_end'], '.2f')} dB, "
                      f"DeltaE {fmt(region['delta_e_start'], '.2f')} / {fmt(region['delta_e_end'], '.2f')}",
                      f"first / last {span} frames; PSNR mean {fmt(region['psnr_mean'], '.2f')} dB; "
                      f"{region['pixels']} px")
    if missing:
        table.add_row(f"vs portrait: {', '.join(missing)}", "not measured", "regions of the demo-world layout only")


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        video: Path = typer.Argument(..., metavar="VIDEO", help="The generated video."),
        reference: Path = typer.Option(..., "--reference", "-r", help="The portrait the video was made from."),
        audio: Optional[Path] = typer.Option(None, "--audio", "-a",
                                             help="Speech it should follow [default: the video's own audio track]."),
        compare: Optional[Path] = typer.Option(None, "--compare", help="A second video: PSNR/SSIM frame by frame."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Write the per-frame curves to this PNG."),
        layout: str = typer.Option("auto", "--layout",
                                   help="demo (the demo world's known face/mouth boxes), detect (MTCNN face "
                                        "detector, offline) or auto (demo for 128x128 videos)."),
        face_box: Optional[str] = typer.Option(None, "--face-box", help="x0,y0,x1,y1 fractions: a fixed face box."),
        preset: str = typer.Option("balanced", "--preset", "-p", help="Preset whose overlap placed the windows."),
        overlap: Optional[int] = typer.Option(None, "--overlap", help="Latent frames shared by windows [preset's]."),
        window: int = typer.Option(21, "--window", help="Latent frames per window (21 = 81 video frames)."),
        max_lag: int = typer.Option(10, "--max-lag", help="Lip-sync lag search range, frames either way."),
        span: float = typer.Option(5.0, "--span-seconds", help="Drift is also given over the first/last this long."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON line with all numbers."),
    ) -> None:
        """Measure a generated video: lip sync, identity drift (also by region against the portrait), window seams,
        flicker; PSNR/SSIM with --compare."""
        from avatarcli.eval import EvalJob, evaluate
        from avatarcli.eval.layout import parse_box

        if plot is not None and plot.suffix.lower() != ".png":
            raise AvatarError(f"--plot writes a PNG; give a name ending in .png, got {plot}")
        job = EvalJob(video=video, reference=reference, audio=audio, compare=compare, layout=layout,
                      face_box=parse_box(face_box) if face_box else None, window_frames=window,
                      overlap=_overlap(preset, overlap), max_lag=max_lag, span_seconds=span)
        report = evaluate(job)
        summary = report.summary()
        if plot is not None:
            from avatarcli.eval.plot import draw_report

            summary["plot"] = str(draw_report(report, plot))
        if as_json:
            print(json.dumps(summary, allow_nan=False), flush=True)
        else:
            _print_table(summary)
