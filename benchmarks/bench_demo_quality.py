"""Lip sync, identity drift and window seams of the demo model on long clips, measured offline (issue table).

    python benchmarks/bench_demo_quality.py                          # 60 s, the embedded demo weights, GPU if any
    python benchmarks/bench_demo_quality.py --weights DIR --out res  # another weights folder; JSON + plots in res/
    python benchmarks/bench_demo_quality.py --seconds 8 --steps 4    # a quick look on CPU

A person of the demo world (avatarcli.demo.world, an identity no training run saw) speaks `--seconds` of the world's
synthetic speech. The renderer's own video for that speech is the ground truth. The demo model animates the portrait
through the library's `animate` (frames kept in memory, no ffmpeg needed) once per setting: the preset as it is, and
blend uniform / log x overlap 5 / 10 on top of it. Every video is measured by `avatarcli.eval.evaluate_frames`, the
code behind `avatarcli eval` (demo layout):

- lip sync: Pearson correlation of the mouth openness with the audio loudness envelope at lag 0, the best lag within
  +-10 frames and its correlation; "vs truth": the same between the generated and the renderer's mouth;
- drift: face-region colour distance (DeltaE76 over a grid, mouth excluded) from the portrait, first and last 5 s;
- seams: the frame difference across window boundaries over the interior average (1 = no seam);
- flicker of the mean luma outside the mouth.

A row "VAE round trip of the truth" runs the renderer's video through the demo VAE alone (encode, one causal decode
stream, no DiT): what the decoder lets lip sync reach, so that a missed goal can be split between VAE and DiT.
A line "latent-rate bound" gives the lip sync of the truth's mouth openness averaged over the video frames of each
latent frame (the first frame alone, then groups of the VAE's temporal factor, 4): what a decoder that recovers
only one mouth state per latent frame could reach, whatever the DiT does; beside it, the correlation of the VAE round
trip's mouth openness with the truth's at the 1st, 2nd, ... frame of each group.

The joint loop (every window at every step, the reference order) and the streaming wavefront run on the same
inputs, with the preset's step prediction, and their final latents are compared exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from avatarcli.decode.stream import video_to_uint8
from avatarcli.demo import world
from avatarcli.demo.model import demo_size
from avatarcli.demo.training import round_trip
from avatarcli.eval import EvalJob, evaluate_frames
from avatarcli.media.audio import load_audio, write_wav
from avatarcli.pipeline import AnimateJob, animate, frame_noise, prepare
from avatarcli.presets import load_preset
from avatarcli.runtime import StageClock, resolve_device, resolve_dtype
from avatarcli.sink.memory import MemorySink

from common import run  # the joint / streaming runner with NFE counting


def measure(name: str, frames: np.ndarray, face: Path, samples: np.ndarray, truth: np.ndarray | None,
            overlap: int, fps: float) -> dict:
    job = EvalJob(video=Path(name), reference=face, layout="demo", overlap=overlap)
    report = evaluate_frames(job, frames, fps, compare=truth, samples=samples)
    s = report.summary()
    row = dict(name=name, frames=report.frames, windows=len(report.windows),
               lip_corr=s["lip_sync"]["correlation"], lip_lag=s["lip_sync"]["best_lag"],
               lip_best=s["lip_sync"]["best_correlation"], drift_start=report.drift_start,
               drift_end=report.drift_end, drift_ratio=report.drift_end / max(report.drift_start, 1e-9),
               seam=report.seams.score, seam_worst=report.seams.worst, flicker=report.flicker)
    if truth is not None:
        row.update(truth_corr=s["compare"].get("mouth_correlation"), truth_lag=s["compare"].get("mouth_best_lag"),
                   truth_best=s["compare"].get("mouth_best_correlation"), psnr_truth=s["compare"].get("psnr_mean"))
    return row, report


def latent_rate_bound(truth: np.ndarray, recon: np.ndarray, samples: np.ndarray, fps: float, factor: int) -> dict:
    """Lip sync of the truth's mouth openness with each latent frame's video frames replaced by their mean; and how
    the VAE round trip's openness follows the truth's at each position inside a latent frame's group of frames."""
    from avatarcli.eval.metrics import lip_sync, loudness_envelope, pearson
    from avatarcli.media.audio import SAMPLE_RATE

    openness, round_trip_openness = world.dark_fraction(truth), world.dark_fraction(recon)
    held = openness.copy()
    for start in range(1, len(openness), factor):  # causal VAE: frame 0 is a latent frame of its own
        held[start:start + factor] = openness[start:start + factor].mean()
    sync = lip_sync(held, loudness_envelope(samples, SAMPLE_RATE, fps, len(held)))
    n = min(len(openness), len(round_trip_openness))  # the round trip ends at the last whole latent frame
    by_position = [pearson(round_trip_openness[1 + k:n:factor], openness[1 + k:n:factor]) for k in range(factor)]
    return dict(factor=factor, lip_corr=sync.correlation, lip_lag=sync.best_lag, lip_best=sync.best_correlation,
                round_trip_by_position=by_position)


def joint_vs_streaming(job: AnimateJob, models, device, dtype) -> dict:
    """Final latents of the joint loop and of the streaming wavefront, same inputs, same step prediction."""
    driver, inputs = prepare(job)
    generation = driver.build(job, inputs, models, device, dtype, StageClock(device))
    plan, sigmas = generation.plan, generation.sigmas
    noise = frame_noise(job.seed, 0, plan.latent_frames, generation.latent_shape, device)
    prediction = job.preset.prediction
    with torch.no_grad():
        joint, nfe_joint = run(plan, sigmas, noise, generation.denoiser, prediction)
        streaming, nfe_streaming = run(plan, sigmas, noise, generation.denoiser, prediction, streaming=True)
    return dict(windows=len(plan.windows), identical=bool(torch.equal(joint, streaming)),
                max_abs_difference=float((joint.float() - streaming.float()).abs().max()),
                nfe_joint=round(nfe_joint * len(plan.windows)), nfe_streaming=round(nfe_streaming * len(plan.windows)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="a StableAvatar weights folder (default: the embedded demo)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--person", type=int, default=7, help="demo-world identity and speech seed")
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--steps", type=int, help="override the preset's steps (quick looks)")
    parser.add_argument("--audio-scale", type=float, help="override the preset's audio CFG scale "
                        "(benchmarks/README.md: the demo model's lip sync is best near 2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--grid", default="uniform:5,uniform:10,log:5,log:10",
                        help="blend:overlap settings measured besides the preset's own")
    parser.add_argument("--out", type=Path, help="folder for results.json and per-setting plots")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    work = Path(tempfile.mkdtemp())
    face, talk = work / "face.png", work / "talk.wav"
    world.portrait(args.person).save(face)
    write_wav(talk, world.speech(args.person, args.seconds))
    samples = load_audio(talk)  # the 16-bit samples the model hears
    truth = world.render_video(args.person, samples, motion_seed=args.person)
    base = load_preset(args.preset).with_overrides(size=demo_size(None), steps=args.steps,
                                                   audio_scale=args.audio_scale)
    job = AnimateJob(portrait=face, audio=talk, output=work / "unused.mp4", preset=base, seed=args.seed,
                     model="demo", weights=args.weights,
                     device=str(device), null_sink=True)
    driver, inputs = prepare(job)
    tick = time.perf_counter()
    models = driver.load(job, inputs, device, dtype)
    load_seconds = time.perf_counter() - tick

    rows, reports = [], {}
    row, _ = measure("renderer (ground truth)", truth[: inputs.frames], face, samples, None, base.overlap, base.fps)
    rows.append(dict(row, wall=0.0, nfe=0))
    # The truth through the VAE alone (encode + one causal decode stream, no DiT): the lip sync the decoder allows,
    # which splits a missed lip-sync goal between the VAE and the DiT.
    recon = video_to_uint8(round_trip(models.vae, torch.from_numpy(np.ascontiguousarray(truth[: inputs.frames]))))
    row, _ = measure("VAE round trip of the truth", recon, face, samples, truth, base.overlap, base.fps)
    rows.append(dict(row, wall=0.0, nfe=0))
    bound = latent_rate_bound(truth[: inputs.frames], recon, samples, base.fps,
                              models.vae.config.scale_factor_temporal)
    settings = [(f"{args.preset} ({base.blend}, overlap {base.overlap})", base.blend, base.overlap)]
    for item in args.grid.split(","):
        if item.strip():
            blend, overlap = item.split(":")
            settings.append((f"{blend}, overlap {overlap}", blend, int(overlap)))
    for name, blend, overlap in settings:
        preset = base.with_overrides(blend=blend, overlap=overlap)
        sink = MemorySink()
        result = animate(replace(job, preset=preset), models=models, sink=sink)
        row, report = measure(name, sink.frames(), face, samples, truth, overlap, base.fps)
        rows.append(dict(row, wall=result.wall_seconds, nfe=result.nfe))
        reports[name] = report
        print(f"  {name}: {result.wall_seconds:.1f} s, nfe {result.nfe}", file=sys.stderr, flush=True)
    order = joint_vs_streaming(job, models, device, dtype)

    if args.out:
        from avatarcli.eval.plot import draw_report

        args.out.mkdir(parents=True, exist_ok=True)
        for i, (name, report) in enumerate(reports.items()):
            draw_report(report, args.out / f"eval_{i}.png")
        (args.out / "results.json").write_text(json.dumps(dict(
            device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", seconds=args.seconds,
            person=args.person, preset=args.preset, steps=base.steps, weights=str(args.weights or "demo"),
            load_seconds=load_seconds, rows=rows, latent_rate_bound=bound, joint_vs_streaming=order), indent=1))

    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\ndemo model {args.weights or '(embedded)'}, {args.seconds:g} s ({inputs.frames} frames) of person "
          f"{args.person}, preset {args.preset} ({base.steps} steps, {base.guidance}, text/audio scale "
          f"{base.text_scale:g}/{base.audio_scale:g}), seed {args.seed}, {where}")
    print("| video | windows | NFE | lip corr (lag 0) | best lag | best corr | mouth vs truth (lag 0 / best lag) | "
          "drift 0-5 s | drift last 5 s | ratio | seam score | worst seam | flicker | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    def num(value, spec: str) -> str:  # None: undefined (e.g. a mouth that never moves has no correlation)
        return "n/a" if value is None else format(value, spec)

    for r in rows:
        vs_truth = (f"{num(r['truth_corr'], '.3f')} / {num(r['truth_lag'], '+d')}"
                    if "truth_corr" in r else "-")
        print(f"| {r['name']} | {r['windows']} | {r['nfe']} | {num(r['lip_corr'], '.3f')} | "
              f"{num(r['lip_lag'], '+d')} | {num(r['lip_best'], '.3f')} | {vs_truth} | {r['drift_start']:.2f} | "
              f"{r['drift_end']:.2f} | {r['drift_ratio']:.2f} | {r['seam']:.2f} | {r['seam_worst']:.2f} | "
              f"{r['flicker']:.4f} | {r['wall']:.1f} |")
    print(f"latent-rate bound (the truth's mouth openness averaged over each latent frame's {bound['factor']} video "
          f"frames): lip corr {bound['lip_corr']:.3f} at lag 0, best {bound['lip_best']:.3f} at {bound['lip_lag']:+d}; "
          f"VAE round trip vs truth mouth openness by frame of the group: "
          + " / ".join(f"{c:.2f}" for c in bound["round_trip_by_position"]))
    print(f"joint vs streaming wavefront ({order['windows']} windows, preset {args.preset} with its step prediction): "
          f"{'identical' if order['identical'] else 'DIFFERENT'} final latents (max |diff| "
          f"{order['max_abs_difference']:.3g}), NFE {order['nfe_joint']} vs {order['nfe_streaming']}")


if __name__ == "__main__":
    main()
