"""The demo model against its goals, on faces and speech no training run saw, at default settings.

    python benchmarks/demo_goals.py                                   # 3 faces x 2 clips of 64 s, embedded weights
    python benchmarks/demo_goals.py --weights DIR --seconds 64 --strip strip.png
    python benchmarks/demo_goals.py --faces 3 --clips 3 --seconds 6   # a quick look

For each face (a demo-world identity seed, the faces `avatarcli demo-face --seed N` draws; training uses seeds from
1,000,000) and each speech clip (the world's synthetic speech of another seed), the job is built as the CLI builds
`animate face.png --audio talk.wav --model demo` (the default preset under the model's own avatarcli-defaults.yaml)
and run through the library's `animate`, frames kept in memory. The renderer's own video of that face speaking that
clip (the world's truth) is measured beside it, by `avatarcli.eval.evaluate_frames`, the code behind `avatarcli eval`:

- PSNR to the portrait, whole frame, over the first and the last `span` frames (eval's `portrait.regions.frame`),
  of the generated video and of the truth; the goal is a gap of at most 3 dB, at the start and after 60 s;
- VAE round trip of the truth (encode, one causal decode stream): PSNR against the truth, goal >= 32 dB;
- lip sync: correlation of the generated mouth's openness with the speech loudness, best within +-1 frame,
  goal >= 0.65 (the truth reaches about 0.79 through a decoder with one mouth state per latent frame).

--strip writes the first face's first clip as a PNG: the portrait, then the frames at 0, 25, 50, 75 and 100%.
The table is printed last.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from avatarcli.decode.stream import video_to_uint8
from avatarcli.demo import world
from avatarcli.demo.training import round_trip
from avatarcli.eval.metrics import psnr
from avatarcli.eval import EvalJob, evaluate_frames
from avatarcli.eval.report import region_span
from avatarcli.media.audio import load_audio, write_wav
from avatarcli.options import build_job
from avatarcli.pipeline import animate, prepare
from avatarcli.runtime import resolve_device, resolve_dtype
from avatarcli.sink.memory import MemorySink

GOAL_GAP_DB, GOAL_VAE_DB, GOAL_LIP = 3.0, 32.0, 0.65


def measure(frames: np.ndarray, face: Path, samples: np.ndarray, fps: float) -> dict:
    report = evaluate_frames(EvalJob(video=Path("video"), reference=face, layout="demo", max_lag=1), frames, fps,
                             samples=samples)
    whole = report.summary()["portrait"]["regions"]["frame"]
    lip = report.summary()["lip_sync"]
    return dict(psnr_start=whole["psnr_start"], psnr_end=whole["psnr_end"], lip=lip["best_correlation"])



def save_strip(path: Path, face: Path, frames: np.ndarray) -> None:
    from PIL import Image

    portrait = np.asarray(Image.open(face).convert("RGB").resize(frames.shape[2:0:-1]))
    picks = [round(q * (len(frames) - 1)) for q in (0, 0.25, 0.5, 0.75, 1.0)]
    strip = np.concatenate([portrait] + [frames[i] for i in picks], axis=1)
    Image.fromarray(strip).resize((strip.shape[1] * 2, strip.shape[0] * 2), Image.NEAREST).save(path)


def run_one(face_seed: int, clip_seed: int, args, work: Path, models_by_key: dict) -> dict:
    face, talk = work / f"face{face_seed}.png", work / f"talk{clip_seed}.wav"
    world.portrait(face_seed).save(face)
    write_wav(talk, world.speech(clip_seed, args.seconds))
    samples = load_audio(talk)
    values = dict(portrait=face, audio=talk, output=work / "unused.mp4", model="demo", weights=args.weights,
                  device=args.device)
    job = replace(build_job(values), null_sink=True)
    driver, inputs = prepare(job)
    device = resolve_device(job.device)
    if "models" not in models_by_key:
        models_by_key["models"] = driver.load(job, inputs, device, resolve_dtype(job.dtype, device))
    models = models_by_key["models"]
    sink = MemorySink()
    tick = time.perf_counter()
    result = animate(job, models=models, sink=sink)
    frames = sink.frames()
    truth = world.render_video(face_seed, samples, motion_seed=face_seed)[: len(frames)]
    recon = video_to_uint8(round_trip(models.vae, torch.from_numpy(np.ascontiguousarray(truth))))
    if args.strip and not args.strip.exists():
        save_strip(args.strip, face, frames)
    fps = job.preset.fps
    return dict(face=face_seed, clip=clip_seed, frames=len(frames), wall=time.perf_counter() - tick, nfe=result.nfe,
                gen=measure(frames, face, samples, fps), truth=measure(truth, face, samples, fps),
                vae=psnr(recon, truth[: len(recon)]), preset=job.preset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="a StableAvatar weights folder (default: the embedded demo)")
    parser.add_argument("--seconds", type=float, default=64.0)
    parser.add_argument("--faces", default="3,11,23", help="demo-world identity seeds (demo-face --seed)")
    parser.add_argument("--clips", default="101,202", help="speech seeds")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--strip", type=Path, help="PNG: the portrait and frames at 0/25/50/75/100%% of the first run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    rows, models = [], {}
    for face in [int(x) for x in args.faces.split(",")]:
        for clip in [int(x) for x in args.clips.split(",")]:
            row = run_one(face, clip, args, work, models)
            rows.append(row)
            print(f"face {face} clip {clip}: {row['wall']:.0f} s, gen {row['gen']}, truth {row['truth']}, "
                  f"vae {row['vae']:.2f} dB", flush=True)
    preset = rows[0]["preset"]
    where = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print(f"\ndemo model {args.weights or '(embedded)'}, {args.seconds:g} s clips, default settings (preset "
          f"{preset.name}: {preset.steps} steps, audio scale {preset.audio_scale:g}, {preset.size}), "
          f"{where}; PSNR to the portrait over the first / last {region_span(rows[0]['frames'])} frames")
    print("| face | clip | PSNR start: video / truth / gap | PSNR end: video / truth / gap | VAE round trip dB | "
          "lip sync (best, lag <= 1) | NFE |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        g, t = r["gen"], r["truth"]
        print(f"| {r['face']} | {r['clip']} | {g['psnr_start']:.1f} / {t['psnr_start']:.1f} / "
              f"{t['psnr_start'] - g['psnr_start']:.1f} | {g['psnr_end']:.1f} / {t['psnr_end']:.1f} / "
              f"{t['psnr_end'] - g['psnr_end']:.1f} | {r['vae']:.2f} | {g['lip']:.3f} | {r['nfe']} |")
    gaps = [max(r["truth"]["psnr_start"] - r["gen"]["psnr_start"], r["truth"]["psnr_end"] - r["gen"]["psnr_end"])
            for r in rows]
    print(f"goals: gap <= {GOAL_GAP_DB} dB: worst {max(gaps):.1f}; VAE >= {GOAL_VAE_DB} dB: worst "
          f"{min(r['vae'] for r in rows):.2f}; lip sync >= {GOAL_LIP}: worst {min(r['gen']['lip'] for r in rows):.3f}")


if __name__ == "__main__":
    main()
