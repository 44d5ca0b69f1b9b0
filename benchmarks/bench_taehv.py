"""Tiny video decoder (TAEHV, FlashPortrait's `fast_vae.pth`) against the full Wan2.1 VAE: streaming decode time and
the PSNR of the tiny decode against the full decode of the same latents.

    python benchmarks/bench_taehv.py                       # CUDA: 512x512 and 720x1280, 21 latent frames, bf16
    python benchmarks/bench_taehv.py --sizes 480x832 --latent-frames 51 --dtype fp32
    python benchmarks/bench_taehv.py --tiny                # CPU smoke test with tiny shapes

Both decoders run through the same streaming interface the pipeline uses (decode/decoders.py), pushing
`--chunk` latent frames at a time and producing uint8 frames. Weights are random (the Wan VAE with diffusers'
default initialisation, the tiny decoder with avatarcli.testing's recipe), so the PSNR column only shows that the
mechanics run end to end on the same latents: it says NOTHING about the quality of the published decoders.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from common import build_decoders, random_latents, timed_decode

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test)")
    parser.add_argument("--sizes", nargs="+", default=None, help="WxH output sizes (default 512x512 720x1280)")
    parser.add_argument("--latent-frames", type=int, default=None, help="latent frames (default 21 = 81 frames)")
    parser.add_argument("--chunk", type=int, default=4, help="latent frames per push")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --tiny for a CPU smoke test")
    dtype_name = args.dtype or ("fp32" if args.tiny else "bf16")
    sizes = args.sizes or (["64x64"] if args.tiny else ["512x512", "720x1280"])
    latent_frames = args.latent_frames or (5 if args.tiny else 21)
    vae, tiny_vae = build_decoders(args.tiny, device, DTYPES[dtype_name])

    rows = []
    for size in sizes:
        width, height = (int(v) for v in size.split("x"))
        latents = random_latents(latent_frames, width, height, device)
        frames = {}
        for kind in ("full", "tiny"):
            frames[kind], seconds, peak = timed_decode(kind, vae, tiny_vae, latents, args.chunk, device)
            rows.append((size, kind, len(frames[kind]), seconds, peak))
            print(f"{size} {kind}: {seconds:.3f} s", file=sys.stderr, flush=True)
        rows[-1] += (psnr(frames["tiny"], frames["full"]),)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (tiny shapes)"
    print(f"\nStreaming decode, {latent_frames} latent frames in chunks of {args.chunk}, {dtype_name}, {where}, "
          "random weights (PSNR: mechanics only)")
    print(f"{'size':<10}{'decoder':<9}{'frames':>7}{'seconds':>9}{'frames/s':>10}{'speed-up':>10}{'peak GiB':>10}"
          f"{'PSNR tiny vs full':>19}")
    for index, row in enumerate(rows):
        size, kind, count, seconds, peak = row[:5]
        full_seconds = rows[index - 1][3] if kind == "tiny" else seconds
        quality = f"{row[5]:.2f} dB" if len(row) > 5 else "-"
        memory = "-" if peak is None else f"{peak:.2f}"
        print(f"{size:<10}{kind:<9}{count:>7}{seconds:>9.3f}{count / seconds:>10.1f}{full_seconds / seconds:>9.2f}x"
              f"{memory:>10}{quality:>19}")


if __name__ == "__main__":
    main()
