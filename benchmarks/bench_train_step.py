"""Time one training step of each stage of the demo model (avatarcli/demo/training) at several batch sizes.

    python benchmarks/bench_train_step.py                      # one GPU: the default batch scan
    python benchmarks/bench_train_step.py --tiny --steps 2     # CPU smoke test at toy sizes

Each row runs the stage's own training loop (vae.train_stills, vae.stream_episodes, dit.train_dit) for --steps
steps after a short warm-up, on a pool of --identities people: seconds per step, samples (frames for the VAE,
windows for the DiT) per second, the peak memory, and on a GPU the kernels' share of the wall clock (CUDA kernel
time from the profiler over the same steps; well under 1 means the step waits on the host, so a larger batch costs
little more time). `dit batch prep` is flow_batch alone: the host-side work of a DiT step.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from avatarcli.demo.training import TrainConfig
from avatarcli.demo.training.data import make_pool
from avatarcli.demo.training.dit import flow_batch, train_dit
from avatarcli.demo.training.latents import encode_pool
from avatarcli.demo.training.run import fixed_components, portrait_inputs
from avatarcli.demo.training.vae import (
    new_vae, stream_episodes, train_stills, trained_parameters, weights_memory_format,
)
from avatarcli.demo.training.wav2vec import new_wav2vec


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def kernel_seconds(fn, device: torch.device) -> float | None:
    """CUDA kernel time of fn() from the profiler (None on the CPU)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6


def measure(name: str, batch: int, per_sample: int, run, steps: int, device: torch.device) -> dict:
    """run(n) runs n steps; warm up, time `steps` steps, profile a quarter as many more. Prints the row."""
    run(2)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run(steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = (time.perf_counter() - start) / steps
    kernels = kernel_seconds(lambda: run(max(1, steps // 4)), device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    row = dict(stage=name, batch=batch, step_s=wall, samples_s=batch * per_sample / wall,
                busy=None if kernels is None else kernels / max(1, steps // 4) / wall, peak=peak)
    print(line(row), flush=True)
    return row


def line(r: dict) -> str:
    busy = "-" if r["busy"] is None else f"{r['busy']:.2f}"
    return f"| {r['stage']} | {r['batch']} | {r['step_s']:.4f} | {r['samples_s']:.0f} | {busy} | {r['peak']:.2f} |"


def vae_rows(pool, config: TrainConfig, args, device) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for decoder_only in (False, True) if args.decoder_only else (False,):
        for batch in ints(args.vae_batches):
            vae = new_vae(config.sizes).to(device).train()
            if device.type == "cuda" and not args.contiguous:  # as train_vae runs it on a GPU
                weights_memory_format(vae, torch.channels_last_3d)
            trained = trained_parameters(vae, decoder_only)
            opt = torch.optim.AdamW(trained, lr=config.vae_lr)

            def run(n, batch=batch, vae=vae, opt=opt, trained=trained, decoder_only=decoder_only):
                c = replace(config, vae_batch=batch, vae_steps=n, vae_seconds=1e9)
                stream_episodes(vae, opt, trained, pool, c, gen, decoder_only, lambda line: None, 1e9)

            name = "vae streamed, decoder only" if decoder_only else "vae streamed"
            rows.append(measure(name, batch, 4 * config.vae_grad_latents, run, args.steps, device))
    for batch in ints(args.still_batches):
        vae = new_vae(config.sizes).to(device).train()
        if device.type == "cuda" and not args.contiguous:
            weights_memory_format(vae, torch.channels_last_3d)
        trained = trained_parameters(vae, False)
        opt = torch.optim.AdamW(trained, lr=config.vae_lr)

        def run(n, batch=batch, vae=vae, opt=opt, trained=trained):
            c = replace(config, vae_still_batch=batch, vae_steps=n)
            train_stills(vae, opt, trained, pool, c, gen, lambda line: None, 1e9)

        rows.append(measure("vae stills", batch, 1, run, args.steps, device))
    return rows


def dit_rows(pool, config: TrainConfig, args, device) -> list[dict]:
    vae = new_vae(config.sizes).to(device).eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as folder:
        prompts, image_encoder = fixed_components(Path(folder), config, device)
        latents = encode_pool(vae, pool)
        conditions, tokens, _ = portrait_inputs(vae, image_encoder, pool)
    wav2vec = new_wav2vec(config.sizes).to(device).eval()
    gen, noise_gen = torch.Generator().manual_seed(0), torch.Generator(device=device).manual_seed(1)
    rows = []
    for batch in ints(args.dit_batches):

        def run(n, batch=batch):  # a new DiT each call: its construction is nothing beside n steps
            c = replace(config, dit_batch=batch, dit_steps=n, dit_seconds=1e9)
            train_dit(pool, latents, conditions, tokens, prompts, wav2vec, c, lambda line: None, None, 1e9)

        rows.append(measure("dit", batch, 1, run, args.steps, device))

        def prep(n, batch=batch):  # as train_dit prepares its batches
            for _ in range(n):
                flow_batch(pool, latents, wav2vec, prompts, batch, gen, device, noise_gen, config.dit_first_window)

        rows.append(measure("dit batch prep", batch, 1, prep, args.steps, device))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--identities", type=int, default=32)
    parser.add_argument("--vae-batches", default="12,24,48")
    parser.add_argument("--still-batches", default="64,256")
    parser.add_argument("--dit-batches", default="96,192,384")
    parser.add_argument("--decoder-only", action="store_true", help="also the decoder-only (--init) VAE step")
    parser.add_argument("--contiguous", action="store_true",
                        help="the VAE's 3D weights contiguous (training makes them channels-last on a GPU)")
    parser.add_argument("--stages", default="vae,dit")
    args = parser.parse_args()
    config = TrainConfig.tiny() if args.tiny else replace(TrainConfig(), identities=args.identities)
    if args.tiny:
        args.vae_batches, args.still_batches, args.dit_batches = "1,2", "2", "2"
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    pool = make_pool(config, lambda line: None)
    rows = (vae_rows(pool, config, args, device) if "vae" in args.stages else []) + (
        dit_rows(pool, config, args, device) if "dit" in args.stages else [])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{name}, {args.steps} steps per row, pool of {config.identities} identities")
    print("| stage | batch | s / step | samples / s | kernel share | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(line(r))


if __name__ == "__main__":
    main()
