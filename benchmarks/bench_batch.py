"""`avatarcli batch` against one `avatarcli animate` process per job, and the cost of the resume state.

1. Wall time of N short jobs run as one batch (models loaded once) vs N separate `animate` processes (each loads
   every model), both through the installed CLI in subprocesses, on random weights written in the published layout
   (full size on the GPU: ~17 GB written once into --weights-dir and reused).
   The separate processes share a fresh prompt cache: the first encodes the prompts with umT5 (and stores them), the
   others find them on disk and never load umT5; their load time and GPU peak show what the cache saves. The batch
   starts from a fresh cache of its own, so it too encodes the prompts once.
2. The resume state of a long job at the benchmark size: `animate` saving after every window-step, stopped once the
   wavefront is full and the first frames are encoded; the size of state.pt and of the encoded segments, and the time
   of one save (the segment cut, the torch.save of the sampler and decoder state, fsync and rename).

    python benchmarks/bench_batch.py --size 480x832 --steps 10            # GPU, full-size random weights
    python benchmarks/bench_batch.py --tiny                              # CPU smoke test of the script

Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import EXAMPLES, synthetic_speech


def random_weights(shapes: dict, seed: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """Norm gains near 1, small biases, fan-in scaled weights; drawn on `device` (fast for billions of values)."""
    generator = torch.Generator(device).manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        parts = key.split(".")
        noise = torch.randn(shape, generator=generator, device=device)
        if parts[-1] == "gamma" or (parts[-1] == "weight" and len(parts) > 1 and "norm" in parts[-2]):
            value = 1.0 + 0.1 * noise
        elif parts[-1] == "bias":
            value = 0.05 * noise
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            value = noise / max(1, fan_in) ** 0.5
        state[key] = value.to(dtype).cpu()
    return state


def write_full_weights(folder: Path, device: str) -> Path:
    """Every StableAvatar file the pipeline reads, at full size with random values, in the published layout."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    from avatarcli.loading.stableavatar import CLIP_FILE, T5_FILE, TOKENIZER_FOLDER, VAE_FILE, WAV2VEC_FOLDER
    from avatarcli.testing.components import (umt5_encoder_original_shapes, wan_vae_original_shapes,
                                              write_tiny_umt5_tokenizer, xlm_roberta_clip_original_shapes)
    from avatarcli.testing.stableavatar import FULL_SIZE, wan_config
    from avatarcli.testing.stableavatar import random_state_dict as dit_weights

    if (folder / "complete").is_file():
        return folder
    base, avatar = folder / "Wan2.1-Fun-V1.1-1.3B-InP", folder / "StableAvatar-1.3B"
    for path in (base, avatar, folder / WAV2VEC_FOLDER, (folder / CLIP_FILE).parent):
        path.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps(wan_config(FULL_SIZE), indent=2))
    for n, name in enumerate(("transformer3d-square.pt", "transformer3d-rec-vec.pt")):
        state = {k: v.cpu() for k, v in dit_weights(FULL_SIZE, n, device, torch.bfloat16).items()}
        torch.save(state, avatar / name)
    torch.save(random_weights(wan_vae_original_shapes(), 10, torch.float32, device), folder / VAE_FILE)
    torch.save(random_weights(umt5_encoder_original_shapes(), 11, torch.bfloat16, device), folder / T5_FILE)
    write_tiny_umt5_tokenizer(folder / TOKENIZER_FOLDER)
    torch.save(random_weights(xlm_roberta_clip_original_shapes(), 12, torch.float16, device), folder / CLIP_FILE)
    torch.manual_seed(13)
    Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=32, architectures=["Wav2Vec2ForCTC"])).save_pretrained(
        str(folder / WAV2VEC_FOLDER))
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(str(folder / WAV2VEC_FOLDER))
    (folder / "complete").write_text("ok\n")
    return folder


def cli(*args: str, env: dict) -> tuple[float, subprocess.CompletedProcess]:
    tick = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "avatarcli", *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"avatarcli {args[0]} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return time.perf_counter() - tick, result


def measure_state(weights: Path, work: Path, size: str, steps: int, seconds: float, device: str) -> dict:
    """Run a long job saving after every window-step; stop once the wavefront is full; measure the state."""
    import avatarcli.resume as resume
    from avatarcli.pipeline import AnimateJob, animate
    from avatarcli.presets import load_preset

    from avatarcli.decode.stream import StreamingDecoder
    from avatarcli.sampling.sampler import StreamState

    # One save = finish the current segment (cut) + copy the sampler and decoder state to the host (snapshot) +
    # torch.save, fsync and rename (write). Each part is timed by wrapping it.
    times: dict[str, list[float]] = {"cut": [], "snapshot": [], "write": []}
    patched = [(resume.SegmentedSink, "cut", "cut"), (StreamState, "state_dict", "snapshot"),
               (StreamingDecoder, "state_dict", "snapshot"), (resume.ResumeFolder, "save", "write")]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]

    def timed(function, part):
        def wrapper(*a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            tick = time.perf_counter()
            result = function(*a, **k)
            times[part].append(time.perf_counter() - tick)
            return result
        return wrapper

    for owner, name, part in patched:
        setattr(owner, name, timed(getattr(owner, name), part))
    stop = resume.StopFlag()
    target = 3 * steps  # the wavefront holds about `steps` live windows once it is full

    def progress(p):
        # Full wavefront and frames already encoded: the state then holds the decoder's cache and a segment too.
        if (p.window_steps_done >= target and p.frames_written > 0) or p.window_steps_done >= p.window_steps_total - 2:
            stop.request("benchmark stop")

    output = work / "long.mp4"
    job = AnimateJob(portrait=EXAMPLES / "portrait.png", audio=synthetic_speech(work / "long.wav", seconds, 150),
                     output=output, preset=load_preset("reference").with_overrides(steps=steps, size=size),
                     weights=weights, device=device, save_every=0.0)
    try:
        animate(job, on_progress=progress, stop=stop)
        raise SystemExit("the long job finished before the stop; use a longer --state-seconds")
    except resume.AnimateInterrupted as stopped:
        frames = stopped.frames
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)
    saves = len(times["write"])
    cut, snapshot, write = (np.array(times[k]) for k in ("cut", "snapshot", "write"))
    snapshot = snapshot.reshape(saves, 2).sum(axis=1)
    total = cut + snapshot + write
    folder = resume.resume_dir(output)
    state = torch.load(folder / "state.pt", weights_only=True)
    sampler_bytes = sum(t.numel() * t.element_size() for _, _, t in state["sampler"]["outputs"])
    replay = state["decoder"]["replay"]  # the last latent frames the decoder saw, not its cache (decode/stream.py)
    decoder_bytes = 0 if replay is None else replay.numel() * replay.element_size()
    row = dict(state_mb=(folder / "state.pt").stat().st_size / 2**20, sampler_mb=sampler_bytes / 2**20,
               decoder_mb=decoder_bytes / 2**20, live_outputs=len(state["sampler"]["outputs"]),
               segments_mb=sum(p.stat().st_size for p in folder.glob("segment-*.mp4")) / 2**20,
               frames=frames, saves=saves, save_mean=float(total.mean()), save_max=float(total.max()),
               cut_mean=float(cut.mean()), snapshot_mean=float(snapshot.mean()), write_mean=float(write.mean()))
    shutil.rmtree(folder)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=2.0, help="audio per batch job")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", default="480x832")
    parser.add_argument("--state-seconds", type=float, default=30.0, help="audio of the long job for the state")
    parser.add_argument("--weights-dir", type=Path, default=None, help="where the random weights are (re)used")
    parser.add_argument("--skip-batch", action="store_true")
    parser.add_argument("--skip-state", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny weights, 64x64, 2 steps")
    args = parser.parse_args()
    if args.tiny:
        args.size, args.steps, args.seconds, args.state_seconds = "64x64", 2, min(args.seconds, 0.4), 8.0

    device = "cpu" if args.tiny else "cuda"
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    weights_dir = args.weights_dir or work / "weights"
    tick = time.perf_counter()
    if args.tiny:
        from avatarcli.testing import make_tiny_weights

        weights = make_tiny_weights(weights_dir)
    else:
        weights = write_full_weights(weights_dir, device)
    weights_seconds = time.perf_counter() - tick
    env = dict(os.environ, AVATARCLI_CACHE_DIR=str(work / "cache"), AVATARCLI_PROMPT_CACHE="1")
    common = ["--weights", str(weights), "--size", args.size, "--steps", str(args.steps), "--preset", "reference",
              "--device", device]
    rows = {}
    if not args.skip_batch:
        audios = [synthetic_speech(work / f"a{i}.wav", args.seconds, 140 + 20 * i) for i in range(args.jobs)]
        separate, processes = [], []
        for i, audio in enumerate(audios):
            seconds, result = cli("animate", str(EXAMPLES / "portrait.png"), "--audio", str(audio), "-o",
                                  str(work / f"separate{i}.mp4"), *common, "--json", env=env)
            separate.append(seconds)
            summary = json.loads(result.stdout.strip().splitlines()[-1])
            processes.append(dict(seconds=seconds, prompt="encoded (umT5 loaded)" if i == 0 else "cached on disk",
                                  load=summary["timings"].get("load", 0.0),
                                  features=summary["timings"].get("features", 0.0),
                                  gpu_peak_gib=summary["peak_gpu_bytes"] / 2**30,
                                  rss_peak_gib=summary["peak_rss_bytes"] / 2**30))
        manifest = work / "jobs.yaml"
        manifest.write_text(json.dumps({
            "defaults": {"weights": str(weights), "size": args.size, "steps": args.steps, "preset": "reference",
                         "device": device},
            "jobs": [{"portrait": str(EXAMPLES / "portrait.png"), "audio": str(a), "output": f"batch{i}.mp4"}
                     for i, a in enumerate(audios)]}))  # JSON is YAML
        # Its own fresh prompt cache: like the first separate process, the batch encodes the prompts once.
        batch_env = dict(env, AVATARCLI_CACHE_DIR=str(work / "cache-batch"))
        batch_seconds, result = cli("batch", str(manifest), "--json", "--quiet", env=batch_env)
        report = json.loads(result.stdout.strip().splitlines()[-1])
        rows["batch"] = dict(jobs=args.jobs, separate=sum(separate), separate_each=separate, batch=batch_seconds,
                             loads=report["model_loads"], speedup=sum(separate) / batch_seconds,
                             job_seconds=[j["seconds"] for j in report["jobs"]], processes=processes)
    if not args.skip_state:
        rows["state"] = measure_state(weights, work, args.size, args.steps, args.state_seconds, device)
    shutil.rmtree(work / "weights", ignore_errors=True) if args.weights_dir is None else None

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\nweights written in {weights_seconds:.1f} s; device {name}; size {args.size}; {args.steps} steps")
    if "batch" in rows:
        r = rows["batch"]
        print(f"\n{'jobs':>4} {'audio s':>7} {'separate processes s':>21} {'batch s':>8} {'model loads':>11} "
              f"{'speed-up':>8}")
        print(f"{r['jobs']:>4} {args.seconds:>7.1f} {r['separate']:>21.1f} {r['batch']:>8.1f} {r['loads']:>11} "
              f"{r['speedup']:>8.2f}")
        print("separate, per process: " + ", ".join(f"{s:.1f}" for s in r["separate_each"]) +
              "; batch, per job: " + ", ".join(f"{s:.1f}" for s in r["job_seconds"]))
        print(f"\n{'process':>7} {'prompt':<22} {'wall s':>7} {'load s':>7} {'features s':>10} {'GPU peak GiB':>12} "
              f"{'RSS peak GiB':>12}")
        for i, p in enumerate(r["processes"]):
            print(f"{i + 1:>7} {p['prompt']:<22} {p['seconds']:>7.1f} {p['load']:>7.1f} {p['features']:>10.1f} "
                  f"{p['gpu_peak_gib']:>12.2f} {p['rss_peak_gib']:>12.2f}")
    if "state" not in rows:
        return
    s = rows["state"]
    print(f"\n{'size':>8} {'frames':>6} {'live outputs':>12} {'state.pt MB':>11} {'sampler MB':>10} "
          f"{'decoder MB':>10} {'segments MB':>11} {'saves':>5} {'save s mean':>11} {'save s max':>10} "
          f"{'cut s':>6} {'snapshot s':>10} {'write s':>7}")
    print(f"{args.size:>8} {s['frames']:>6} {s['live_outputs']:>12} {s['state_mb']:>11.1f} {s['sampler_mb']:>10.1f} "
          f"{s['decoder_mb']:>10.1f} {s['segments_mb']:>11.2f} {s['saves']:>5} {s['save_mean']:>11.3f} "
          f"{s['save_max']:>10.3f} {s['cut_mean']:>6.3f} {s['snapshot_mean']:>10.3f} {s['write_mean']:>7.3f}")


if __name__ == "__main__":
    main()
