"""Step-prediction settings against Euler and UniPC at equal NFE on a StableAvatar weights folder, scored in latent
space and on decoded frames (the table behind the `fast` preset's choice, benchmarks/README.md).

    avatarcli demo-face --seed 7 -o face.png --speech talk.wav --seconds 12
    python benchmarks/bench_predict_sweep.py --portrait face.png --audio talk.wav          # embedded demo, CPU
    python benchmarks/bench_predict_sweep.py --portrait face.png --audio talk.wav \
        --methods "euler:8;unipc:8;fast;predict:50:1:8:0.07:3"

Every method runs through the real sliding-window sampler with the pipeline's own denoiser (the reference
preset's guidance, overlap, blend and seed) and is compared with the `reference` preset's result (50 Euler steps):
PSNR of the final latents (peak = the reference latents' range) and of the decoded uint8 frames.
Methods, separated by ';':
  euler:N                      N Euler steps
  unipc:N                      diffusers' UniPCMultistepScheduler (order 2, flow mode), N steps
  PRESET                       a preset's steps and `prediction` section (`reference`: 50 Euler steps)
  predict:STEPS:ORDER:K:TOL:R  step prediction with these settings (warmup 2)
Prints a table last.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from avatarcli.presets import load_preset
from avatarcli.sampling.predict import BlockProbe, Prediction
from avatarcli.sampling.schedule import flow_sigmas

from common import UniPCWindows, model_setup, run

DEFAULT_METHODS = "euler:8;unipc:8;euler:9;unipc:9;balanced;fast"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="a StableAvatar weights folder (default: the embedded demo)")
    parser.add_argument("--portrait", type=Path, required=True)
    parser.add_argument("--audio", type=Path, required=True)
    parser.add_argument("--size", default="128x128")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp8"],
                        help="fp8: the methods run with fp8 linear layers and self-attention (avatarcli/models/fp8.py; "
                             "emulated on the CPU), scored against the reference in the model's dtype; add the "
                             "method 'reference' for the effect of fp8 alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    from avatarcli.demo.model import demo_weights_dir

    setup = model_setup(args.weights or demo_weights_dir(), args.portrait, args.audio, args.size,
                        torch.device(args.device), getattr(torch, args.dtype))
    ref, inputs, plan, noise, denoiser = setup.ref, setup.inputs, setup.plan, setup.noise, setup.denoiser
    transformer = setup.components.transformer

    def frames(latents):
        return setup.frames(latents).double()

    tick = time.perf_counter()
    sigmas = flow_sigmas(ref.steps, ref.shift)
    reference, _ = run(plan, sigmas, noise, denoiser(sigmas))
    reference_frames = frames(reference)
    peak = float(reference.max() - reference.min())
    print(f"  reference: {time.perf_counter() - tick:.1f} s, {len(plan.windows)} windows", file=sys.stderr, flush=True)
    if args.precision == "fp8":
        from avatarcli.models.fp8 import kernel_for, use_fp8

        use_fp8(transformer, kernel=kernel_for(torch.device(args.device)))
    probe = BlockProbe(transformer.blocks[0], transformer.blocks[-1])

    def method(spec: str):
        kind, *values = spec.strip().split(":")
        if kind in ("euler", "unipc"):
            steps = int(values[0])
            if kind == "unipc":
                unipc = UniPCWindows(None, steps, ref.shift, 2)
                unipc.denoise = denoiser(unipc.sigmas)
                return f"UniPC-2 {steps} steps", run(plan, unipc.sigmas, noise, unipc)
            grid = flow_sigmas(steps, ref.shift)
            return f"Euler {steps} steps", run(plan, grid, noise, denoiser(grid))
        if kind == "predict":
            steps, order, k, tolerance, ratio = int(values[0]), int(values[1]), int(values[2]), float(values[3]), \
                float(values[4])
            prediction = Prediction(order=order, max_predicted=k, tolerance=tolerance, layer_ratio=ratio)
            name = f"{steps} steps, order {order}, max {k}, tolerance {tolerance:g}, layer ratio {ratio:g}"
        else:
            preset = load_preset(kind)
            steps, prediction, name = preset.steps, preset.prediction, f"preset {kind}"
        grid = flow_sigmas(steps, ref.shift)
        return name, run(plan, grid, noise, denoiser(grid), prediction, probe=probe)

    rows = []
    for spec in args.methods.split(";"):
        if not spec.strip():
            continue
        name, (latents, nfe) = method(spec)
        latent_psnr = 10 * math.log10(peak**2 / float(((latents - reference) ** 2).mean()))
        mse = float(((frames(latents) - reference_frames) ** 2).mean())
        decoded_psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
        rows.append((name, nfe, latent_psnr, decoded_psnr))
        print(f"  {name}: NFE {nfe:.2f}, latent {latent_psnr:.2f} dB, decoded {decoded_psnr:.2f} dB",
              file=sys.stderr, flush=True)
    probe.close()
    print(f"\n{args.weights or 'embedded demo'}, {inputs.width}x{inputs.height}, {inputs.frames} frames, "
          f"{len(plan.windows)} windows, {args.device} {args.dtype}"
          f"{', methods in fp8' if args.precision == 'fp8' else ''}; PSNR against the reference preset (Euler 50)")
    print("| method | NFE / window | latent PSNR (dB) | decoded PSNR (dB) |\n| --- | --- | --- | --- |")
    for name, nfe, latent_psnr, decoded_psnr in rows:
        print(f"| {name} | {nfe:.2f} | {latent_psnr:.2f} | {decoded_psnr:.2f} |")


if __name__ == "__main__":
    main()
