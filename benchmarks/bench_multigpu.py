"""Window parallelism: seconds of work per second of video on 1, 2, 4 and 8 GPUs, and the peak memory per GPU.

For each GPU count N the script starts N processes under torch's launcher (`torch.distributed.run --standalone`,
what `avatarcli animate --gpus N` does); each builds the full-size StableAvatar components with random weights
(common.full_size_components) on its GPU and runs the library's `animate` on the same synthetic speech clip, writing
nothing (null sink; rank 0 still decodes every frame). Every process reports its stage times, its transformer
forwards and its peak GPU memory; the table gives, per N:

  windows, steps, forwards per rank, generation seconds (rank 0, everything after loading: features, DiT, decode),
  seconds per video second, speedup over the first row, the peak GPU memory of the busiest rank and of rank 0, and
  whether the decoded frames (SHA-256 of the uint8 frames rank 0 hands to the sink) equal the first row's.

`--context-parallel K` also splits every forward over K GPUs (Ulysses; GPU counts not divisible by K are skipped);
its frames equal the others' only to bf16 rounding.

    python benchmarks/bench_multigpu.py --gpus 1,2,4,8 --seconds 20 --steps 10 --size 480x832   # 8 H200s
    python benchmarks/bench_multigpu.py --gpus 1 --append rows.jsonl ...; ... --gpus 2,4,8 --append rows.jsonl ...
    python benchmarks/bench_multigpu.py --gpus 3,6 --context-parallel 3 --seconds 20 --steps 10  # Ulysses
    python benchmarks/bench_multigpu.py --tiny --gpus 1,2 --seconds 10 --size 64x64 --steps 4     # CPU, gloo

Same seed, same frames at every N (tests/test_parallel.py checks that); only the time changes. The wavefront runs
window k's step s at tick 2s + k (overlap at most half a window), so about `steps` windows are in flight and up to
min(N, windows / 2) ranks are busy in the steady part; a clip of W windows takes at least 2 (steps - 1) + W ticks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def worker(args) -> None:
    """One rank: build the components on its device, run the job, write its row."""
    import hashlib

    import torch

    import avatarcli.sink.ffmpeg as sinks
    from avatarcli.parallel import local_rank, rank
    from avatarcli.pipeline import AnimateJob, animate
    from avatarcli.presets import load_preset
    from avatarcli.testing.components import write_tiny_umt5_tokenizer
    from common import full_size_components, synthetic_speech

    if args.tiny:
        torch.set_num_threads(1)
        device, dtype = torch.device("cpu"), torch.float32
    else:
        torch.cuda.set_device(local_rank())
        device, dtype = torch.device("cuda", local_rank()), torch.bfloat16
    work = Path(tempfile.mkdtemp())
    torch.manual_seed(0)  # the same random weights in every process and every run
    components = full_size_components(device, dtype, write_tiny_umt5_tokenizer(work / "tok"), args.tiny)
    preset = load_preset(args.preset).with_overrides(steps=args.steps, size=args.size)
    job = AnimateJob(portrait=ROOT / "examples" / "portrait.png",
                     audio=synthetic_speech(work / "talk.wav", args.seconds), output=work / "out.mp4",
                     preset=preset, device="cpu" if args.tiny else "cuda", null_sink=True,
                     context_parallel=args.context_parallel)
    digest = hashlib.sha256()
    count = sinks.NullSink.write

    def write(sink, frames):  # the frames rank 0 decoded, hashed on their way to the null sink
        digest.update(frames.tobytes())
        count(sink, frames)

    sinks.NullSink.write = write
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = animate(job, models=components)
    stages = {k: v for k, v in result.timings.items() if k != "load"}
    row = dict(rank=rank(), world=result.world_size, windows=result.windows, steps=result.steps,
               frames=result.frames, video_seconds=result.video_seconds, nfe_per_rank=result.nfe_per_rank,
               generation=sum(stages.values()), **{f"t_{k}": v for k, v in stages.items()},
               peak_gib=result.peak_gpu_bytes / 2**30 if device.type == "cuda" else result.peak_rss_bytes / 2**30,
               device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               frames_sha256=digest.hexdigest())
    (Path(args.worker) / f"rank{rank()}.json").write_text(json.dumps(row))


def run(gpus: int, args, folder: Path) -> dict:
    """Launch `gpus` processes of this script and merge their rows into one."""
    folder.mkdir(parents=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
               str(Path(__file__).resolve()), "--worker", str(folder), "--seconds", str(args.seconds),
               "--steps", str(args.steps), "--size", args.size, "--preset", args.preset,
               "--context-parallel", str(args.context_parallel)] + (["--tiny"] * args.tiny)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
    if args.tiny:
        env["OMP_NUM_THREADS"] = "1"
    subprocess.run(command, env=env, check=True)
    rows = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(gpus)]
    first = rows[0]
    return dict(gpus=gpus, device=first["device"], windows=first["windows"], steps=first["steps"],
                frames=first["frames"], video_seconds=first["video_seconds"], nfe_per_rank=first["nfe_per_rank"],
                generation=first["generation"], dit_max=max(r.get("t_dit", 0.0) for r in rows),
                decode=first.get("t_decode", 0.0), peak_max=max(r["peak_gib"] for r in rows),
                peak_rank0=first["peak_gib"], frames_sha256=first["frames_sha256"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", default="1,2,4,8", help="comma-separated process counts")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", default="480x832")
    parser.add_argument("--preset", default="reference", help="reference: no step prediction, fixed forwards")
    parser.add_argument("--context-parallel", type=int, default=1, help="GPUs splitting each forward (Ulysses)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (gloo)")
    parser.add_argument("--append", type=Path, default=None, help="JSON-lines file collecting rows across runs "
                        "(the speedup is over its first row)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    work = Path(tempfile.mkdtemp())
    results = []
    for gpus in (int(g) for g in args.gpus.split(",")):
        if gpus % args.context_parallel:
            continue
        results.append(run(gpus, args, work / f"gpus{gpus}"))
        print(json.dumps(results[-1]), flush=True)
        if args.append:
            with args.append.open("a") as f:
                f.write(json.dumps(results[-1]) + "\n")
    if args.append:
        results = [json.loads(line) for line in args.append.read_text().splitlines()]
    base = results[0]["generation"]
    memory = "RSS GiB" if args.tiny else "GPU GiB"
    print(f"\ncontext parallelism: {args.context_parallel} GPU(s) per forward")
    print(f"{'device':<24} {'GPUs':>4} {'win':>4} {'steps':>5} {'forwards per rank':<28} {'DiT s max':>9} "
          f"{'decode s':>8} {'gen s':>8} {'s / video s':>11} {'speedup':>7} {'peak ' + memory:>14} "
          f"{'rank 0 ' + memory:>14} {'same frames':>11}")
    for r in results:
        print(f"{r['device']:<24} {r['gpus']:>4} {r['windows']:>4} {r['steps']:>5} "
              f"{','.join(map(str, r['nfe_per_rank'])):<28} {r['dit_max']:>9.1f} {r['decode']:>8.1f} "
              f"{r['generation']:>8.1f} {r['generation'] / r['video_seconds']:>11.2f} "
              f"{base / r['generation']:>7.2f} {r['peak_max']:>14.2f} {r['peak_rank0']:>14.2f} "
              f"{str(r['frames_sha256'] == results[0]['frames_sha256']):>11}")


if __name__ == "__main__":
    main()
