"""The full Wan VAE's streaming decode (the pipeline's StreamingDecoder) with speed levers applied to it, beside the
eager decode and the tiny decoder: time per latent frame, the first frames' time (the compiles), peak memory, PSNR
against eager. The levers are this script's, not avatarcli's: none paid on an H100 (benchmarks/README.md).

    python benchmarks/bench_decode.py                                   # CUDA, 480x832, 21 latent frames, bf16
    python benchmarks/bench_decode.py --variants eager cudnn cudnn+compile tiny --latent-frames 41
    python benchmarks/bench_decode.py --tiny                            # CPU smoke test (levers not applied)

Levers: `cudnn` (cuDNN autotunes the decoder's convolutions), `channels_last` (weights and frames in the
channels-last-3d layout), `compile` (the decoder torch.compile'd, one graph per cache state). Each variant builds the
same random Wan VAE afresh (seed 0), decodes 3 latent frames as a warm-up (the compiles and autotuning happen there:
`warm-up s`), then times a fresh stream of `--latent-frames` pushed `--chunk` at a time. Weights are random, so the
PSNR of a lever against eager says how far its kernels' rounding moves the frames, and the tiny decoder's PSNR says
nothing about its quality (it decodes another network's guess).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from common import build_decoders, random_latents, stream, synchronize

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_VARIANTS = ("eager", "cudnn", "channels_last", "cudnn+channels_last", "cudnn+compile", "tiny")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


LEVERS = ("cudnn", "channels_last", "compile")


def _to_channels_last(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return (args[0].contiguous(memory_format=torch.channels_last_3d), *args[1:]), kwargs


def apply_levers(vae, levers: list[str]) -> None:
    """The levers on `vae.decoder`, in place (CUDA only)."""
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        raise SystemExit(f"unknown lever(s) {', '.join(unknown)}; choose from {', '.join(LEVERS)}")
    decoder = vae.decoder
    if next(decoder.parameters()).device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = "cudnn" in levers
    if "channels_last" in levers:
        decoder.to(memory_format=torch.channels_last_3d)
        decoder.register_forward_pre_hook(_to_channels_last, with_kwargs=True)
    if "compile" in levers:
        from torch._dynamo import config as dynamo

        dynamo.recompile_limit = max(dynamo.recompile_limit, 32)
        decoder.compile(dynamic=False)


def decoder_for(variant: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    from avatarcli.decode.decoders import streaming_decoder

    torch.backends.cudnn.benchmark = False
    torch._dynamo.reset()
    vae, tiny_vae = build_decoders(tiny, device, dtype)
    if variant == "tiny":
        return streaming_decoder("tiny", tiny_vae=tiny_vae)
    apply_levers(vae, [] if variant == "eager" else variant.split("+"))
    return streaming_decoder("full", vae=vae)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test)")
    parser.add_argument("--size", default=None, help="WxH output size (default 480x832)")
    parser.add_argument("--latent-frames", type=int, default=None, help="latent frames timed (default 21 = 81 frames)")
    parser.add_argument("--chunk", type=int, default=4, help="latent frames per push")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        help="eager, tiny, or levers joined with + (cudnn, channels_last, compile)")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --tiny for a CPU smoke test")
    dtype_name = args.dtype or ("fp32" if args.tiny else "bf16")
    width, height = (int(v) for v in (args.size or ("64x64" if args.tiny else "480x832")).split("x"))
    latent_frames = args.latent_frames or (5 if args.tiny else 21)
    latents = random_latents(latent_frames, width, height, device)

    rows, reference = [], None
    for variant in args.variants:
        decoder = decoder_for(variant, args.tiny, device, DTYPES[dtype_name])
        synchronize(device)
        tick = time.perf_counter()
        stream(decoder, latents[:, :, :3], args.chunk, device)
        warm = time.perf_counter() - tick
        frames, seconds, peak = stream(decoder, latents, args.chunk, device)
        if variant == "eager":
            reference = frames
        quality = psnr(frames, reference) if reference is not None and variant != "eager" else None
        rows.append((variant, len(frames), warm, seconds, peak, quality))
        print(f"{variant}: warm-up {warm:.2f} s, {seconds:.3f} s", file=sys.stderr, flush=True)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (tiny shapes, levers not applied)"
    print(f"\nStreaming decode at {width}x{height}, {latent_frames} latent frames in chunks of {args.chunk}, "
          f"{dtype_name}, {where}, random weights")
    eager = next((row[3] for row in rows if row[0] == "eager"), None)
    print(f"{'variant':<30}{'frames':>7}{'warm-up s':>10}{'seconds':>9}{'ms/latent':>10}{'speed-up':>9}"
          f"{'peak GiB':>9}{'PSNR vs eager':>15}")
    for variant, count, warm, seconds, peak, quality in rows:
        speed = f"{eager / seconds:.2f}x" if eager else "-"
        memory = "-" if peak is None else f"{peak:.2f}"
        dev = "-" if quality is None else ("identical" if quality == float("inf") else f"{quality:.2f} dB")
        print(f"{variant:<30}{count:>7}{warm:>10.2f}{seconds:>9.3f}{1000 * seconds / latent_frames:>10.1f}"
              f"{speed:>9}{memory:>9}{dev:>15}")


if __name__ == "__main__":
    main()
