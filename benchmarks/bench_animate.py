"""`animate` end to end with full-size random weights: stage split, speed, and memory vs clip length.

Builds every component at its real size with random weights (the DiT through the same strict loading code as the
published checkpoint; VAE, umT5-XXL, CLIP ViT-H/14 and wav2vec2-base from their real configs), then runs the
library's `animate` on a synthetic speech clip (several lengths in one run share the build; run one length per process
when the host peak RSS per length matters):

    python benchmarks/bench_animate.py --seconds 5  --steps 10 --size 480x832
    python benchmarks/bench_animate.py --seconds 60 --steps 10 --size 480x832
    python benchmarks/bench_animate.py --tiny --seconds 2     # CPU smoke test of the script
    python benchmarks/bench_animate.py --seconds 10 --preset fast,balanced --size 480x832 --compile
                                                              # step prediction: presets run one after the other
                                                              # on the same components (one build, one compile),
                                                              # each on its own step grid unless --steps is given
    python benchmarks/bench_animate.py --seconds 30 --steps 10 --compile --null-sink --overlap-decode both
    python benchmarks/bench_animate.py --replay fast.trace --size 480x832 --compile
                                                              # the forwards of a recorded run (`avatarcli animate
                                                              # ... --model demo --preset fast --trace fast.trace`)
    python benchmarks/bench_animate.py --tiny --replay fast.trace   # CPU smoke test of the replay

`--overlap-decode both` runs the clip twice in one process, decode inline (off) then overlapped with the DiT (on);
each row shows the DiT's share of the generation time, the decode time the DiT waited for (`decode`) and the decode
time hidden behind it (`hidden`: worker time minus waits). Unless --no-stock, the first rows are the window-step of
stock diffusers' WanTransformer3DModel at the same size (eager, and fused+compiled with --compile) next to ours.

`--replay TRACE` runs `animate` once more, repeating the forwards an `animate --trace` file recorded (the same windows,
steps, guidance branches and predicted steps: avatarcli/sampling/trace.py) at --size, end to end with the decode: on
random weights the step predictor would see erratic velocities and compute nearly every step, so this is the honest
wall time of a preset whose skips were decided by a trained model (the demo). The clip length, preset and steps come
from the trace; it prints a markdown table last (wall s per video s, the stage split, the GPU peak).

Prints a table last (one row per run; --append FILE also accumulates rows across runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from avatarcli.pipeline import AnimateJob, animate
from avatarcli.presets import load_preset
from avatarcli.testing.components import write_tiny_umt5_tokenizer
from avatarcli.testing.stableavatar import stock_wan_twin

from common import EXAMPLES, build_tiny_vae, full_size_components, synchronize, synthetic_speech

def warm_up(transformer, size: str, device: torch.device, dtype: torch.dtype) -> None:
    from avatarcli.models.stableavatar import AudioConditioning

    width, height = (int(v) for v in size.split("x"))
    cfg = transformer.config
    x = torch.zeros(3, cfg.in_channels, 21, height // 8, width // 8, device=device, dtype=dtype)
    audio = AudioConditioning(torch.zeros(1, 161, cfg.audio_in_dim, device=device), [None, 0, 0])
    with torch.no_grad():
        transformer(x, torch.full((3,), 999.0, device=device), torch.zeros(3, 512, cfg.text_dim, device=device,
                    dtype=dtype), torch.zeros(3, 257, cfg.image_dim, device=device, dtype=dtype), audio)


def stock_window_step(args, device: torch.device, dtype: torch.dtype, transformer, stock
                      ) -> list[tuple[str, str, float]]:
    """Median seconds of one cfg window-step (batch 3) of stock diffusers' WanTransformer3DModel, sharing our DiT's
    weights (`stock`, built before ours was converted), and of our DiT as this run uses it, on the same inputs;
    compiled (fused q/k/v) when --compile compiled ours."""
    import statistics

    from avatarcli.models.stableavatar import AudioConditioning
    width, height = (int(v) for v in args.size.split("x"))
    cfg = transformer.config
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, cfg.in_channels, 21, height // 8, width // 8, generator=gen, device=device,
                    dtype=dtype).expand(3, -1, -1, -1, -1)
    t = torch.full((3,), 977.9, device=device)
    text = torch.randn(3, 512, cfg.text_dim, generator=gen, device=device, dtype=dtype)
    image = torch.randn(3, 257, cfg.image_dim, generator=gen, device=device, dtype=dtype)
    audio = AudioConditioning(torch.randn(2, 161, cfg.audio_in_dim, generator=gen, device=device), [0, 1, None])
    variant = "eager"
    if args.compile:
        stock.fuse_qkv_projections()
        stock.compile_repeated_blocks(fullgraph=True)
        variant = "compiled fused"

    def seconds(fn) -> float:
        times = []
        for i in range(5):
            if device.type == "cuda":
                torch.cuda.synchronize()
            tick = time.perf_counter()
            with torch.no_grad():
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - tick)
        return statistics.median(times[2:])  # the first two warm up (and compile)

    ours = "ours fp8" if args.precision == "fp8" else "ours"
    return [("stock", variant, seconds(lambda: stock(x, t, text, image, return_dict=False))),
            (ours, variant, seconds(lambda: transformer(x, t, text, image, audio)))]


def decode_precision_psnr(vae, size: str, device: torch.device) -> float:
    """PSNR (dB) of a bfloat16 VAE decode against the float32 decode of the same 5 random latent frames."""
    import copy

    from avatarcli.decode.stream import StreamingDecoder

    width, height = (int(v) for v in size.split("x"))
    latents = torch.randn(1, 16, 5, height // 8, width // 8, generator=torch.Generator().manual_seed(0)).to(device)
    ref = StreamingDecoder(vae).push(latents).astype(np.float64)
    low = StreamingDecoder(copy.deepcopy(vae).to(torch.bfloat16)).push(latents.to(torch.bfloat16))
    mse = np.mean((ref - low.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", default="5", help="clip length in seconds, or several separated by commas "
                        "(one build and compile for all; GPU peaks are per clip, the host RSS peak is cumulative)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's step count (default: its own)")
    parser.add_argument("--size", default=None, help="WxH (default 480x832; --tiny: 64x64)")
    parser.add_argument("--preset", default="reference", help="a preset, or several separated by commas")
    parser.add_argument("--null-sink", action="store_true", help="skip the H.264 encode")
    parser.add_argument("--attention", default=None, help="diffusers attention backend, e.g. _native_cudnn")
    parser.add_argument("--compile", action="store_true", help="compile the DiT blocks")
    parser.add_argument("--vae-dtype", default="auto", help="VAE decode precision (auto: bf16 on GPU)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--append", type=Path, default=None, help="JSON-lines file collecting rows across runs")
    parser.add_argument("--overlap-decode", default="auto", choices=["auto", "on", "off", "both"],
                        help="decode on a worker thread while the DiT continues (both: one row each, off first)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp8"],
                        help="fp8: fp8 linear layers and self-attention in the DiT blocks (avatarcli/models/fp8.py)")
    parser.add_argument("--decoders", default=["full"], nargs="+", choices=["full", "tiny"],
                        help="--replay: decode with the full Wan VAE, the tiny TAEHV decoder (random full-size "
                             "weights: timing only), or each in turn")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock-diffusers window-step comparison")
    parser.add_argument("--replay", type=Path, default=None, metavar="TRACE", nargs="+",
                        help="repeat the forwards of `animate --trace` files, one run each on one build (each its "
                             "clip length, preset and steps; no stock rows)")
    args = parser.parse_args()
    args.no_stock = args.no_stock or args.replay is not None
    args.size = args.size or ("64x64" if args.tiny else "480x832")

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    work = Path(tempfile.mkdtemp())
    build = time.perf_counter()
    components = full_size_components(device, dtype, write_tiny_umt5_tokenizer(work / "tok"), args.tiny)
    if args.attention:
        components.transformer.set_attention_backend(args.attention)
    stock = None if args.no_stock else stock_wan_twin(components.transformer)  # before any conversion of ours
    if stock is not None and args.attention:
        stock.set_attention_backend(args.attention)
    if args.compile:
        components.transformer.fuse_qkv_projections()
    if args.precision == "fp8":
        from avatarcli.models.fp8 import check_fp8_support, use_fp8

        check_fp8_support(device)
        use_fp8(components.transformer)
    if args.compile:
        components.transformer.compile_repeated_blocks(fullgraph=True)
        warm_up(components.transformer, args.size, device, dtype)  # keep compilation out of the DiT time
    build = time.perf_counter() - build

    if args.replay is not None:
        print(f"  built (and compiled) in {build:.1f} s", file=sys.stderr, flush=True)
        rows = []
        if "tiny" in args.decoders:
            components.tiny_decoder = build_tiny_vae(args.tiny, device, dtype)
        for trace, decoder in [(trace, decoder) for trace in args.replay for decoder in args.decoders]:
            rows.append(replay(args, trace, components, work, device, decoder))
            print(replay_table(rows[-1:], args.size), file=sys.stderr, flush=True)  # each as it finishes
        print("\n" + replay_table(rows, args.size))
        return
    stock_rows = [] if stock is None else stock_window_step(args, device, dtype, components.transformer, stock)
    del stock
    for model, variant, seconds in stock_rows:
        print(f"  window-step {model} {variant}: {seconds:.3f} s", file=sys.stderr, flush=True)
    print(f"  built (and compiled) in {build:.1f} s", file=sys.stderr, flush=True)
    psnr = decode_precision_psnr(components.vae, args.size, device)
    presets = args.preset.split(",")
    modes = ["off", "on"] if args.overlap_decode == "both" else [args.overlap_decode]
    rows = []
    for seconds, name, mode in [(float(s), n, m) for s in args.seconds.split(",") for n in presets for m in modes]:
        preset = load_preset(name).with_overrides(steps=args.steps, size=args.size)
        job = AnimateJob(portrait=EXAMPLES / "portrait.png", audio=synthetic_speech(work / "talk.wav", seconds),
                         output=work / "out.mp4", preset=preset, device=str(device), null_sink=args.null_sink,
                         vae_dtype=args.vae_dtype, overlap_decode=mode, precision=args.precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        result = animate(job, models=components)
        worker = result.background_timings.get("decode", 0.0)
        stages = {k: v for k, v in result.timings.items() if k != "load"}
        generation = sum(stages.values())  # time on the main thread; the decode worker runs beside it
        rows.append(dict(
            device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", seconds=seconds,
            frames=result.frames, windows=result.windows, steps=result.steps, nfe=result.nfe, preset=name,
            wall=result.wall_seconds, generation=generation, **{f"t_{k}": v for k, v in stages.items()},
            overlap="on" if worker else "off", decode_hidden=max(worker - stages.get("decode", 0.0), 0.0),
            dit_share=stages.get("dit", 0) / generation, video_per_wall=result.video_seconds / generation,
            gpu_peak_gib=result.peak_gpu_bytes / 2**30, rss_peak_gib=result.peak_rss_bytes / 2**30,
            attention=args.attention or "sdpa", compiled=args.compile, build_seconds=build,
            vae_dtype=args.vae_dtype, bf16_decode_psnr=psnr))
        # Each row as it finishes (and into --append at once): a run cut short by a time limit keeps its rows.
        print(("" if len(rows) > 1 else table_header() + "\n") + table_row(rows[-1]), file=sys.stderr, flush=True)
        if args.append:
            with args.append.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    if args.append:
        rows = [json.loads(line) for line in args.append.read_text().splitlines()]
    if stock_rows:
        print(f"\nwindow-step (cfg, batch 3, {args.size}, 21 latent frames), same process:")
        print(f"{'model':<10} {'variant':<16} {'median s':>9} {'vs stock':>9}")
        stock = {variant: seconds for model, variant, seconds in stock_rows if model == "stock"}
        for model, variant, seconds in stock_rows:
            print(f"{model:<10} {variant:<16} {seconds:>9.3f} {seconds / stock[variant]:>9.3f}")
    print("\n" + table_header())
    for r in rows:
        print(table_row(r))


def replay(args, path: Path, components, work: Path, device: torch.device, decoder: str = "full") -> dict:
    """One `animate` run repeating the trace's forwards at --size; its row (SystemExit when it does not fit)."""
    import yaml

    from avatarcli.sampling.trace import read_trace

    trace = read_trace(path)
    head = trace.header
    if head.get("driver") != "audio":
        sys.exit(f"{path}: recorded with the {head.get('driver')} driver; this replays the audio driver's")
    if head.get("resumed_from_frame"):
        sys.exit(f"{path}: a resumed run's trace covers part of its video; record a whole run")
    settings = work / "traced.yaml"  # the preset as the trace ran it (the model's own settings included)
    settings.write_text(yaml.safe_dump(head["settings"]), encoding="utf-8")
    preset = load_preset(settings).with_overrides(size=args.size, decoder=decoder)
    audio = synthetic_speech(work / "talk.wav", head["frames"] / head["fps"])
    mode = "auto" if args.overlap_decode == "both" else args.overlap_decode
    job = AnimateJob(portrait=EXAMPLES / "portrait.png", audio=audio, output=work / "replay.mp4", preset=preset,
                     device=str(device), null_sink=args.null_sink, vae_dtype=args.vae_dtype, overlap_decode=mode,
                     precision=args.precision)
    synchronize(device)
    result = animate(job, models=components, replay=trace)
    if (result.frames, result.nfe, result.branch_forwards) != (head["frames"], trace.forwards, trace.branch_forwards):
        sys.exit(f"the replay ran {result.frames} frames, {result.nfe} forwards and {result.branch_forwards} branch "
                 f"forwards; the trace has {head['frames']}, {trace.forwards} and {trace.branch_forwards}")
    stages = dict(result.timings)
    if result.background_timings:  # the overlapped decoder's own seconds, beside the main thread's
        stages["decode_overlapped"] = result.background_timings["decode"]
    return dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", trace=path.name,
                preset=head.get("preset", "?"), model=head.get("model", "?"), video=result.video_seconds,
                windows=result.windows, steps=result.steps, forwards=result.nfe,
                branch_forwards=result.branch_forwards, stages=stages, wall=result.wall_seconds,
                gpu_peak_gib=result.peak_gpu_bytes / 2**30, compiled=result.compiled, overlap=mode,
                decoder=decoder)


def replay_table(rows: list[dict], size: str) -> str:
    """The replayed runs as a markdown table: wall s per video s, the stage split (main-thread seconds; with the decode
    overlapped, `decode` is the time the DiT waited for it and `decode_overlapped` its own time beside the DiT) and
    the GPU peak."""
    lines = ["| device | trace (preset, model) | size | video s | windows x steps | forwards | branch forwards | "
             "stages, s | wall s | wall s per video s | GPU peak GiB | compiled | decoder |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        split = ", ".join(f"{name} {seconds:.1f}" for name, seconds in row["stages"].items())
        lines.append(
             f"| {row['device']} | {row['trace']} ({row['preset']}, {row['model']}) | {size} | {row['video']:.2f} | "
             f"{row['windows']} x {row['steps']} | {row['forwards']} | {row['branch_forwards']} | {split} | "
             f"{row['wall']:.1f} | **{row['wall'] / row['video']:.2f}** | {row['gpu_peak_gib']:.2f} | "
             f"{'yes' if row['compiled'] else 'no'} | {row['decoder']} |")
    return "\n".join(lines)


def table_header() -> str:
    return (f"{'device':<24} {'audio s':>7} {'frames':>6} {'win':>4} {'steps':>5} {'features':>8} {'dit':>8} "
            f"{'decode':>7} {'encode':>7} {'overlap':>7} {'hidden':>7} {'DiT %':>6} {'video s/s':>9} {'GPU GiB':>8} "
            f"{'RSS GiB':>8} {'vae':>5} {'bf16 PSNR':>9} {'preset':>9} {'NFE':>5} {'wall s / video s':>16}")


def table_row(r: dict) -> str:
    return (f"{r['device']:<24} {r['seconds']:>7.1f} {r['frames']:>6} {r['windows']:>4} {r['steps']:>5} "
            f"{r.get('t_features', 0):>8.1f} {r.get('t_dit', 0):>8.1f} {r.get('t_decode', 0):>7.1f} "
            f"{r.get('t_encode', 0):>7.1f} {r.get('overlap', 'off'):>7} {r.get('decode_hidden', 0):>7.1f} "
            f"{100 * r['dit_share']:>6.1f} {r['video_per_wall']:>9.4f} "
            f"{r['gpu_peak_gib']:>8.2f} {r['rss_peak_gib']:>8.2f} {r.get('vae_dtype', 'fp32'):>5} "
            f"{r.get('bf16_decode_psnr', float('nan')):>9.1f} {r.get('preset', '?'):>9} {r.get('nfe', 0):>5} "
            f"{1 / r['video_per_wall']:>16.2f}")


if __name__ == "__main__":
    main()
