"""When compiling the StableAvatar DiT pays: the break-even behind `animate --compile auto`.

Full-size random weights in the published key layout, built through the real loading code (as bench_transformer.py),
and the window-step of the shipped presets at 480x832: one batched forward of the 3 cfg branches over a 21-latent-frame
window (`--branches 1`: the conditional branch alone, as guidance reuse runs it). Wall clock after synchronising:
  * eager: the median window-step, after one warm-up;
  * compiled as `animate --compile on` does it (q/k/v fused, every block torch.compile'd with fullgraph): the time of
    each of the first `--first` window-steps, which compile, then the median of the steady ones. Once with empty
    inductor and Triton caches (a machine's first compiled run: cold), once more after torch._dynamo.reset() with
    those caches filled (a later run: warm; in one process, so a lower bound of a new process's time);
  * the compile overhead (the first window-steps minus as many steady ones) over the time a steady compiled
    window-step saves against eager: the break-even in window-steps, avatarcli/compilation.py
    BREAK_EVEN_WINDOW_STEPS (take the cold one: `auto` cannot know whether the cache is warm).
Prints a markdown table last.

    python benchmarks/bench_compile.py                  # on a CUDA GPU
    python benchmarks/bench_compile.py --branches 1     # the window-step of guidance reuse
    python benchmarks/bench_compile.py --tiny           # CPU smoke test (dynamo's eager backend: no speed)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import torch

from avatarcli.loading.transformer import build_transformer
from avatarcli.models.stableavatar import AudioConditioning
from avatarcli.sampling.guidance import Guidance
from avatarcli.testing import TINY_STABLEAVATAR
from avatarcli.testing.stableavatar import FULL_SIZE, random_state_dict, wan_config

from common import synchronize


def window_step(model, branches: int, height: int, width: int, device: torch.device, dtype: torch.dtype):
    """() -> one window-step of `model`: the first `branches` cfg branches (3), or the conditional one alone (1)."""
    cfg, gen = model.config, torch.Generator(device).manual_seed(0)
    h, w = height // 8, width // 8

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device=device, dtype=dt)

    guidance = Guidance("cfg")
    rows = guidance.branches if branches == 3 else guidance.branches[guidance.conditional : guidance.conditional + 1]
    x = torch.cat([rand(1, 16, 21, h, w), torch.zeros(1, 4, 21, h, w, device=device, dtype=dtype),
                   rand(1, 16, 21, h, w)], dim=1).expand(len(rows), -1, -1, -1, -1)
    t = torch.full((len(rows),), 977.9, device=device)
    text, image = rand(len(rows), 512, cfg.text_dim), rand(len(rows), 257, cfg.image_dim)
    audio = AudioConditioning(rand(1, 161, cfg.audio_in_dim, dt=torch.float32),
                              [0 if b.audio == "real" else None for b in rows])

    def step():
        with torch.no_grad():
            model(x, t, text, image, audio)

    return step


def seconds(fn, device: torch.device) -> float:
    synchronize(device)
    tick = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - tick


def compiled_run(model, step, device: torch.device, first: int, repeat: int) -> tuple[list[float], float]:
    """(seconds of each of the first window-steps, which compile; the median of `repeat` steady ones)."""
    firsts = [seconds(step, device) for _ in range(first)]
    return firsts, statistics.median(seconds(step, device) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU, dynamo's eager backend (checks "
                        "the script and that the blocks capture as one graph; no speed)")
    parser.add_argument("--size", default=None, help="WxH (default 480x832; --tiny: 64x64)")
    parser.add_argument("--branches", type=int, default=3, choices=[1, 3],
                        help="3: the cfg window-step; 1: the conditional branch alone (guidance reuse)")
    parser.add_argument("--first", type=int, default=3, help="compiled window-steps timed one by one (they compile)")
    parser.add_argument("--repeat", type=int, default=5, help="steady window-steps per median")
    parser.add_argument("--backend", default=None, help="torch.compile backend (default: inductor; --tiny: eager)")
    args = parser.parse_args()
    size = args.size or ("64x64" if args.tiny else "480x832")
    width, height = (int(v) for v in size.split("x"))
    backend = args.backend or ("eager" if args.tiny else "inductor")
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    # Empty caches for the cold compile (read when inductor and Triton first compile, after this).
    caches = tempfile.mkdtemp(prefix="bench_compile_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(caches, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(caches, "triton")

    sizes = TINY_STABLEAVATAR if args.tiny else FULL_SIZE
    model = build_transformer(random_state_dict(sizes, 0, str(device), dtype), wan_config(sizes), dtype=dtype,
                              device=device)
    step = window_step(model, args.branches, height, width, device, dtype)
    eager_firsts = [seconds(step, device)]  # the warm-up (cuDNN, the allocator)
    eager = statistics.median(seconds(step, device) for _ in range(args.repeat))
    print(f"  eager window-step: {eager:.3f} s", file=sys.stderr, flush=True)

    tick = time.perf_counter()
    model.fuse_qkv_projections()
    model.compile_repeated_blocks(fullgraph=True, backend=backend)
    setup = time.perf_counter() - tick  # torch.compile itself is lazy: the work is in the first window-steps
    rows = [("eager", eager_firsts, eager)]
    for label in ("compiled, cold cache", "compiled, warm cache"):
        if label.endswith("warm cache"):
            torch._dynamo.reset()  # traced again at the next call, from the caches the cold run filled
        firsts, steady = compiled_run(model, step, device, args.first, args.repeat)
        rows.append((label, firsts, steady))
        print(f"  {label}: first window-steps {', '.join(f'{s:.2f}' for s in firsts)} s, then {steady:.3f} s",
              file=sys.stderr, flush=True)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{name}, torch {torch.__version__}, {size}, {args.branches} branch(es) of 21 latent frames, {dtype}, "
          f"backend {backend}; fuse + compile_repeated_blocks calls {setup:.2f} s; break-even = compile overhead / "
          "saved per window-step (avatarcli/compilation.py BREAK_EVEN_WINDOW_STEPS takes the cold one)")
    print("| variant | first window-steps, s | steady window-step, s | compile overhead, s | saved per window-step, s "
          "| break-even, window-steps |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, firsts, steady in rows:
        firsts_text = ", ".join(f"{s:.2f}" for s in firsts)
        if label == "eager":
            print(f"| {label} | {firsts_text} | {steady:.3f} | - | - | - |")
            continue
        overhead = setup + sum(firsts) - len(firsts) * steady
        saved = eager - steady
        even = f"**{math.ceil(overhead / saved)}**" if saved > 0 else "never (not faster)"
        print(f"| {label} | {firsts_text} | {steady:.3f} | {overhead:.1f} | {saved:.3f} | {even} |")


if __name__ == "__main__":
    main()
