"""Self-attention at the StableAvatar window shape (480x832, 21 latent frames: 32760 tokens, 12 heads x 128), bf16.

Times torch SDPA with each backend forced, to pick the attention backend for the DiT. Prints a table last.

    python benchmarks/bench_attention.py
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import timed


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    tokens, heads, dim = 32760, 12, 128
    rows = []
    for batch in (1, 3):
        q, k, v = (torch.randn(batch, heads, tokens, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * batch * heads * tokens * tokens * dim
        reference = None
        for name, backend in [("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
            def run():
                if backend is None:
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)

            try:
                out = run()
            except RuntimeError as error:
                rows.append((batch, name, float("nan"), float("nan"), str(error).split("\n")[0][:40]))
                continue
            reference = out if reference is None else reference
            t = statistics.median(timed(run, warmup=3, repeat=10, device=torch.device("cuda")))
            dev = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
            rows.append((batch, name, t, flops / t / 1e12, f"{dev:.1e}"))
    print(f"\ndevice: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print(f"{'batch':>5} {'backend':<10} {'median s':>9} {'TFLOP/s':>8} {'dev vs default':>15}")
    for batch, name, t, tf, note in rows:
        print(f"{batch:>5} {name:<10} {t:>9.4f} {tf:>8.1f} {note:>15}")


if __name__ == "__main__":
    main()
