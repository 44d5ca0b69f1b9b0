"""A resume against a restart: what finishing an interrupted `animate` costs either way.

    python benchmarks/bench_resume.py                               # CUDA: full-size random weights, 480x832
    python benchmarks/bench_resume.py --tiny                        # CPU: tiny random weights, 64x64
    python benchmarks/bench_resume.py --model demo --size 128x128   # CPU: the demo model

One process, one build of the components, three runs of the same job through the library's `animate`:
1. the run that is stopped (an avatarcli.resume.StopFlag set once --stop-at of its window-steps are done; the state
   is saved as on Ctrl-C);
2. the resume of it (`resume=True`): its wall time, and its `resume` timing (restoring the sampler and the streaming
   decoder: loading the decoder's cache, or replaying its last latent frames);
3. a restart: the whole job again from nothing (what a user without --resume pays).
The resumed video is compared with the restarted one frame by frame (max abs difference of the decoded mp4s).
Prints a table last.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from avatarcli.pipeline import AnimateJob, animate
from avatarcli.presets import load_preset
from avatarcli.resume import AnimateInterrupted, StopFlag
from avatarcli.testing.components import write_tiny_umt5_tokenizer

from common import full_size_components, synchronize, synthetic_speech

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def read_frames(path: Path) -> np.ndarray:
    """Every frame of an mp4 as uint8 [F, H, W, 3] (ffmpeg from imageio-ffmpeg)."""
    import subprocess

    from avatarcli.media.audio import ffmpeg_exe
    from avatarcli.media.video import probe_video

    info = probe_video(path, "video")
    raw = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, info.height, info.width, 3)


def stop_after(fraction: float, flag: StopFlag):
    """An on_progress callback that sets `flag` once `fraction` of the window-steps are done."""
    def on_progress(progress) -> None:
        total = progress.window_steps_total
        if progress.stage == "sample" and total and progress.window_steps_done >= fraction * total:
            flag.request("benchmark stop")
    return on_progress


def timed_run(job: AnimateJob, device, **kwargs):
    synchronize(device)
    tick = time.perf_counter()
    try:
        result = animate(job, **kwargs)
    except AnimateInterrupted as stopped:
        result = stopped
    synchronize(device)
    return result, time.perf_counter() - tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", default=None, help="WxH (default 480x832; --tiny: 64x64; demo: its own)")
    parser.add_argument("--stop-at", type=float, default=0.67, help="share of the window-steps done at the stop")
    parser.add_argument("--model", default=None, choices=[None, "demo"], help="demo: the trained demo model (CPU)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    on_cpu = args.tiny or args.model == "demo"
    device = torch.device("cpu" if on_cpu else "cuda")
    dtype = torch.float32 if on_cpu else torch.bfloat16
    work = Path(tempfile.mkdtemp())
    models = None
    if args.model != "demo":
        models = full_size_components(device, dtype, write_tiny_umt5_tokenizer(work / "tok"), args.tiny)
    size = args.size or ("64x64" if args.tiny else None if args.model == "demo" else "480x832")
    preset = load_preset("reference").with_overrides(steps=args.steps, size=size)
    output = work / "out.mp4"
    job = dict(portrait=EXAMPLES / "portrait.png", audio=synthetic_speech(work / "talk.wav", args.seconds),
               preset=preset, device=str(device), model=args.model or "stableavatar", save_every=0.0)
    flag = StopFlag()
    stopped, first = timed_run(AnimateJob(output=output, **job), device, models=models,
                               on_progress=stop_after(args.stop_at, flag), stop=flag)
    if not isinstance(stopped, AnimateInterrupted) or not stopped.saved:
        sys.exit(f"the first run was not stopped with a saved state: {stopped}")
    resumed, resume_wall = timed_run(AnimateJob(output=output, resume=True, **job), device, models=models)
    restarted, restart_wall = timed_run(AnimateJob(output=work / "again.mp4", **job), device, models=models)
    shutil.rmtree(work / "tok", ignore_errors=True)
    a, b = read_frames(output), read_frames(work / "again.mp4")
    diff = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) if a.shape == b.shape else -1
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    account = sum(resumed.timings.values()) / resumed.wall_seconds
    print(f"\nresume vs restart, {args.model or ('tiny' if args.tiny else 'full-size')} weights, "
          f"{resumed.width}x{resumed.height}, {resumed.frames} frames ({args.seconds:g} s), {args.steps} steps, "
          f"{name}")
    print("| stopped at frame | stopped run s | resume s | of which restore s | restart s | resume / restart "
          "| timings / wall | forwards resumed / restart | max frame diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {stopped.frames} of {stopped.frames_total} | {first:.1f} | {resume_wall:.1f} | "
          f"{resumed.timings.get('resume', 0.0):.2f} | {restart_wall:.1f} | {resume_wall / restart_wall:.2f} | "
          f"{account:.3f} | {resumed.nfe} / {restarted.nfe} | {diff} |")


if __name__ == "__main__":
    main()
