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

import torch

from avatarcli.loading.flashportrait import build_flashportrait_transformer, is_expression_key, \
    load_flashportrait_transformer
from avatarcli.loading.memory import place_transformer
from avatarcli.loading.transformer import convert_original_keys
from avatarcli.sampling.flashportrait import ExpressionGuidance, FlashPortraitDenoiser, latent_frames_for_driving, \
    plan_flashportrait_windows
from avatarcli.sampling.schedule import flow_sigmas
from avatarcli.sampling.windows import Window
from avatarcli.testing.flashportrait import FULL_SIZE, TINY_SIZE, is_fine_tuned, random_state, \
    transformer_key_shapes, wan_config, write_base_shards

from common import build_decoders, random_latents, timed, timed_decode

VARIANTS = {  # name -> (offload, weights dtype)
    "stock": ("none", "bf16"), "full": ("none", "bf16"), "model": ("model", "bf16"), "group": ("group", "bf16"),
    "sequential": ("sequential", "bf16"), "fp8": ("none", "fp8"), "fp8+group": ("group", "fp8"),
}
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
        variants = [v for v in variants if VARIANTS[v][1] != "fp8"] + [v for v in variants if VARIANTS[v][1] == "fp8"]

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
        offload, weights_dtype = VARIANTS[variant]
        model = build_flashportrait_transformer(state, wan_config(sizes), dtype=compute, device="cpu")
        placement = place_transformer(model, device, offload=offload, weights_dtype=weights_dtype,
                                      compute_dtype=compute)
        return model, placement

    gen = torch.Generator(device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=compute)

    def step_fn(model, placement, frames: int, h: int, w: int):
        """One window-step closure for the variant."""
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
                return denoiser(window, 5, latents)
        return run

    rows = []
    header = f"{'variant':<11} {'size':>9} {'tokens':>7} {'s/step':>8} {'min s':>8} {'TFLOP/s':>8} {'peak GiB':>9}"
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
            step_fn(model, placement, 3, h, w)()  # warm-up: kernels, allocator, offload hooks
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = timed(step_fn(model, placement, frames, h, w), 0, args.repeat, device)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            seconds = statistics.median(times)
            row = (variant, f"{width}x{height}", tokens, seconds, min(times),
                   flops_per_step(tokens, sizes) / seconds / 1e12, peak, build_seconds)
            rows.append(row)
            print(f"{row[0]:<11} {row[1]:>9} {row[2]:>7} {row[3]:>8.2f} {row[4]:>8.2f} {row[5]:>8.1f} "
                  f"{row[6]:>9.2f}", flush=True)
        if placement is not None:
            placement.release()
        del model, placement
        gc.collect()

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    params = sum(v.numel() for v in state.values())
    print(f"\ndevice: {name}; torch {torch.__version__}; {params / 1e9:.2f} B params (FlashPortrait; stock lacks the "
          f"{sum(v.numel() for k, v in state.items() if is_expression_key(k)) / 1e9:.2f} B expression projections); "
          f"{WINDOW if not args.tiny else 3} latent frames per window; compute {compute}; {load_note}")
    print("s/step: one window-step = 2 expression-CFG branches in one batch-2 forward (+ combine); peak GiB: "
          "torch.cuda.max_memory_allocated during the timed steps (weights resident on the GPU included)")
    print(header + f" {'build s':>8}")
    for r in rows:
        print(f"{r[0]:<11} {r[1]:>9} {r[2]:>7} {r[3]:>8.2f} {r[4]:>8.2f} {r[5]:>8.1f} {r[6]:>9.2f} {r[7]:>8.1f}")
    full_steps = {r[1]: r[3] for r in rows if r[0] == "full"}
    if args.clip_seconds > 0 and full_steps:
        clip_table(full_steps, args.clip_seconds, device, compute, args.tiny)


PRESETS = (("30-step (reference)", 30, 30, "full"), ("turbo", 4, 30, "tiny"))  # name, steps, overlap, decoder


def clip_table(step_seconds: dict[str, float], clip_seconds: float, device: torch.device, dtype: torch.dtype,
               tiny: bool, fps: int = 25) -> None:
    """Seconds per video second of a driving clip per preset, from the measured window-step and decode rates."""
    vae, tiny_vae = build_decoders(tiny, device, dtype)
    frames = max(1, round(clip_seconds * fps))
    latent_frames = latent_frames_for_driving(frames)
    decode_fps = {}
    for size in step_seconds:
        width, height = (int(v) for v in size.split("x"))
        latents = random_latents(5 if tiny else 21, width, height, device)
        for kind in ("full", "tiny"):
            decoded, seconds, _ = timed_decode(kind, vae, tiny_vae, latents, 4, device)
            decode_fps[size, kind] = len(decoded) / seconds
    del vae, tiny_vae
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (tiny model: checks the script only)"
    print(f"\n{clip_seconds:g} s driving clip ({frames} frames, {latent_frames} latent frames), {name}; composed from "
          "this run's `full` window-step and streamed decode rates (random weights)")
    print(f"{'preset':<22} {'size':>9} {'windows':>7} {'steps':>5} {'DiT s':>8} {'decoder':>7} {'decode s':>8} "
          f"{'total s':>8} {'s / video s':>11} {'decode share':>12}")
    for size, step in step_seconds.items():
        for label, steps, overlap, decoder in PRESETS:
            windows = len(plan_flashportrait_windows(latent_frames, WINDOW, overlap).windows)
            dit = windows * steps * step
            for kind in (decoder, "tiny" if decoder == "full" else "full"):
                decode = frames / decode_fps[size, kind]
                total = dit + decode
                mark = "" if kind == decoder else " *"
                print(f"{label + mark:<22} {size:>9} {windows:>7} {steps:>5} {dit:>8.1f} {kind:>7} {decode:>8.2f} "
                      f"{total:>8.1f} {total / clip_seconds:>11.2f} {decode / total:>11.1%}")
    print("* the preset with its other decoder (--decoder full|tiny)")


if __name__ == "__main__":
    main()
