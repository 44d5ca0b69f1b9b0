"""The embedded demo model: where its weights are, and the size it renders at.

The weights (avatarcli/demo/weights, ~15 MB of safetensors) are a small StableAvatar trained on the synthetic world
of avatarcli.demo.world by benchmarks/train_demo.py. They are laid out like the published FrancisRing/StableAvatar
folder and load through the same loaders, so `--model demo` runs the real code path end to end without a download.
"""

from __future__ import annotations

from pathlib import Path

DEMO_SIZE = "128x128"  # the demo world's and the demo model's native size
DEMO_CHECKPOINT = "square"  # the demo ships one transformer, in the square checkpoint's place
MODELS = ("stableavatar", "demo")


def demo_weights_dir() -> Path:
    """The folder of the embedded demo weights (published StableAvatar layout, safetensors containers)."""
    return Path(__file__).resolve().parent / "weights"


def demo_size(requested: str | None) -> str:
    """The demo renders at its native size unless a size was asked for explicitly (a preset's size does not count)."""
    return requested if requested is not None else DEMO_SIZE
