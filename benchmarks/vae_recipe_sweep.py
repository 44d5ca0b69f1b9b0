"""Which VAE recipe learns the demo world fastest: short VAE-only training runs side by side, on one pool.

    python benchmarks/vae_recipe_sweep.py --seconds 80            # one GPU: each variant 80 s of training
    python benchmarks/vae_recipe_sweep.py --device cpu --size 64 --identities 40 --batch 4 --still-batch 16 \
        --seconds 240 --variants recipe,random-taps,streamed       # the same, scaled down to 2 CPU cores
    python benchmarks/vae_recipe_sweep.py --tiny                  # CPU smoke test of the script (numbers mean nothing)

The demo VAE (avatarcli/demo/training/vae.py) must reconstruct the world's videos at >= 32 dB within the few minutes
a demo retrain gives it. Each variant trains a new VAE from the same seed on the same pool for the same wall time,
then round-trips a held-out face (config.HELD_OUT, not in the pool): the PSNR of its whole 81-frame video and of its
first frame (the first latent frame is encoded and decoded alone, as a still image). Rows print as they finish; the
table is printed last.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

VARIANTS = {  # name: (what it is, TrainConfig overrides); the first is the recipe as it stands
    "recipe": ("stills half (per-frame start, 2D), then streamed clips", dict()),
    "random-taps": ("the same, the temporal taps left at their random init", dict(vae_per_frame_start=False)),
    "streamed": ("streamed clips only", dict(vae_still_share=0.0)),
    "stills": ("stills only (per-frame start)", dict(vae_still_share=1.0)),
    "streamed-lr2e-3": ("streamed clips only, lr 2e-3", dict(vae_still_share=0.0, vae_lr=2e-3)),
}


def main() -> int:
    from avatarcli.demo.training import (
        HELD_OUT, TrainConfig, make_pool, render_identity, round_trip_psnr, train_vae, with_overrides,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=80.0, help="training wall time of each variant")
    parser.add_argument("--identities", type=int, default=200)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated names of " + ", ".join(VARIANTS))
    parser.add_argument("--device", help="default cuda")
    parser.add_argument("--size", type=int, help="frame size of the pool (default 128)")
    parser.add_argument("--batch", type=int, help="streamed clips per step (default 12)")
    parser.add_argument("--still-batch", type=int, help="stills per step (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (a smoke test of the script)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = TrainConfig.tiny() if args.tiny else TrainConfig(identities=args.identities)
    base = with_overrides(base, device=args.device, size=args.size, vae_batch=args.batch,
                          vae_still_batch=args.still_batch, workers=0 if args.device == "cpu" else None)
    started = time.perf_counter()
    log = (lambda line: print(f"[{time.perf_counter() - started:6.1f} s] {line}", flush=True))
    if base.device == "cuda":
        torch.backends.cudnn.benchmark = True
    pool = make_pool(base, log)
    frames = min(81, 4 * (base.clip_latents - 1) + 1)
    held_out = torch.from_numpy(render_identity((HELD_OUT, frames, base.size))[0])
    rows = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        config = replace(base, vae_seconds=args.seconds, vae_steps=10**7, **VARIANTS[name][1])
        if args.tiny:
            config = replace(config, vae_seconds=2.0, vae_batch=1, vae_episode_latents=min(config.vae_episode_latents, 4))
        t0 = time.perf_counter()
        lines: list[str] = []
        vae = train_vae(pool, config, lines.append)
        spent = time.perf_counter() - t0
        steps = sum(int(line.split()[-2]) for line in lines if line.startswith("vae stills: ")) + next(
            (int(line.split()[1]) for line in lines if line.startswith("vae: ")), 0)
        whole, first = round_trip_psnr(vae, held_out)
        rows.append((f"{name}: {VARIANTS[name][0]}", spent, steps, whole, first))
        log(f"{name}: {spent:.0f} s, round trip {whole:.2f} dB, first frame {first:.2f} dB")
        del vae
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if base.device == "cuda" else "cpu"
    print(f"\nVAE recipes, {args.seconds:g} s of training each, base {base.sizes.vae_base}, {base.size} px, "
          f"{base.identities} identities, {device}; held-out face {HELD_OUT}, {frames} frames")
    print("| variant | seconds | steps | round trip dB | first frame dB |\n| --- | --- | --- | --- | --- |")
    for name, spent, steps, whole, first in rows:
        print(f"| {name} | {spent:.0f} | {steps} | {whole:.2f} | {first:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
