"""Fidelity against NFE of step prediction, Euler with fewer steps, UniPC and diffusers' cache hooks.

    python benchmarks/bench_predict.py                      # closed-form flow (CPU, seconds)
    python benchmarks/bench_predict.py --weights DIR        # a StableAvatar weights folder (tiny, demo or published)
    avatarcli demo-face --seed 7 -o face.png --speech talk.wav --seconds 12   # the demo model in its own world:
    python benchmarks/bench_predict.py --weights avatarcli/demo/weights --portrait face.png --audio talk.wav \
        --size 128x128
    python benchmarks/bench_predict.py --tiny               # the same on tiny random weights written on the fly

Every method runs through the real sliding-window sampler (windows, overlap blend, wavefront order) and is scored by
its PSNR against the `reference` preset's result (50 Euler steps, its overlap and blend, same seed). The presets'
rows apply each preset's steps and `prediction` section to the reference's guidance, overlap and blend, so the
table measures the step schedule and prediction alone. NFE counts transformer forwards per window (the guidance
branches are one batched call).

Closed-form flow: the exact flow-matching velocity of a Gaussian mixture, token by token in a latent shaped like a
16-channel video window (64 components, a tree of 3 levels x 4 branches, whose means drift smoothly over frames and
pixels), with text/audio-style guidance between two mixture weightings. Its "layer probe" is the denoiser's input and
output (there are no layers); PSNR is on the final latents with the reference's range as the peak. Cache hooks need a
transformer, so their rows only appear with --weights/--tiny, where PSNR is on the decoded frames.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from avatarcli.presets import load_preset
from avatarcli.sampling.schedule import flow_sigmas
from avatarcli.sampling.windows import plan_windows

from common import EXAMPLES, UniPCWindows, model_setup, run

PRESETS = ("quality", "balanced", "fast")


class MixtureFlow:
    """Exact guided flow-matching velocity of a per-token Gaussian mixture (x = (1 - sigma) x0 + sigma noise)."""

    def __init__(self, sigmas: torch.Tensor, channels: int = 16, height: int = 8, width: int = 8,
                 levels: tuple[float, ...] = (1.0, 0.4, 0.15), branching: int = 4, spread: float = 0.05,
                 guidance: float = 3.0, seed: int = 0, probe: bool = True):
        """Component means form a tree (`branching` children per level, offsets shrinking by `levels`), so samples
        commit to a coarse cluster at high noise and to finer ones later: the path bends at every noise level."""
        g = torch.Generator().manual_seed(seed)
        self.sigmas = [float(s) for s in sigmas]
        means = torch.zeros(1, channels, dtype=torch.float64)
        for scale in levels:
            offsets = scale * torch.randn(branching, channels, generator=g, dtype=torch.float64)
            means = (means.unsqueeze(1) + offsets.unsqueeze(0)).reshape(-1, channels)
        components = means.shape[0]
        self.means = means
        self.drift = 0.3 * torch.randn(components, channels, generator=g, dtype=torch.float64)
        self.phase = torch.rand(3, generator=g, dtype=torch.float64) * 6.283
        self.spread, self.guidance, self.hw = spread, guidance, (height, width)
        logits = torch.randn(components, generator=g, dtype=torch.float64)
        self.log_weights = {"uncond": torch.zeros(components, dtype=torch.float64),
                            "cond": torch.log_softmax(2.0 * logits, 0)}
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.probe = self.latest_layers if probe else None

    def latest_layers(self):
        """The step predictor's per-layer signal: this flow's summaries of its latest call."""
        return self.last

    def component_means(self, start: int, frames: int, window_index: int) -> torch.Tensor:
        """[K, C, F, h, w]: means drifting smoothly over latent frames and pixels; a small per-window offset stands in
        for the conditioning that differs between windows."""
        h, w = self.hw
        f = torch.arange(start, start + frames, dtype=torch.float64).view(-1, 1, 1)
        i = torch.arange(h, dtype=torch.float64).view(1, -1, 1)
        j = torch.arange(w, dtype=torch.float64).view(1, 1, -1)
        wave = torch.cos(0.15 * f + 0.4 * i + self.phase[0]) * torch.sin(0.3 * j + 0.2 * f + self.phase[1])
        mu = self.means.view(*self.means.shape, 1, 1, 1) + self.drift.view(*self.drift.shape, 1, 1, 1) * wave
        return mu + 0.05 * window_index

    def velocity(self, x: torch.Tensor, sigma: float, mu: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
        a = 1.0 - sigma
        var = a * a * self.spread**2 + sigma * sigma
        diff = x - a * mu  # [K, C, F, h, w]
        logits = log_weights.view(-1, 1, 1, 1) - (diff * diff).sum(1) / (2 * var)
        post = torch.softmax(logits, dim=0).unsqueeze(1)
        x0_k = mu + (a * self.spread**2 / var) * diff
        x0 = (post * x0_k).sum(0)
        return (x - x0) / sigma

    def __call__(self, window, step: int, latents: torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas[step]
        x = latents[0].double()
        mu = self.component_means(window.start, latents.shape[2], window.index)
        v_u = self.velocity(x, sigma, mu, self.log_weights["uncond"])
        v_c = self.velocity(x, sigma, mu, self.log_weights["cond"])
        v = (v_u + self.guidance * (v_c - v_u)).unsqueeze(0).to(latents.dtype)
        self.last = (latents.detach().clone(), v.detach().clone())
        return v


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    peak = float(ref.max() - ref.min())
    mse = float(((x.double() - ref.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def closed_form_table(args) -> list[tuple[str, float, float]]:
    ref = load_preset("reference")
    plan = plan_windows(args.latent_frames, 21, ref.overlap, ref.blend)
    noise = torch.randn(1, 16, plan.latent_frames, 8, 8, generator=torch.Generator().manual_seed(ref.seed or 42))
    sigmas = flow_sigmas(ref.steps, ref.shift)

    def flow(grid, probe=True):
        return MixtureFlow(grid, guidance=args.guidance, probe=probe)

    reference, ref_nfe = run(plan, sigmas, noise, flow(sigmas))
    rows = [("reference (Euler 50)", ref_nfe, math.inf)]
    nfes = []
    for name in PRESETS:
        preset = load_preset(name)
        grid = flow_sigmas(preset.steps, ref.shift)
        flowing = flow(grid)
        out, nfe = run(plan, grid, noise, flowing, preset.prediction, probe=flowing.probe)
        rows.append((f"{name} (prediction)", nfe, psnr(out, reference)))
        nfes.append(nfe)
        if args.no_probe:
            out, nfe = run(plan, grid, noise, flow(grid, probe=False), preset.prediction)
            rows.append((f"{name} (no layer probe)", nfe, psnr(out, reference)))
    for steps in sorted({max(2, round(n)) for n in nfes}, reverse=True):
        grid = flow_sigmas(steps, ref.shift)
        out, nfe = run(plan, grid, noise, flow(grid))
        rows.append((f"Euler {steps} steps", nfe, psnr(out, reference)))
        for order in (2, 3):
            unipc = UniPCWindows(flow(sigmas), steps, ref.shift, order)
            unipc.denoise = flow(unipc.sigmas)
            out, nfe = run(plan, unipc.sigmas, noise, unipc)
            rows.append((f"UniPC-{order} {steps} steps", nfe, psnr(out, reference)))
    return rows


def model_rows(args):
    """The same comparison with a real StableAvatar model, through the pipeline's own feature and denoiser code."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    from avatarcli.models.stableavatar import AvatarTransformerBlock
    from avatarcli.runtime import resolve_device, resolve_dtype
    from avatarcli.sampling.predict import BlockProbe

    device = resolve_device(args.device)
    setup = model_setup(args.weights, args.portrait, args.audio, args.size, device, resolve_dtype("auto", device))
    ref, inputs, plan, noise, frames = setup.ref, setup.inputs, setup.plan, setup.noise, setup.frames
    model = setup.components.transformer

    def denoiser(sigmas, cached=False):
        inner = setup.denoiser(sigmas)
        if not cached:
            return inner

        def call(window, step, latents):  # one cache state per window, like the predictor's
            with model.cache_context(f"window{window.index}"):
                return inner(window, step, latents)

        return call

    # Full-compute forwards of the cache hooks: forwards in which the last block's self-attention ran (68% of a
    # full-size step; a skipped block or a TaylorSeer-predicted attention never reaches its q projection).
    executed = {"n": 0}
    model.blocks[-1].attn1.to_q.register_forward_pre_hook(lambda *a: executed.__setitem__("n", executed["n"] + 1))

    sigmas = flow_sigmas(ref.steps, ref.shift)
    tick = time.perf_counter()
    reference_latents, ref_nfe = run(plan, sigmas, noise, denoiser(sigmas))
    print(f"  reference: {time.perf_counter() - tick:.1f} s", file=sys.stderr, flush=True)
    reference = frames(reference_latents)
    rows = [("reference (Euler 50)", ref_nfe, math.inf)]

    def score(latents):
        x, r = frames(latents).double(), reference.double()
        mse = float(((x - r) ** 2).mean())
        return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)

    nfes = []
    probe = BlockProbe(model.blocks[0], model.blocks[-1])
    for name in PRESETS:
        preset = load_preset(name)
        grid = flow_sigmas(preset.steps, ref.shift)
        inner = denoiser(grid)
        out, nfe = run(plan, grid, noise, inner, preset.prediction, probe=probe)
        rows.append((f"{name} (prediction)", nfe, score(out)))
        note(rows[-1])
        nfes.append(nfe)
    probe.close()
    for steps in sorted({max(2, round(n)) for n in nfes}, reverse=True):
        grid = flow_sigmas(steps, ref.shift)
        out, nfe = run(plan, grid, noise, denoiser(grid))
        rows.append((f"Euler {steps} steps", nfe, score(out)))
        unipc = UniPCWindows(None, steps, ref.shift, 2)
        unipc.denoise = denoiser(unipc.sigmas)
        out, nfe = run(plan, unipc.sigmas, noise, unipc)
        rows.append((f"UniPC-2 {steps} steps", nfe, score(out)))
        note(rows[-1])

    # diffusers' cache hooks on the same model and 50-step grid. Our block subclass must be registered for the
    # block-level hooks; MagCache's ratios are calibrated on this model first (only Flux ratios ship).
    TransformerBlockRegistry.register(AvatarTransformerBlock, TransformerBlockMetadata(
        return_hidden_states_index=0, return_encoder_hidden_states_index=None))
    import contextlib
    import io

    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=ref.steps))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run(plan, sigmas, noise, denoiser(sigmas, cached=True))
    model.disable_cache()
    ratios = [float(v) for v in printed.getvalue().strip().splitlines()[-1].strip("[] ").split(",")]
    configs = [(f"FirstBlockCache {t}", FirstBlockCacheConfig(threshold=t)) for t in (0.05, 0.1, 0.2)]
    configs += [(f"TaylorSeer interval {i}", TaylorSeerCacheConfig(cache_interval=i, disable_cache_before_step=3,
                                                                   max_order=2, taylor_factors_dtype=torch.float32,
                                                                   cache_identifiers=[r"blocks\.\d+\.attn[12]"]))
                for i in (3, 6)]
    configs += [(f"MagCache {t}", MagCacheConfig(threshold=t, max_skip_steps=k, retention_ratio=0.1,
                                                 num_inference_steps=ref.steps, mag_ratios=ratios))
                for t, k in ((0.06, 3), (0.24, 6), (1.0, 12))]
    for name, config in configs:
        model.enable_cache(config)
        executed["n"] = 0
        out, _ = run(plan, sigmas, noise, denoiser(sigmas, cached=True))
        rows.append((name, executed["n"] / len(plan.windows), score(out)))
        note(rows[-1])
        model.disable_cache()
    title = (f"StableAvatar {args.weights}, {inputs.width}x{inputs.height}, {inputs.frames} frames, "
             f"{len(plan.windows)} windows, cfg, reference overlap/blend, PSNR of decoded uint8 frames")
    return rows, title


def note(row) -> None:
    print(f"  {row[0]}: NFE {row[1]:.1f}, {row[2]:.2f} dB", file=sys.stderr, flush=True)


def print_table(title: str, rows, reference_nfe: float) -> None:
    print(title)
    print("| method | NFE / window | NFE vs reference | PSNR vs reference (dB) |")
    print("| --- | --- | --- | --- |")
    for name, nfe, value in rows:
        shown = "exact" if math.isinf(value) else f"{value:.2f}"
        print(f"| {name} | {nfe:.1f} | 1/{reference_nfe / nfe:.2f} | {shown} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent-frames", type=int, default=53, help="latent frames (53 = three windows at overlap 5)")
    parser.add_argument("--guidance", type=float, default=3.0, help="closed-form flow: guidance scale")
    parser.add_argument("--no-probe", action="store_true", help="also run each preset without the layer probe")
    parser.add_argument("--weights", type=Path, help="run a StableAvatar weights folder instead of the closed form")
    parser.add_argument("--tiny", action="store_true", help="like --weights, with tiny random weights")
    parser.add_argument("--size", default="64x64", help="with --weights: output size")
    parser.add_argument("--audio", type=Path, default=EXAMPLES / "speech.wav", help="with --weights: speech")
    parser.add_argument("--portrait", type=Path, default=EXAMPLES / "portrait.png", help="with --weights: portrait")
    parser.add_argument("--device", default="auto", help="with --weights: device")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    tick = time.perf_counter()
    if args.weights or args.tiny:
        if args.tiny:
            from avatarcli.testing import make_tiny_weights

            args.weights = make_tiny_weights(Path(tempfile.mkdtemp()) / "tiny", model="stableavatar")
        rows, title = model_rows(args)
    else:
        rows = closed_form_table(args)
        title = (f"closed-form Gaussian-mixture flow, {args.latent_frames} latent frames x 16 ch x 8 x 8, "
                 f"guidance {args.guidance}, reference preset's overlap/blend, {time.perf_counter() - tick:.1f} s")
    print_table(title, rows, rows[0][1])


if __name__ == "__main__":
    main()
