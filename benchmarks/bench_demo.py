"""`animate --model demo` on CPU: stage timings of a short clip and the cost extrapolated to a longer one.

    python benchmarks/bench_demo.py --seconds 4 --preset balanced --threads 2 [--target 30]

The DiT cost is linear in window-steps and the decode cost in frames, so the measured per-window-step and per-frame
times give the extrapolation (printed as such, next to the measured row). Also prints the process CPU time, which
stays meaningful on a machine shared with other jobs, where wall time does not.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from avatarcli.demo import world
from avatarcli.demo.model import demo_size
from avatarcli.drivers.stableavatar import WINDOW_LATENT_FRAMES
from avatarcli.media.audio import write_wav
from avatarcli.pipeline import AnimateJob, animate
from avatarcli.presets import load_preset
from avatarcli.sampling.windows import latent_frames_for, plan_windows


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--target", type=float, default=30.0, help="extrapolate to this much audio")
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = load_preset(args.preset).with_overrides(size=demo_size(None), steps=args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        face, talk = Path(tmp) / "face.png", Path(tmp) / "talk.wav"
        world.portrait(args.seed).save(face)
        write_wav(talk, world.speech(args.seed, args.seconds))
        job = AnimateJob(portrait=face, audio=talk, output=Path(tmp) / "out.mp4", preset=preset, model="demo",
                         device="cpu", null_sink=True)
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        result = animate(job)
        cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    t = result.timings
    window_steps = result.windows * result.steps
    per_step, per_frame = t.get("dit", 0.0) / window_steps, t.get("decode", 0.0) / result.frames
    fixed = wall - t.get("dit", 0.0) - t.get("decode", 0.0)
    frames = round(args.target * preset.fps)
    windows = len(plan_windows(latent_frames_for(frames), WINDOW_LATENT_FRAMES, preset.overlap, preset.blend).windows)
    estimate = fixed + windows * result.steps * per_step + frames * per_frame
    print(f"preset {args.preset}: {result.steps} steps, {preset.guidance}, overlap {preset.overlap}; "
          f"{args.threads} threads; {result.width}x{result.height}")
    print("| audio | frames | windows | window-steps | load | features | DiT | decode | wall | process CPU | "
          "s per window-step | s per decoded frame |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {args.seconds:g} s (measured) | {result.frames} | {result.windows} | {window_steps} | "
          f"{t.get('load', 0):.1f} s | {t.get('features', 0):.1f} s | {t.get('dit', 0):.1f} s | "
          f"{t.get('decode', 0):.1f} s | {wall:.1f} s | {cpu:.1f} s | {per_step:.3f} | {per_frame:.3f} |")
    print(f"| {args.target:g} s (extrapolated) | {frames} | {windows} | {windows * result.steps} | | | "
          f"{windows * result.steps * per_step:.1f} s | {frames * per_frame:.1f} s | {estimate:.1f} s | | | |")


if __name__ == "__main__":
    main()
