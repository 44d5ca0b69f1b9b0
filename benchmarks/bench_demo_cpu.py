"""The demo a newcomer runs, on the CPU: `avatarcli animate face.png --audio talk.wav --model demo --json`, end to end.

    python benchmarks/bench_demo_cpu.py --seconds 10 [--threads 2] [--seed 3] [--full-encode-run] [--profile-decode]

1. The inputs as the README makes them: `avatarcli demo-face --seed S -o face.png --speech talk.wav --seconds N`.
2. The command itself in a subprocess, with OMP/MKL threads and torch's intra-op threads at --threads and an empty
   prompt cache (a first run): the stages of its --json line, and the wall time around the process (interpreter
   start and imports included). --full-encode-run runs it a second time with the reference condition encoded by one
   plain `vae.encode` (the code before the shortcut of avatarcli.features.image.encode_mode), for the difference.
3. The pieces behind the stages, timed in this process with the same threads: the reference condition's VAE encode
   (the plain encode and encode_mode, checked bit-identical), CLIP tokens, the umT5 prompt encode, wav2vec2 features
   of one window and the streaming decode per latent frame (and per video frame). The DiT's seconds per
   forward come from the --json line (dit / nfe).
   --profile-decode adds the decoder's heaviest operators (torch.profiler).

The last lines printed are the stage table: seconds per stage, share of the wall time, seconds per video second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT

GOAL_SECONDS = 30.0  # the goal for 10 s of speech on 2 CPU cores
FULL_ENCODE_BOOT = (
    "import sys, avatarcli.features.image as image\n"
    "image.encode_mode = lambda vae, video: vae.encode(video).latent_dist.mode()\n"
    "from avatarcli.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def thread_env(threads: int, cache: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), AVATARCLI_CACHE_DIR=str(cache))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def make_inputs(folder: Path, seed: int, seconds: float, env: dict[str, str]) -> tuple[Path, Path]:
    face, talk = folder / "face.png", folder / "talk.wav"
    subprocess.run([sys.executable, "-m", "avatarcli", "demo-face", "--seed", str(seed), "-o", str(face), "--speech",
                    str(talk), "--seconds", f"{seconds:g}"], check=True, env=env, cwd=folder,
                   stdout=subprocess.DEVNULL)
    return face, talk


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def animate_run(face: Path, talk: Path, out: Path, env: dict[str, str], full_encode: bool) -> tuple[dict, float, float]:
    """The --json summary of one `animate --model demo` process, the wall time around it and its CPU time (user +
    system, all threads: steadier than the wall time on a machine shared with other jobs)."""
    head = [sys.executable, "-c", FULL_ENCODE_BOOT] if full_encode else [sys.executable, "-m", "avatarcli"]
    command = [*head, "animate", str(face), "--audio", str(talk), "--model", "demo", "--json", "-q", "-o", str(out)]
    cpu, start = children_cpu(), time.perf_counter()
    done = subprocess.run(command, check=True, env=env, cwd=out.parent, capture_output=True, text=True)
    wall = time.perf_counter() - start
    return json.loads(done.stdout.strip().splitlines()[-1]), wall, children_cpu() - cpu


def seconds_of(fn, repeat: int = 1) -> float:
    """Best wall time of `repeat` calls (after the caller's own warm-up)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def pieces(face: Path, talk: Path, profile_decode: bool) -> list[tuple[str, float, str]]:
    """(piece, seconds, note) for the costs behind the stages, measured on the demo's own weights."""
    from PIL import Image

    from avatarcli.decode.stream import StreamingDecoder
    from avatarcli.demo.model import DEMO_CHECKPOINT, demo_weights_dir
    from avatarcli.drivers.stableavatar import WINDOW_LATENT_FRAMES
    from avatarcli.features.audio import wav2vec_features
    from avatarcli.features.image import clip_features, encode_mode, reference_pixels
    from avatarcli.features.prompts import DEFAULT_PROMPT, NEGATIVE_PROMPT
    from avatarcli.features.text import encode_prompts
    from avatarcli.loading.stableavatar import load_stableavatar
    from avatarcli.media.audio import SAMPLE_RATE, load_audio
    from avatarcli.presets import load_preset
    from avatarcli.runtime import quiet_diffusers

    fps = load_preset("balanced").fps
    with quiet_diffusers():
        c = load_stableavatar(demo_weights_dir(), DEMO_CHECKPOINT, torch.device("cpu"), torch.float32)
    portrait = Image.open(face)
    width, height = portrait.size
    rows = []

    frames = 4 * (WINDOW_LATENT_FRAMES - 1) + 1
    video = torch.zeros(1, 3, frames, height, width)
    video[:, :, 0] = reference_pixels(portrait, width, height)[0]
    warm = video[:, :, :13]  # the same chunk shapes as the whole clip: oneDNN/BLAS set up before timing
    c.vae.encode(warm)
    encode_mode(c.vae, warm)
    full = seconds_of(lambda: c.vae.encode(video).latent_dist.mode())
    memo = seconds_of(lambda: encode_mode(c.vae, video))
    same = torch.equal(c.vae.encode(video).latent_dist.mode().view(torch.int32), encode_mode(c.vae, video).view(
        torch.int32))
    rows.append((f"reference encode, {frames} frames: vae.encode", full, "before"))
    rows.append((f"reference encode, {frames} frames: encode_mode", memo,
                 f"after; {full / memo:.1f}x, {'bit-identical' if same else 'DIFFERENT'}"))

    clip_features(c.image_encoder, portrait, width, height)
    rows.append(("CLIP tokens", seconds_of(lambda: clip_features(c.image_encoder, portrait, width, height), 3), ""))
    if c.text_encoder is not None:
        prompts = [NEGATIVE_PROMPT, DEFAULT_PROMPT]
        encode_prompts(c.text_encoder, c.tokenizer, prompts, device="cpu")
        rows.append(("umT5 prompts (first run; then cached on disk)",
                     seconds_of(lambda: encode_prompts(c.text_encoder, c.tokenizer, prompts, device="cpu"), 3), ""))
    samples = load_audio(talk)[: SAMPLE_RATE * frames // fps]
    wav2vec_features(c.audio_encoder, c.feature_extractor, samples)
    rows.append(("wav2vec2, one window",
                 seconds_of(lambda: wav2vec_features(c.audio_encoder, c.feature_extractor, samples), 3), ""))

    latents = torch.randn(1, 16, 6, height // 8, width // 8, generator=torch.Generator().manual_seed(1))
    decoder = StreamingDecoder(c.vae)
    decoder.push(latents[:, :, :2])  # warm-up: first frame, then a later one
    start = time.perf_counter()
    for index in range(2, latents.shape[2]):
        decoder.push(latents[:, :, index : index + 1])
    per_latent = (time.perf_counter() - start) / (latents.shape[2] - 2)
    rows.append(("decode, per latent frame (4 video frames)", per_latent, f"{per_latent / 4:.3f} s per video frame"))
    if profile_decode:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for index in range(2, latents.shape[2]):
                decoder.push(latents[:, :, index : index + 1])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    decoder.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of speech")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3, help="demo-face seed")
    parser.add_argument("--full-encode-run", action="store_true",
                        help="also run animate with the plain vae.encode of the reference (before the shortcut)")
    parser.add_argument("--profile-decode", action="store_true")
    parser.add_argument("--no-pieces", action="store_true", help="only the end-to-end run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = thread_env(args.threads, tmp / "cache")
        face, talk = make_inputs(tmp, args.seed, args.seconds, env)
        summary, wall, cpu = animate_run(face, talk, tmp / "face.mp4", env, full_encode=False)
        baseline = None
        if args.full_encode_run:
            env = thread_env(args.threads, tmp / "cache-full")  # a first run again: umT5 runs, as above
            baseline = animate_run(face, talk, tmp / "face-full.mp4", env, full_encode=True)
        rows = [] if args.no_pieces else pieces(face, talk, args.profile_decode)

    if rows:
        print("| piece (in process) | seconds | note |")
        print("| --- | --- | --- |")
        for name, seconds, note in rows:
            print(f"| {name} | {seconds:.3f} | {note} |")
        print()

    video = summary["video_seconds"]
    print(f"`animate --model demo` on {args.threads} CPU threads: {args.seconds:g} s of speech -> {summary['frames']} "
          f"frames at {summary['size']}, {summary['windows']} windows, {summary['nfe']} DiT forwards "
          f"(torch {torch.__version__}, {os.cpu_count()} CPUs)")
    columns = [("this tree", summary, wall, cpu)]
    if baseline is not None:
        columns.append(("plain vae.encode", *baseline))
    print("| stage | " + " | ".join(f"{name}: s | share | s per video s" for name, *_ in columns) + " |")
    print("| --- |" + " --- | --- | --- |" * len(columns))
    stages = list(summary["timings"])
    for stage in [*stages, "startup and other", "wall", "process CPU (all threads)"]:
        cells = []
        for _, result, seconds, cpu_seconds in columns:
            if stage.startswith("process CPU"):
                cells.append(f"{cpu_seconds:.1f} | {100 * cpu_seconds / seconds:.0f}% | {cpu_seconds / video:.2f}")
                continue
            timings = result["timings"]
            value = {"wall": seconds, "startup and other": seconds - sum(timings.values())}.get(stage,
                                                                                              timings.get(stage, 0.0))
            cells.append(f"{value:.1f} | {100 * value / seconds:.0f}% | {value / video:.2f}")
        print(f"| {stage} | " + " | ".join(cells) + " |")
    dit_per_nfe = summary["timings"].get("dit", 0.0) / max(summary["nfe"], 1)
    decode_per_frame = summary["timings"].get("decode", 0.0) / summary["frames"]
    print(f"DiT {dit_per_nfe:.3f} s per forward; decode {decode_per_frame:.3f} s per video frame; goal <= "
          f"{GOAL_SECONDS:g} s for 10 s of speech: {'met' if wall <= GOAL_SECONDS * video / 10 else 'not met'} "
          f"({wall:.1f} s for {video:g} s)")


if __name__ == "__main__":
    main()
