"""Throughput of SFD sampling with random full-size weights: images per second, NFE and the VAE-decode share.

    python benchmarks/bench_sfd.py            # CUDA: XL/1, 1p0B/1; batch 64; Euler-100, Heun-50, dopri5; bf16, fp32
    python benchmarks/bench_sfd.py --compile  # the same with torch.compile'd denoisers
    python benchmarks/bench_sfd.py --tiny     # CPU smoke test with tiny shapes

Every run uses AutoGuidance with a random LightningDiT-B/1 (the published setting: one main and one B/1 forward per
evaluation) and decodes with a random f16d32 texture VAE, through the same `generate` loop as `avatarcli sfd`.
fp32 runs with TF32 matmuls, as the reference's inference does. Random weights make dopri5's step count only
indicative: it adapts to the smoothness of the velocity field, which trained weights change.

Measured on one H100 80GB (torch 2.11, batch 64, images/s; the VAE decode is 0.6-2.3% of the time in every row):
    eager       XL/1  bf16: Euler-100 4.24, Heun-50 4.25, dopri5 5.71 (NFE 74)
                XL/1  fp32: Euler-100 3.06, Heun-50 3.06, dopri5 3.55 (NFE 86)
                1p0B  bf16: Euler-100 3.73, Heun-50 3.73, dopri5 5.98 (NFE 62)
                1p0B  fp32: Euler-100 2.57, Heun-50 2.56, dopri5 2.97 (NFE 86)
    --compile   XL/1  Euler-100: bf16 12.97, fp32 5.95;  1p0B Euler-100: bf16 10.50, fp32 4.62
Eager mode is bound by the unfused norms, RoPE and gating, hence the 3x gain from torch.compile in bf16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from avatarcli.loading.sfd import LatentStats
from avatarcli.models.ldm_vae import SDVAE_F16D32, TextureVAEDecoder
from avatarcli.models.sfd import PRESETS, LightningDiT
from avatarcli.sampling.sfd import Guidance
from avatarcli.sfd import DTYPES, SfdJob, SfdModels, generate
from avatarcli.testing.sfd import TINY_DECODER, TINY_GUIDANCE, TINY_MAIN

SOLVERS = {"euler-100": ("euler", 100), "heun-50": ("heun", 50), "dopri5": ("dopri5", 0)}
TINY_SOLVERS = {"euler-10": ("euler", 10), "heun-5": ("heun", 5), "dopri5": ("dopri5", 0)}


def build(name: str, tiny: bool, device: torch.device, dtype: torch.dtype, compile_networks: bool) -> SfdModels:
    main_config = TINY_MAIN["xl" if name == "LightningDiT-XL/1" else "xxl"] if tiny else PRESETS[name]
    weak_config = TINY_GUIDANCE if tiny else PRESETS["LightningDiT-B/1"]
    decoder_config = TINY_DECODER if tiny else SDVAE_F16D32
    with torch.device(device):  # default initialisation, made directly on the device
        main, weak, vae = LightningDiT(main_config), LightningDiT(weak_config), TextureVAEDecoder(decoder_config)
    stats = LatentStats(torch.zeros(1, main_config.texture_chans, 1, 1), torch.ones(1, main_config.texture_chans, 1, 1))
    networks = [m.to(dtype).eval().requires_grad_(False) for m in (main, weak, vae)]
    if compile_networks:
        for network in networks[:2]:
            network.compile()
    return SfdModels(*networks, stats)


def measure(models: SfdModels, job: SfdJob, device: torch.device, repeats: int) -> dict[str, float]:
    guidance = Guidance("autoguidance", 1.5, 1.5)
    labels = [i % 1000 for i in range(job.batch_size)]
    runs = []
    for _ in range(repeats):
        with torch.inference_mode():
            runs.extend(generate(models, labels, job, guidance, device))
    sampling = sum(r.sampling_seconds for r in runs) / len(runs)
    decoding = sum(r.decoding_seconds for r in runs) / len(runs)
    return dict(nfe=sum(r.nfe for r in runs) / len(runs), seconds=sampling + decoding,
                images_per_second=job.batch_size / (sampling + decoding), decode_share=decoding / (sampling + decoding))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 64; 4 with --tiny)")
    parser.add_argument("--models", nargs="+", default=["LightningDiT-XL/1", "LightningDiT-1p0B/1"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--solvers", nargs="+", default=None, help="names from the table (default: all)")
    parser.add_argument("--repeats", type=int, default=1, help="timed batches per row")
    parser.add_argument("--compile", action="store_true", help="torch.compile the two denoisers (fuses the norms)")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --tiny for a CPU smoke test")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    batch = args.batch or (4 if args.tiny else 64)
    solvers = TINY_SOLVERS if args.tiny else SOLVERS
    chosen = args.solvers or list(solvers)

    rows = []
    for name in args.models:
        for dtype_name in args.dtypes:
            models = build(name, args.tiny, device, DTYPES[dtype_name], args.compile)
            for label in chosen:
                solver, steps = solvers[label]
                job = SfdJob(weights_dir=Path("."), solver=solver, steps=max(steps, 3), batch_size=batch,
                             dtype=dtype_name)
                warmup = SfdJob(weights_dir=Path("."), solver="euler", steps=3, batch_size=batch, dtype=dtype_name)
                measure(models, warmup, device, 1)  # kernel selection and allocator warm-up
                result = measure(models, job, device, args.repeats)
                rows.append((name, dtype_name, label, result))
                print(f"{name} {dtype_name} {label}: {result}", file=sys.stderr, flush=True)
            del models
            if device.type == "cuda":
                torch.cuda.empty_cache()

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (tiny shapes)"
    compiled = ", torch.compile" if args.compile else ", eager"
    print(f"\nSFD sampling, AutoGuidance with B/1, batch {batch}, {where}{compiled}")
    print(f"{'model':<22}{'dtype':<7}{'solver':<11}{'NFE':>6}{'s/batch':>10}{'img/s':>9}{'VAE share':>11}")
    for name, dtype_name, label, r in rows:
        print(f"{name:<22}{dtype_name:<7}{label:<11}{r['nfe']:>6.0f}{r['seconds']:>10.2f}"
              f"{r['images_per_second']:>9.2f}{100 * r['decode_share']:>10.1f}%")


if __name__ == "__main__":
    main()
