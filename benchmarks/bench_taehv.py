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
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avatarcli.decode.decoders import streaming_decoder  # noqa: E402
from avatarcli.loading.taehv import build_tiny_decoder  # noqa: E402
from avatarcli.models.taehv import TAEHVConfig  # noqa: E402
from avatarcli.testing.flashportrait_turbo import TINY_TAEHV, tiny_fast_vae_state_dict  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TINY_WAN_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                    temperal_downsample=[False, True, True])


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLWan(**TINY_WAN_VAE) if tiny else AutoencoderKLWan()  # the default config is Wan2.1's
    vae = (vae if dtype == torch.float32 else vae.to(dtype)).eval().requires_grad_(False)
    config = TINY_TAEHV if tiny else TAEHVConfig()
    state = tiny_fast_vae_state_dict(config, encoder_width=8 if tiny else 64)
    tiny_vae = build_tiny_decoder(state, source="random TAEHV", dtype=dtype, device=device)
    return vae, tiny_vae


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stream(decoder, latents: torch.Tensor, chunk: int, device: torch.device) -> tuple[np.ndarray, float, float]:
    """Frames, seconds and peak GiB of one streamed decode."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        pieces = [decoder.push(latents[:, :, s : s + chunk]) for s in range(0, latents.shape[2], chunk)]
    synchronize(device)
    seconds = time.perf_counter() - start
    decoder.close()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return np.concatenate(pieces), seconds, peak


def random_latents(latent_frames: int, width: int, height: int, device: torch.device) -> torch.Tensor:
    return torch.randn(1, 16, latent_frames, height // 8, width // 8,
                       generator=torch.Generator().manual_seed(1)).to(device)


def timed_decode(kind: str, vae, tiny_vae, latents: torch.Tensor, chunk: int,
                 device: torch.device) -> tuple[np.ndarray, float, float]:
    """Frames, seconds and peak GiB of one streamed decode with the `kind` decoder, after a 2-latent warm-up."""
    decoder = streaming_decoder(kind, vae=vae, tiny_vae=tiny_vae)
    stream(decoder, latents[:, :, : min(2, latents.shape[2])], chunk, device)
    return stream(decoder, latents, chunk, device)


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
    vae, tiny_vae = build(args.tiny, device, DTYPES[dtype_name])

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
