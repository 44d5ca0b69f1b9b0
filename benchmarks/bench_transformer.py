"""StableAvatar transformer: time per window-step and peak memory at 480x832, 81 frames (21 latent frames), bf16.

Full-size random weights in the published key layout go through the same loading code as the real checkpoints
(avatarcli.loading.transformer.build_transformer). Measures, with CUDA events (median of --repeat after warm-up):
  * one forward at batch 1 (comparable to stock diffusers' WanTransformer3DModel at batch 1),
  * the 3-branch window-step of both guidance modes (cfg: one batch-3 forward; ang: batch 3 + a second adapter pass),
  * optionally another attention backend, and compiled blocks (optionally fused q/k/v), with their deviation from
    the eager output (on torch 2.11 / H100 the default SDPA already runs cuDNN's flash kernel),
  * stock diffusers' WanTransformer3DModel sharing the same weights (no audio path) at the same token count, in the
    same run and the same variants (unless --no-stock), and the ratio of each of our rows to its stock row,
  * with --precision fp8: the cfg window-step with fp8 linear layers, fp8 self-attention (k and v smoothed), both,
    and both compiled, each with its relative deviation from the eager bf16 output (avatarcli/models/fp8.py),
  * with --numerics: the cfg window-step only, eager bf16 (reference numerics: the yardstick), then bf16 reference
    numerics compiled, bf16 fast numerics eager and compiled (avatarcli/models/wan.py `use_numerics`), fp8 linear +
    smoothed attention compiled with reference and with fast numerics; compiled rows fuse q/k/v, each variant
    compiles afresh (its compile time is a row). Replaces the usual compiled rows. On the CPU (--tiny) the
    "compiled" rows run eager and fp8 is emulated,
  * with --ops: a per-op table of one cfg window-step (ours vs stock: calls and self time per op, biggest
    differences first), the place to look for overhead against stock; works on CPU too.
Prints a table last.

    python benchmarks/bench_transformer.py --fuse-qkv        # on a CUDA GPU
    python benchmarks/bench_transformer.py --fuse-qkv --ops  # + the per-op comparison
    python benchmarks/bench_transformer.py --fuse-qkv --precision fp8   # + fp8 rows (needs torchao, cudnn frontend)
    python benchmarks/bench_transformer.py --numerics --no-stock --repeat 3 --warmup 1   # the numerics table
    python benchmarks/bench_transformer.py --numerics --numerics-rows fp8 --no-stock   # its fp8 rows only
    python benchmarks/bench_transformer.py --tiny --ops      # CPU smoke test of the script itself
    python benchmarks/bench_transformer.py --tiny --numerics --no-stock   # CPU smoke test of the numerics rows
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from avatarcli.errors import EnvironmentProblem
from avatarcli.loading.transformer import build_transformer
from avatarcli.models.fp8 import kernel_for, use_fp8
from avatarcli.models.stableavatar import AudioConditioning, parameter_count
from avatarcli.models.wan import use_numerics
from avatarcli.sampling.guidance import Guidance
from avatarcli.testing.stableavatar import FULL_SIZE, random_state_dict, stock_wan_twin, wan_config

from common import timed


def flops_per_forward(batch: int, tokens: int, frames: int, sizes: dict, context: int = 769, audio: int = 15) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add); the audio adapter and embeddings are negligible."""
    d, f = sizes["dim"], sizes["ffn_dim"]
    per_block = (
        4 * 2 * tokens * d * d  # self-attention q, k, v, o
        + 2 * 2 * tokens * tokens * d  # self-attention scores and values
        + 2 * 2 * tokens * d * d  # cross-attention q, o
        + 2 * 2 * tokens * context * d + 2 * 2 * tokens * audio * d  # text/image and per-frame audio attention
        + 2 * 2 * tokens * d * f  # feed-forward
    )
    return batch * sizes["num_layers"] * per_block


def op_table(ours, stock, device: torch.device, label: str, rows: int = 25) -> None:
    """Profile one call of `ours` and of `stock`; print per op (CUDA kernel on a GPU, aten op on the CPU) the calls
    and self time of each, the ops whose time differs most first."""
    from torch.profiler import ProfilerActivity, profile

    def per_op(fn) -> dict[str, tuple[int, float]]:
        fn()  # warm-up outside the profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        table = {}
        for event in prof.key_averages():
            if device.type == "cuda":
                seconds = event.self_device_time_total / 1e6
                if seconds <= 0:
                    continue  # host-side op: its kernels are listed under their own names
            else:
                seconds = event.self_cpu_time_total / 1e6
            table[event.key] = (event.count, seconds)
        return table

    a = per_op(ours)
    b = per_op(stock) if stock is not None else {}
    total_a, total_b = sum(t for _, t in a.values()), sum(t for _, t in b.values())
    print(f"--- {label}: one cfg window-step per op ({'CUDA kernels' if device.type == 'cuda' else 'CPU ops'}); "
          f"ours {total_a:.4f} s, stock {total_b:.4f} s of self time")
    print(f"{'op':<70} {'calls':>7} {'stock':>7} {'ms':>9} {'stock ms':>9} {'diff ms':>9}")
    names = sorted(set(a) | set(b), key=lambda k: -abs(a.get(k, (0, 0))[1] - b.get(k, (0, 0))[1]))
    for name in names[:rows]:
        (ca, ta), (cb, tb) = a.get(name, (0, 0.0)), b.get(name, (0, 0.0))
        print(f"{name[:70]:<70} {ca:>7} {cb:>7} {1e3 * ta:>9.2f} {1e3 * tb:>9.2f} {1e3 * (ta - tb):>+9.2f}")


# --numerics rows after the eager one: (numerics, fp8 linear + smoothed attention, compiled)
NUMERICS_VARIANTS = (("reference", False, True), ("fast", False, False), ("fast", False, True),
                     ("reference", True, True), ("fast", True, True))


def numerics_variant(model, numerics: str, fp8: bool, compiled: bool, device: torch.device):
    """A copy of `model` with `numerics`, optionally fp8 (linear layers and smoothed self-attention; emulated off a
    GPU); `compiled`: q/k/v fused, blocks compiled on a GPU (the dynamo cache reset first: each variant compiles
    afresh)."""
    variant = copy.deepcopy(model)
    use_numerics(variant, numerics)
    if compiled:
        variant.fuse_qkv_projections()
    if fp8:
        use_fp8(variant, kernel=kernel_for(device))
    if compiled and device.type == "cuda":
        torch._dynamo.reset()
        variant.compile_repeated_blocks(fullgraph=True)
    return variant


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (checks the script, not the speed)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one cfg step")
    parser.add_argument("--attention", default=None, help="also time a diffusers attention backend, e.g. _native_cudnn")
    parser.add_argument("--fuse-qkv", action="store_true", help="fuse the q/k/v projections before compiling")
    parser.add_argument("--no-stock", action="store_true", help="skip stock diffusers' WanTransformer3DModel rows")
    parser.add_argument("--ops", action="store_true", help="per-op table of one cfg window-step, ours vs stock")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp8"],
                        help="fp8: also time fp8 linear layers, fp8 self-attention and both (each with its error "
                             "against the bf16 forward); CPU: the emulated e4m3 rounding, no speed")
    parser.add_argument("--size", default=None, help="HxW of the video (default 480x832; --tiny: 64x64)")
    parser.add_argument("--numerics", action="store_true",
                        help="the cfg window-step with reference and fast numerics, bf16 and fp8, eager and compiled "
                             "(each against the eager bf16 reference-numerics output and the fp32 forward)")
    parser.add_argument("--numerics-rows", default="all", choices=["all", "bf16", "fp8"],
                        help="with --numerics: which rows after the eager yardstick (default all)")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    sizes = dict(FULL_SIZE, dim=48, num_heads=2, text_dim=32, ffn_dim=64, num_layers=2, image_dim=32) \
        if args.tiny else FULL_SIZE
    height, width = (64, 64) if args.tiny else (480, 832)
    if args.size:
        height, width = (int(v) for v in args.size.split("x"))
    frames = 21
    h, w = height // 8, width // 8
    tokens = frames * (h // 2) * (w // 2)

    t = time.perf_counter()
    state = random_state_dict(sizes, seed=0, device=str(device), dtype=dtype)
    model = build_transformer(state, wan_config(sizes), dtype=dtype, device=device)
    current = {"model": model, "dtype": dtype}  # what forward() runs (the fp8 rows swap in converted copies)
    del state
    load_seconds = time.perf_counter() - t

    gen = torch.Generator(device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    x1 = torch.cat([rand(1, 16, frames, h, w), torch.zeros(1, 4, frames, h, w, device=device, dtype=dtype),
                    rand(1, 16, frames, h, w)], dim=1)
    text = rand(3, 512, sizes["text_dim"])
    image = rand(3, 257, sizes["image_dim"])
    audio = torch.randn(1, 161, sizes["audio_in_dim"], generator=gen, device=device)
    timestep = torch.full((3,), 977.9, device=device)

    def forward(batch: int, guidance: Guidance, with_audio: bool = True):
        branches = guidance.branches[:batch]
        rows = [a for a in ("real", "silent") if any(b.audio == a for b in branches)]
        features = torch.cat([audio if r == "real" else torch.zeros_like(audio) for r in rows])
        conditioning = AudioConditioning(features, [rows.index(b.audio) if b.audio != "none" else None
                                                    for b in branches])
        dt = current["dtype"]
        with torch.no_grad():
            out = current["model"](x1.expand(batch, -1, -1, -1, -1).to(dt), timestep[:batch], text[:batch].to(dt),
                        image[:batch].to(dt), conditioning if with_audio else None)
            return guidance.combine(out.float()) if batch == 3 else out

    stock = None if args.no_stock else stock_wan_twin(model)

    def stock_forward(batch: int, guidance: Guidance):
        """The same token count and context through stock diffusers (one forward; cfg combined alike)."""
        dt = stock.blocks[0].attn1.to_q.weight.dtype
        with torch.no_grad():
            out = stock(x1.expand(batch, -1, -1, -1, -1).to(dt), timestep[:batch], text[:batch].to(dt),
                        image[:batch].to(dt), return_dict=False)[0]
            return guidance.combine(out.float()) if batch == 3 else out

    cases = [("forward, batch 1", 1, Guidance("none")), ("window-step, cfg (batch 3)", 3, Guidance("cfg")),
             ("window-step, ang (batch 3)", 3, Guidance("ang"))]
    cfg_case = cases[1]
    if args.numerics:
        cases[:] = [cfg_case]
    rows = []
    eager_out = {}
    fp32_out = {}
    # The yardstick for "within bf16 rounding": the same forward with float32 weights and activations (also on
    # --tiny, so the CPU smoke test runs this pass).
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    model.float()
    current["dtype"] = torch.float32
    for name, batch, guidance in cases:
        fp32_out[name] = forward(batch, guidance).float()
    current["dtype"] = dtype
    for n, p in model.named_parameters():
        p.data = p.data.to(dtypes[n])

    stock_cases = [("stock " + name, batch, guidance) for name, batch, guidance in cases[:2]]

    def without_audio(batch: int, guidance: Guidance):
        return forward(batch, guidance, with_audio=False)

    def run_cases(label: str, with_stock: bool = False):
        todo = [(n, b, g, forward) for n, b, g in cases]
        if with_stock and stock is not None:
            # Our backbone code without the audio path, then stock: splits any gap into backbone and audio parts.
            todo += [("no-audio " + cases[1][0], 3, cases[1][2], without_audio)]
            todo += [(n, b, g, stock_forward) for n, b, g in stock_cases]
        for name, batch, guidance, fn in todo:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = timed(lambda: fn(batch, guidance), args.warmup, args.repeat, device)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            out = fn(batch, guidance)
            seconds = statistics.median(times)
            tflops = flops_per_forward(batch, tokens, frames, sizes) / seconds / 1e12
            if label == "eager":
                eager_out[name] = out
            ref = eager_out[name]
            dev = f"{((out.float() - ref.float()).norm() / ref.float().norm()).item():.2e}"
            ref32 = fp32_out.get(name)
            dev32 = f"{((out.float() - ref32).norm() / ref32.norm()).item():.2e}" if ref32 is not None else ""
            rows.append((label, name, seconds, min(times), tflops, peak, dev, dev32))
            # As it finishes: a run cut short by a time limit still leaves its rows.
            print(f"  {label} | {name}: median {seconds:.3f} s, min {min(times):.3f} s, peak {peak:.2f} GiB, "
                  f"rel dev {dev}, vs fp32 {dev32 or '-'}", file=sys.stderr, flush=True)

    def profile_step(label: str):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            forward(3, Guidance("cfg"))
            torch.cuda.synchronize()
        print(f"--- {label}: top CUDA kernels of one cfg window-step")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))

    if args.ops:
        op_table(lambda: forward(3, Guidance("cfg")), None if stock is None else lambda: stock_forward(3, Guidance("cfg")),
                 device, "eager")
    run_cases("eager", with_stock=True)
    if args.precision == "fp8":
        kernel = kernel_for(device)
        all_cases, cases[:] = list(cases), [cfg_case]
        for label, linear, attention in (("fp8 linear", True, False), ("fp8 attention", False, True),
                                         ("fp8 both", True, True)):
            current["model"] = copy.deepcopy(model)
            use_fp8(current["model"], linear=linear, attention=attention, kernel=kernel)
            run_cases(label + ("" if kernel == "native" else " emul."))
        if not args.no_compile and device.type == "cuda":
            t = time.perf_counter()
            current["model"] = copy.deepcopy(model)
            current["model"].fuse_qkv_projections()
            use_fp8(current["model"])
            current["model"].compile_repeated_blocks(fullgraph=True)
            forward(3, Guidance("cfg"))
            rows.append(("compile", f"fp8 compile time {time.perf_counter() - t:.1f} s", float("nan"), float("nan"),
                         float("nan"), float("nan"), "", ""))
            run_cases("fp8 compiled")
        current["model"] = model
        cases[:] = all_cases
    if args.profile and device.type == "cuda":
        profile_step("eager")
    if args.numerics:
        for numerics, fp8, compiled in NUMERICS_VARIANTS:
            if (compiled and args.no_compile) or args.numerics_rows == ("bf16" if fp8 else "fp8"):
                continue
            label = f"{'fp8' if fp8 else {torch.bfloat16: 'bf16'}.get(dtype, 'fp32')} {numerics}"
            t = time.perf_counter()
            try:
                current["model"] = numerics_variant(model, numerics, fp8, compiled, device)
            except EnvironmentProblem as problem:  # no torchao / cuDNN frontend here: the bf16 rows still count
                print(f"  {label}: skipped ({problem})", file=sys.stderr, flush=True)
                continue
            model.to("cpu")  # the peak of a variant's rows is its own: one copy of the weights on the device
            mode = "eager" if not compiled else "compiled" if device.type == "cuda" else "fused, eager"
            if compiled and device.type == "cuda":
                forward(3, Guidance("cfg"))
                rows.append(("compile", f"{label} compile time {time.perf_counter() - t:.1f} s", float("nan"),
                             float("nan"), float("nan"), float("nan"), "", ""))
            run_cases(f"{label} {mode}")
            current["model"] = model.to(device)
    if args.attention:
        model.set_attention_backend(args.attention)
        run_cases(args.attention)
    if not args.no_compile and device.type == "cuda" and not args.numerics:
        t = time.perf_counter()
        if args.fuse_qkv:
            model.fuse_qkv_projections()
        model.compile_repeated_blocks(fullgraph=True)
        if stock is not None:
            if args.fuse_qkv:
                stock.fuse_qkv_projections()
            stock.compile_repeated_blocks(fullgraph=True)
            stock_forward(3, Guidance("cfg"))
            stock_forward(1, Guidance("none"))
        forward(3, Guidance("cfg"))
        forward(3, Guidance("ang"))
        forward(1, Guidance("none"))
        rows.append(("compile", f"compile time {time.perf_counter() - t:.1f} s", float("nan"), float("nan"),
                     float("nan"), float("nan"), "", ""))
        run_cases("compiled" + (" fused" if args.fuse_qkv else ""), with_stock=True)
        if args.ops:
            op_table(lambda: forward(3, Guidance("cfg")),
                     None if stock is None else lambda: stock_forward(3, Guidance("cfg")), device, "compiled")
        if args.profile:
            profile_step("compiled")

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\ndevice: {name}; torch {torch.__version__}; {parameter_count(model) / 1e9:.3f} B params; "
          f"{height}x{width}, {frames} latent frames, {tokens} tokens/branch; dtype {dtype}; "
          f"random full-size weights built+loaded strictly in {load_seconds:.1f} s")
    print("rel dev: ||out - eager bf16|| / ||eager bf16||;  vs fp32: ||out - fp32 forward|| / ||fp32 forward||")
    stock_time = {(label, case.removeprefix("stock ")): med for label, case, med, *_ in rows if case.startswith("stock")}
    stock_time.update({(label, "no-audio " + case): t for (label, case), t in list(stock_time.items())})
    print(f"{'variant':<34} {'case':<34} {'median s':>9} {'min s':>8} {'TFLOP/s':>8} {'peak GiB':>9} {'rel dev':>9} "
          f"{'vs fp32':>9} {'/ stock':>8}")
    for label, case, med, best, tf, peak, dev, dev32 in rows:
        ratio = stock_time.get((label, case))
        ratio = f"{med / ratio:>8.3f}" if ratio and not case.startswith("stock") else ""
        print(f"{label:<34} {case:<34} {med:>9.3f} {best:>8.3f} {tf:>8.1f} {peak:>9.2f} {dev:>9} {dev32:>9} {ratio:>8}")


if __name__ == "__main__":
    main()
