"""Tiny random checkpoints in the exact published layouts, for tests and for trying the CLI without real weights.

    from avatarcli.testing import make_tiny_weights
    make_tiny_weights("tiny", model="stableavatar")
    # avatarcli animate portrait.png --audio talk.wav --weights tiny --size 64x64 --steps 2

Same file names and key names as the published checkpoints, tiny shapes and random values: the output is noise,
but every loading, conversion, sampling, decoding and muxing path runs exactly as with the real weights.
"""

from __future__ import annotations

from pathlib import Path

from avatarcli.testing.stableavatar import FULL_SIZE

# Widths must agree with the tiny encoders: umT5 width 32 -> text_dim, CLIP ViT width 32 -> image_dim;
# the audio adapter input stays 768 (wav2vec2-base's width).
TINY_STABLEAVATAR = dict(FULL_SIZE, dim=48, num_heads=2, text_dim=32, ffn_dim=64, num_layers=2, image_dim=32,
                         freq_dim=32)

MODELS = ("stableavatar", "sfd", "flashportrait")


def make_tiny_weights(path: str | Path, model: str = "stableavatar", seed: int = 0) -> Path:
    """Write a tiny random checkpoint folder for `model` ("stableavatar", "sfd" or "flashportrait") and return its path."""
    path = Path(path)
    if model == "stableavatar":
        from avatarcli.testing.components import write_tiny_clip, write_tiny_t5, write_tiny_vae, write_tiny_wav2vec
        from avatarcli.testing.stableavatar import write_tiny_transformer

        base = path / "Wan2.1-Fun-V1.1-1.3B-InP"
        write_tiny_transformer(path, TINY_STABLEAVATAR, seed)
        write_tiny_vae(base, seed + 1)
        write_tiny_t5(base, seed + 2)
        write_tiny_clip(base, seed + 3)
        write_tiny_wav2vec(path / "wav2vec2-base-960h", seed + 4)
        return path
    if model == "sfd":
        from avatarcli.testing.sfd import write_tiny_sfd

        write_tiny_sfd(path, seed=seed)
        return path
    if model == "flashportrait":
        from avatarcli.testing.flashportrait import make_tiny_flashportrait

        return make_tiny_flashportrait(path, seed=seed)
    raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
