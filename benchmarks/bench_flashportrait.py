"""FlashPortrait transformer (Wan2.1-I2V-14B + NFEB): seconds per window-step and peak GPU memory per memory option.

One window of 51 latent frames; a window-step is FlashPortraitDenoiser's call: the 2 expression-CFG branches (emo on,
emo off) as one batch-2 forward, plus the guidance combine. Variants (all bf16 compute):
  stock       diffusers' WanTransformer3DModel at the I2V-14B config, same weights minus the expression
              projections, one batch-2 forward (the yardstick)
  full        ours, whole model on the GPU
  model       --offload model (accelerate hook: moved to the GPU at the first forward, stays there)
  group       --offload group (diffusers group offloading, one block at a time, CUDA-stream prefetch)
  sequential  --offload sequential (leaf-level group offloading)
  fp8         --weights-dtype fp8 (diffusers layerwise casting: fp8 storage, bf16 compute), whole model on the GPU
  fp8+group   both
  fast        `full` with --numerics fast (modulation, norms, residual adds and RoPE in bf16)
  compiled    `full` with its blocks compiled as `animate --compile on` does (avatarcli.compilation.compile_blocks)
  compiled-fast  both
Every variant but stock also times the conditional branch alone (batch 1, emo on): the forward a guidance-reuse
step runs in place of the pair (avatarcli/sampling/guidance_reuse.py). A compiled variant's first window-step at the
full window (its compile) is reported apart and left out of the timing.
Sizes: 512x512 (52,224 tokens per branch) and 720x1280 (183,600 tokens per branch).

Weights: full-size random bf16 tensors in the published (original Wan) key layout go through the real loading code.
  --weights-source memory (default): generated on the GPU, converted, strictly checked and assigned by
      build_flashportrait_transformer, no file I/O (writing ~35 GB takes longer than the measurements);
  --weights-source disk: written in the published folder layout under --tmp and loaded by
      load_flashportrait_transformer (the overlay holds the fine-tuned attention weights and the expression
      projections; to fit a 64 GB disk the 7 base shards hold only the weights the overlay lacks); load time
      reported.
Each variant starts from the same CPU copy of the weights. Timing: CUDA events, median of --repeat after a warm-up
at 3 latent frames. Rows are printed as they finish; the table is printed last.

    python benchmarks/bench_flashportrait.py                                  # every variant and size (~40 min)
    python benchmarks/bench_flashportrait.py --tiny                           # CPU smoke test of the script itself
    python benchmarks/bench_flashportrait.py --sizes 512x512 --variants full,fast,compiled,compiled-fast   # levers

Then, for each size the `full` variant ran at, the cost of a --clip-seconds driving clip (default 10 s, 25 fps) per
preset, composed from the costs measured in the same run: windows from the driver's own window plan x steps x the
`full` window-step, plus the streamed decode of every frame with the full Wan VAE and with the tiny TAEHV decoder
(both timed here on random weights, 21 latent frames in chunks of 4, as benchmarks/bench_taehv.py). Presets: the
30-step path (`reference`'s driving section: 30 steps, overlap 30, full decoder) and `turbo` (4 steps, overlap 30,
tiny decoder; the step-distill LoRA is merged into the weights at load, so its window-step costs what the full
model's does). A whole 30-step clip at 720x1280 would take ~2 hours of GPU, so the clip is composed, not run.

A window-step at 720x1280 takes ~100 s on an H100-class GPU (2 x 183,600 tokens), so under a 10-minute limit per
command split the run, e.g.:
    python benchmarks/bench_flashportrait.py --sizes 512x512
    python benchmarks/bench_flashportrait.py --sizes 720x1280 --variants stock,full,fp8
    python benchmarks/bench_flashportrait.py --sizes 720x1280 --variants group,fp8+group
    python benchmarks/bench_flashportrait.py --sizes 720x1280 --variants model,sequential
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from avatarcli.compilation import compile_blocks
from avatarcli.loading.flashportrait import build_flashportrait_transformer, is_expression_key, \
    load_flashportrait_transformer
from avatarcli.loading.memory import place_transformer
from avatarcli.loading.transformer import convert_original_keys
from avatarcli.models.wan import use_numerics
from avatarcli.sampling.flashportrait import ExpressionGuidance, FlashPortraitDenoiser, latent_frames_for_driving, \
    plan_flashportrait_windows
from avatarcli.sampling.schedule import flow_sigmas
from avatarcli.sampling.windows import Window
from avatarcli.testing.flashportrait import FULL_SIZE, TINY_SIZE, is_fine_tuned, random_state, \
    transformer_key_shapes, wan_config, write_base_shards

from common import build_decoders, random_latents, timed, timed_decode

class Variant(NamedTuple):
    offload: str = "none"
    weights: str = "bf16"  # weights dtype
    numerics: str = "reference"
    compiled: bool = False  # blocks compiled (on CUDA), as `animate --compile on`
    lever: bool = False  # a speed lever of the clip table (beside `full`)


VARIANTS = {
    "stock": Variant(), "full": Variant(lever=True), "model": Variant("model"), "group": Variant("group"),
    "sequential": Variant("sequential"), "fp8": Variant(weights="fp8"), "fp8+group": Variant("group", "fp8"),
    "fast": Variant(numerics="fast", lever=True), "compiled": Variant(compiled=True, lever=True),
    "compiled-fast": Variant(numerics="fast", compiled=True, lever=True),
}
REUSE = {"warmup": 3, "max_reused": 1, "order": 0, "tolerance": 1000.0}  # `balanced`'s audio-driver setting
WINDOW = 51
TEXT_TOKENS = 120  # a typical prompt; the model zero-pads to text_len (512) as the reference


def flops_per_step(tokens: int, sizes: dict, context: int = 769, slots: int = 97) -> float:
    """Matmul FLOPs of one batch-2 window-step (2 per multiply-add); the expression branch runs in one row only."""
    d, f = sizes["dim"], sizes["ffn_dim"]
    per_row = (4 * 2 * tokens * d * d + 2 * 2 * tokens * tokens * d + 2 * 2 * tokens * d * d
               + 2 * 2 * tokens * context * d + 2 * 2 * tokens * d * f)
    emo = 2 * 2 * tokens * slots * d
    return sizes["num_layers"] * (2 * per_row + emo)


def cpu_state(sizes: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random full-size weights, drawn on `device` (fast) and kept on the CPU."""
    shapes = transformer_key_shapes(sizes)
    state = {}
    for n, (key, shape) in enumerate(shapes.items()):
        state[key] = random_state({key: shape}, seed=n, device=str(device), dtype=dtype)[key].cpu()
    return state


def write_published(folder: Path, state: dict[str, torch.Tensor], sizes: dict) -> None:
    import json

    fp, base = folder / "FlashPortrait", folder / "Wan2.1-I2V-14B-720P"
    fp.mkdir(parents=True, exist_ok=True)
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps(wan_config(sizes)))
    torch.save({k: v for k, v in state.items() if is_fine_tuned(k)}, fp / "transformer.pt")
    write_base_shards(base, {k: v for k, v in state.items() if not is_fine_tuned(k)})


def stock_model(state: dict[str, torch.Tensor], sizes: dict, device: torch.device):
    from diffusers import WanTransformer3DModel

    heads = sizes["num_heads"]
    with torch.device("meta"):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=sizes["dim"] // heads,
            in_channels=sizes["in_dim"], out_channels=sizes["out_dim"], text_dim=sizes["text_dim"],
            freq_dim=sizes["freq_dim"], ffn_dim=sizes["ffn_dim"], num_layers=sizes["num_layers"],
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=sizes["eps"], image_dim=sizes["image_dim"],
            added_kv_proj_dim=sizes["dim"], rope_max_seq_len=1024)
    converted = convert_original_keys({k: v for k, v in state.items() if not is_expression_key(k)},
                                      passthrough=lambda k: False)
    model.load_state_dict({k: v.to(device) for k, v in converted.items()}, strict=True, assign=True)
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    model.rope = WanRotaryPosEmbed(sizes["dim"] // heads, (1, 2, 2), 1024)
    return model.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (checks the script, not the speed)")
    parser.add_argument("--sizes", default="512x512,720x1280", help="comma-separated WIDTHxHEIGHT")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--weights-source", choices=("memory", "disk"), default="memory")
    parser.add_argument("--tmp", default=None, help="folder for --weights-source disk (default: a temp dir)")
    parser.add_argument("--clip-seconds", type=float, default=10.0,
                        help="driving clip length of the per-video-second table (0: no table)")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny else "cuda")
    compute = torch.float32 if args.tiny else torch.bfloat16
    sizes = TINY_SIZE if args.tiny else FULL_SIZE
    pixel_sizes = [(64, 64)] if args.tiny else [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}")
    if args.tiny:
        variants = sorted(variants, key=lambda v: VARIANTS[v].weights == "fp8")  # fp8 last

    t0 = time.perf_counter()
    state = cpu_state(sizes, device, compute)
    make_seconds = time.perf_counter() - t0
    load_note = f"random weights drawn in {make_seconds:.1f} s, loaded from memory (build_flashportrait_transformer)"
    tmp = None
    if args.weights_source == "disk":
        tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="bench_fp_"))
        t0 = time.perf_counter()
        write_published(tmp, state, sizes)
        write_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = load_flashportrait_transformer(tmp, dtype=compute, device="cpu")
        load_seconds = time.perf_counter() - t0
        del loaded
        gc.collect()
        load_note = (f"published layout written in {write_seconds:.1f} s, loaded by load_flashportrait_transformer "
                     f"to CPU in {load_seconds:.1f} s")

    def build(variant: str):
        if variant == "stock":
            return stock_model(state, sizes, device), None
        spec = VARIANTS[variant]
        model = build_flashportrait_transformer(state, wan_config(sizes), dtype=compute, device="cpu")
        placement = place_transformer(model, device, offload=spec.offload, weights_dtype=spec.weights,
                                      compute_dtype=compute)
        use_numerics(model, spec.numerics)  # before compiling, as the driver does
        if compiles(variant):
            compile_blocks(model)
        return model, placement

    def compiles(variant: str) -> bool:
        return VARIANTS[variant].compiled and device.type == "cuda"

    gen = torch.Generator(device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=compute)

    def step_fn(model, placement, frames: int, h: int, w: int, alone: bool = False):
        """One window-step closure for the variant (`alone`: the conditional branch only, batch 1)."""
        latents = rand(1, 16, frames, h, w)
        condition = torch.cat([torch.zeros(1, 4, frames, h, w, device=device, dtype=compute),
                               rand(1, 16, frames, h, w)], 1)
        condition[:, :4, 0] = 1
        text = rand(1, TEXT_TOKENS, sizes["text_dim"])
        image = rand(1, 257, sizes["image_dim"])
        guidance = ExpressionGuidance()
        if placement is None:  # stock diffusers: the same 2 branches without the expression input
            x = torch.cat([latents, condition], 1).expand(2, -1, -1, -1, -1)
            text512 = torch.nn.functional.pad(text, (0, 0, 0, 512 - TEXT_TOKENS)).expand(2, -1, -1)
            t = torch.full((2,), 960.0, device=device)

            def run():
                with torch.no_grad():
                    out = model(x, t, text512, image.expand(2, -1, -1), return_dict=False)[0]
                    return guidance.combine(out.float())
            return run
        tokens = rand(1, frames, 97, sizes["emo_token_dim"])
        denoiser = FlashPortraitDenoiser(model, guidance, positive_text=text, negative_text=None, image_tokens=image,
                                         condition=condition, window_tokens=lambda win: tokens,
                                         sigmas=flow_sigmas(30), device=placement.device, dtype=placement.dtype)
        window = Window(0, 0, frames, 0)

        def run():
            with torch.no_grad():
                if alone:
                    return denoiser.branch_predictions(window, 5, latents, [guidance.conditional])
                return denoiser(window, 5, latents)
        return run

    rows = []
    header = (f"{'variant':<13} {'size':>9} {'tokens':>7} {'s/step':>8} {'min s':>8} {'TFLOP/s':>8} {'peak GiB':>9} "
              f"{'cond s':>7}")
    print(header, flush=True)
    for variant in variants:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model, placement = build(variant)
        build_seconds = time.perf_counter() - t0
        for width, height in pixel_sizes:
            h, w = height // 8, width // 8
            frames = 3 if args.tiny else WINDOW
            tokens = frames * (h // 2) * (w // 2)
            compiled = compiles(variant)
            warm_seconds = timed(step_fn(model, placement, frames if compiled else 3, h, w), 0, 1, device)[0]
            if compiled:  # the compile of both batch sizes, at the timed shapes
                warm_seconds += timed(step_fn(model, placement, frames, h, w, alone=True), 0, 1, device)[0]
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = timed(step_fn(model, placement, frames, h, w), 0, args.repeat, device)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            seconds = statistics.median(times)
            alone = float("nan")
            if placement is not None:
                alone = statistics.median(timed(step_fn(model, placement, frames, h, w, alone=True), 0, args.repeat,
                                                device))
            row = (variant, f"{width}x{height}", tokens, seconds, min(times),
                   flops_per_step(tokens, sizes) / seconds / 1e12, peak, alone, build_seconds,
                   warm_seconds if compiled else float("nan"))
            rows.append(row)
            print(f"{row[0]:<13} {row[1]:>9} {row[2]:>7} {row[3]:>8.2f} {row[4]:>8.2f} {row[5]:>8.1f} "
                  f"{row[6]:>9.2f} {row[7]:>7.2f}", flush=True)
        if placement is not None:
            placement.release()
        del model, placement
        gc.collect()

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    params = sum(v.numel() for v in state.values())
    print(f"\ndevice: {name}; torch {torch.__version__}; {params / 1e9:.2f} B params (FlashPortrait; stock lacks the "
          f"{sum(v.numel() for k, v in state.items() if is_expression_key(k)) / 1e9:.2f} B expression projections); "
          f"{WINDOW if not args.tiny else 3} latent frames per window; compute {compute}; {load_note}")
    print("s/step: one window-step = 2 expression-CFG branches in one batch-2 forward (+ combine); cond s: the "
          "conditional branch alone (batch 1), a guidance-reuse step; peak GiB: torch.cuda.max_memory_allocated "
          "during the timed steps (weights resident on the GPU included); compile s: a compiled variant's first "
          "pair and first conditional-alone step")
    print(header + f" {'build s':>8} {'compile s':>9}")
    for r in rows:
        print(f"{r[0]:<13} {r[1]:>9} {r[2]:>7} {r[3]:>8.2f} {r[4]:>8.2f} {r[5]:>8.1f} {r[6]:>9.2f} {r[7]:>7.2f} "
              f"{r[8]:>8.1f} {r[9]:>9.1f}")
    steps = {(r[0], r[1]): (r[3], r[7]) for r in rows if VARIANTS[r[0]].lever}
    if args.clip_seconds > 0 and any(variant == "full" for variant, _ in steps):
        clip_table(steps, args.clip_seconds, device, compute, args.tiny)


PRESETS = (("30-step (reference)", 30, 30, "full"), ("turbo", 4, 30, "tiny"))  # name, steps, overlap, decoder


class _Pair:
    """A stand-in window denoiser for counting: two constant branches under expression CFG (no model)."""

    guidance = ExpressionGuidance()
    branches = 2

    def branch_predictions(self, window, step, latents, rows=None):
        return torch.ones(len(rows) if rows is not None else self.branches, 1)


def reuse_schedule(steps: int) -> tuple[int, int]:
    """(pair steps, conditional-alone steps) of one window of `steps` computed steps under REUSE, counted by the
    real rule (avatarcli/sampling/guidance_reuse.py) run on a stand-in denoiser."""
    from avatarcli.sampling.guidance_reuse import GuidanceReuse

    reusing = GuidanceReuse(**REUSE).bind(_Pair(), flow_sigmas(steps))
    window = Window(0, 0, 1, 0)
    for step in range(steps):
        reusing(window, step, torch.zeros(1, 1))
    return reusing.full_steps, reusing.reused_steps


def clip_table(steps: dict[tuple[str, str], tuple[float, float]], clip_seconds: float, device: torch.device,
               dtype: torch.dtype, tiny: bool, fps: int = 25) -> None:
    """Seconds per video second of a driving clip per preset and lever, from the measured window-steps (pair and
    conditional alone, per variant) and decode rates."""
    vae, tiny_vae = build_decoders(tiny, device, dtype)
    frames = max(1, round(clip_seconds * fps))
    latent_frames = latent_frames_for_driving(frames)
    sizes = sorted({size for _, size in steps})
    decode_fps = {}
    for size in sizes:
        width, height = (int(v) for v in size.split("x"))
        latents = random_latents(5 if tiny else 21, width, height, device)
        for kind in ("full", "tiny"):
            decoded, seconds, _ = timed_decode(kind, vae, tiny_vae, latents, 4, device)
            decode_fps[size, kind] = len(decoded) / seconds
    del vae, tiny_vae
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (tiny model: checks the script only)"
    print(f"\n{clip_seconds:g} s driving clip ({frames} frames, {latent_frames} latent frames), {name}; composed from "
          "this run's window-steps (pair, conditional alone) and streamed decode rates (random weights); reuse: "
          f"guidance reuse {REUSE}")
    print(f"{'preset':<22} {'size':>9} {'variant':<13} {'reuse':>5} {'windows':>7} {'pair+alone':>10} {'DiT s':>8} "
          f"{'decoder':>7} {'decode s':>8} {'total s':>8} {'s / video s':>11} {'vs full':>7}")
    for size in sizes:
        for label, count, overlap, decoder in PRESETS:
            windows = len(plan_flashportrait_windows(latent_frames, WINDOW, overlap).windows)
            schedules = {False: (count, 0), True: reuse_schedule(count)}
            decode = frames / decode_fps[size, decoder]
            full_dit = windows * count * steps["full", size][0] if ("full", size) in steps else None
            baseline = full_dit + decode if full_dit else None
            for (variant, at), (pair, alone) in steps.items():
                if at != size:
                    continue
                for reuse, (pairs, alones) in schedules.items():
                    dit = windows * (pairs * pair + alones * alone)
                    total = dit + decode
                    speedup = f"{baseline / total:>6.2f}x" if baseline else f"{'-':>7}"
                    print(f"{label:<22} {size:>9} {variant:<13} {'yes' if reuse else 'no':>5} {windows:>7} "
                          f"{f'{pairs}+{alones}':>10} {dit:>8.1f} {decoder:>7} {decode:>8.2f} {total:>8.1f} "
                          f"{total / clip_seconds:>11.2f} {speedup}")
            other = "tiny" if decoder == "full" else "full"
            if full_dit:
                other_decode = frames / decode_fps[size, other]
                total = full_dit + other_decode
                print(f"{label + ' *':<22} {size:>9} {'full':<13} {'no':>5} {windows:>7} {f'{count}+0':>10} "
                      f"{full_dit:>8.1f} {other:>7} {other_decode:>8.2f} {total:>8.1f} {total / clip_seconds:>11.2f}")
    print("* the preset with its other decoder (--decoder full|tiny); pair+alone: per window, steps with both "
          "expression-CFG branches and steps with the conditional branch alone; vs full: the `full` variant "
          "without reuse over this row")


if __name__ == "__main__":
    main()
