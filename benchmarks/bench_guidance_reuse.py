"""Guidance reuse (avatarcli/sampling/guidance_reuse.py) on the demo model: decoded-frame PSNR against the
`reference` preset, transformer forwards (NFE) and branch forwards per window, with and without reuse.

    nice python benchmarks/bench_guidance_reuse.py                        # 3 faces x 2 clips of 4 s, CPU
    python benchmarks/bench_guidance_reuse.py --faces 3 --clips 101 --seconds 4 --reuse "3:1:1:0.05;2:2:0:1000"

For each face (a demo-world identity seed, as `avatarcli demo-face --seed N`) and speech clip (the world's synthetic
speech of that seed) the job is built as the CLI builds `animate face.png --audio talk.wav --model demo --preset
reference` (the model's own size and audio scale) and run through the library's `animate`, frames kept in memory.
Every method keeps the reference's windows, blend, guidance and seed and takes a preset's steps and step prediction
(as bench_predict_sweep.py scores presets), so what differs from the reference is the sampling alone:
  PRESET                    its steps and `prediction`, guidance reuse off
  PRESET+reuse              the same with the preset's own `guidance_reuse` section (skipped if it has none)
  PRESET+W:M:O:T            the same with guidance reuse warmup W, max_reused M, order O, tolerance T (`--reuse`)
NFE and branch forwards come from the run's AnimateResult (`nfe`, `branch_forwards`, as `--json` reports them).
Prints rows as they finish, the table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from avatarcli.demo import world
from avatarcli.eval.metrics import psnr
from avatarcli.media.audio import write_wav
from avatarcli.options import build_job
from avatarcli.pipeline import animate, prepare
from avatarcli.presets import load_preset
from avatarcli.runtime import resolve_device, resolve_dtype
from avatarcli.sampling.guidance_reuse import GuidanceReuse
from avatarcli.sink.memory import MemorySink



def methods(presets: str, reuse: str) -> list[tuple[str, str, GuidanceReuse | None | str]]:
    """(name, preset, reuse settings; "preset": the preset's own section)."""
    out = []
    for name in [p.strip() for p in presets.split(",") if p.strip()]:
        out.append((name, name, None))
        if load_preset(name).guidance_reuse is not None:
            out.append((f"{name}+reuse", name, "preset"))
        for spec in [s.strip() for s in reuse.split(";") if s.strip()]:
            w, m, o, t = spec.split(":")
            out.append((f"{name}+{spec}", name, GuidanceReuse(warmup=int(w), max_reused=int(m), order=int(o),
                                                              tolerance=float(t))))
    return out


def run(job, models, preset) -> tuple[np.ndarray, object, float]:
    sink = MemorySink()
    tick = time.perf_counter()
    result = animate(dataclasses.replace(job, preset=preset), models=models, sink=sink)
    return sink.frames(), result, time.perf_counter() - tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", default="3,11,23", help="demo-world identity seeds")
    parser.add_argument("--clips", default="101,202", help="speech seeds")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--presets", default="fast,balanced")
    parser.add_argument("--reuse", default="", help="extra guidance-reuse settings W:M:O:T, ';'-separated")
    parser.add_argument("--size", help="WxH (default: the demo model's own, 128x128); 64x64 is 4x cheaper")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp())
    table = methods(args.presets, args.reuse)
    scores: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _, _ in table}
    models = None
    for face in [int(x) for x in args.faces.split(",")]:
        for clip in [int(x) for x in args.clips.split(",")]:
            portrait, talk = work / f"face{face}.png", work / f"talk{clip}.wav"
            world.portrait(face).save(portrait)
            write_wav(talk, world.speech(clip, args.seconds))
            job = dataclasses.replace(build_job(dict(portrait=portrait, audio=talk, output=work / "unused.mp4",
                                                     model="demo", preset="reference", device=args.device,
                                                     size=args.size)),
                                      null_sink=True)
            driver, inputs = prepare(job)
            if models is None:
                device = resolve_device(job.device)
                models = driver.load(job, inputs, device, resolve_dtype(job.dtype, device))
            reference, result, wall = run(job, models, job.preset)
            print(f"face {face} clip {clip}: reference {wall:.0f} s, NFE {result.nfe}, branches "
                  f"{result.branch_forwards}, {result.windows} windows", file=sys.stderr, flush=True)
            for name, preset_name, reuse in table:
                own = load_preset(preset_name)
                preset = dataclasses.replace(job.preset, steps=own.steps, prediction=own.prediction,
                                             guidance_reuse=own.guidance_reuse if reuse == "preset" else reuse)
                frames, result, wall = run(job, models, preset)
                windows = result.windows
                scores[name].append((psnr(frames, reference), result.nfe / windows, result.branch_forwards / windows))
                print(f"  {name}: {wall:.0f} s, {scores[name][-1][0]:.2f} dB, NFE/window {result.nfe / windows:.2f}, "
                      f"branches/window {result.branch_forwards / windows:.2f}", file=sys.stderr, flush=True)
    print(f"\ndemo model (embedded), {job.preset.size}, {args.seconds:g} s clips, faces {args.faces} x clips "
          f"{args.clips}, {args.device}; decoded PSNR against `reference` (50 Euler steps, all branches)")
    print("| method | NFE / window | branch forwards / window | decoded PSNR mean (dB) | worst clip (dB) |")
    print("| --- | --- | --- | --- | --- |")
    for name, _, _ in table:
        rows = np.array(scores[name])
        print(f"| {name} | {rows[:, 1].mean():.2f} | {rows[:, 2].mean():.2f} | {rows[:, 0].mean():.2f} | "
              f"{rows[:, 0].min():.2f} |")


if __name__ == "__main__":
    main()
