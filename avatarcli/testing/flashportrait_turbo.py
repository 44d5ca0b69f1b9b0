"""Tiny files of FlashPortrait's 4-step path in their published layouts: `fast_vae.pth` and
`fast_lora_rank64.safetensors`.

`tae_key_shapes` spells out the reference TAEHV module's state-dict names (encoder and decoder) independently of
avatarcli.models.taehv, so tests can hold the model's layout against it. The LoRA writer covers the layers the
step-distill LoRA adapts (digest: flashportrait.md §2, §6.2): low-rank pairs on the linear layers, `diff_b` on
their biases, `diff` on norm weights, `diff_m` on the blocks' modulation; keys prefixed `diffusion_model.`. (Which
layers the published file adapts was not checked against the file itself; the merge is strict either way.)

    write_tiny_turbo_files(folder, original_key_shapes_of_the_tiny_transformer)   # fast_vae.pth + the LoRA
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from avatarcli.models.taehv import TAEHVConfig

# Same structure as the published decoder, narrow enough to decode a 64x64 clip in milliseconds.
TINY_TAEHV = TAEHVConfig(latent_channels=16, widths=(16, 16, 8, 8))
TINY_TAEHV_ENCODER_WIDTH = 8

# Original Wan parameters the step-distill LoRA adapts, by kind (FlashPortrait's emo projections are not among them).
_LINEAR = re.compile(r"(blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o|k_img|v_img)|blocks\.\d+\.ffn\.[02]|head\.head"
                     r"|text_embedding\.[02]|time_embedding\.[02]|time_projection\.1|img_emb\.proj\.[13])")
_NORM = re.compile(r"(blocks\.\d+\.(self_attn|cross_attn)\.(norm_q|norm_k|norm_k_img)|blocks\.\d+\.norm3"
                   r"|img_emb\.proj\.[04])")
_MODULATION = re.compile(r"blocks\.\d+")


def tae_key_shapes(config: TAEHVConfig = TAEHVConfig(), encoder_width: int = 64) -> dict[str, tuple[int, ...]]:
    """Every key of the reference TAEHV module (encoder + decoder) with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, n_in: int, n_out: int, bias: bool = True, kernel: int = 3) -> None:
        shapes[f"{name}.weight"] = (n_out, n_in, kernel, kernel)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    def memblock(name: str, width: int) -> None:
        conv(f"{name}.conv.0", 2 * width, width)
        conv(f"{name}.conv.2", width, width)
        conv(f"{name}.conv.4", width, width)

    e, z = encoder_width, config.latent_channels
    conv("encoder.0", config.image_channels, e)
    index = 2
    for stride in (config.time_strides[1], config.time_strides[0], 1):  # TPool, strided conv, 3 MemBlocks
        conv(f"encoder.{index}.conv", e * stride, e, bias=False, kernel=1)
        conv(f"encoder.{index + 1}", e, e, bias=False)
        for offset in (2, 3, 4):
            memblock(f"encoder.{index + offset}", e)
        index += 5
    conv(f"encoder.{index}", e, z)

    c0, c1, c2, c3 = config.widths
    conv("decoder.1", z, c0)
    for first, (width, nxt, stride) in zip((3, 9, 15), ((c0, c1, 1), (c1, c2, config.time_strides[0]),
                                                         (c2, c3, config.time_strides[1]))):
        for offset in (0, 1, 2):
            memblock(f"decoder.{first + offset}", width)
        conv(f"decoder.{first + 4}.conv", width, width * stride, bias=False, kernel=1)  # TGrow after the Upsample
        conv(f"decoder.{first + 5}", width, nxt, bias=False)
    conv("decoder.22", c3, config.image_channels)
    return shapes


def tiny_fast_vae_state_dict(config: TAEHVConfig = TINY_TAEHV, encoder_width: int = TINY_TAEHV_ENCODER_WIDTH,
                             seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights (convs ~ U(+-sqrt(3/fan_in)), biases small) for every key of `tae_key_shapes`."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in sorted(tae_key_shapes(config, encoder_width).items()):
        uniform = torch.rand(shape, generator=generator) * 2 - 1
        fan_in = 1
        for size in shape[1:]:
            fan_in *= size
        state[key] = 0.1 * uniform if key.endswith("bias") else uniform * (3 / fan_in) ** 0.5
    # Keep the last layer's output inside the final clamp to [0, 1], so a tiny decode is a picture, not a clip.
    state["decoder.22.bias"] = state["decoder.22.bias"] + 0.5
    state["decoder.22.weight"] = state["decoder.22.weight"] * 0.25
    return state


def write_tiny_fast_vae(path: str | Path, config: TAEHVConfig = TINY_TAEHV,
                        encoder_width: int = TINY_TAEHV_ENCODER_WIDTH, seed: int = 0) -> Path:
    """`fast_vae.pth` in the published layout: a pickled plain state dict with encoder and decoder keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_fast_vae_state_dict(config, encoder_width, seed), path)
    return path


def tiny_fast_lora_state_dict(target_shapes: Mapping[str, tuple[int, ...]], rank: int = 4, seed: int = 0,
                              scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A step-distill LoRA for a transformer whose ORIGINAL Wan parameter names and shapes are `target_shapes`."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    lora: dict[str, torch.Tensor] = {}
    for key, shape in sorted(target_shapes.items()):
        layer, _, kind = key.rpartition(".")
        prefixed = "diffusion_model." + layer
        if _LINEAR.fullmatch(layer) and kind == "weight" and len(shape) == 2:
            lora[f"{prefixed}.lora_down.weight"] = randn(rank, shape[1]) / shape[1] ** 0.5
            lora[f"{prefixed}.lora_up.weight"] = randn(shape[0], rank) * scale / rank**0.5
        elif (_LINEAR.fullmatch(layer) or _NORM.fullmatch(layer)) and kind == "bias":
            lora[f"{prefixed}.diff_b"] = randn(*shape) * scale
        elif _NORM.fullmatch(layer) and kind == "weight":
            lora[f"{prefixed}.diff"] = randn(*shape) * scale
        elif _MODULATION.fullmatch(layer) and kind == "modulation":
            lora[f"{prefixed}.diff_m"] = randn(*shape) * scale
    return lora


def write_tiny_fast_lora(path: str | Path, target_shapes: Mapping[str, tuple[int, ...]], rank: int = 4,
                         seed: int = 0) -> Path:
    """`fast_lora_rank64.safetensors` in the published key layout (at a tiny rank)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tiny_fast_lora_state_dict(target_shapes, rank, seed).items()}, str(path))
    return path


def write_tiny_turbo_files(folder: str | Path, transformer_shapes: Mapping[str, tuple[int, ...]],
                           seed: int = 0) -> Path:
    """Both files of the 4-step path under their published names in `folder`, the LoRA made for a transformer
    whose original Wan parameter names and shapes are `transformer_shapes`; returns `folder`."""
    from avatarcli.loading.lora import FAST_LORA_FILE
    from avatarcli.loading.taehv import FAST_VAE_FILE

    folder = Path(folder)
    write_tiny_fast_vae(folder / FAST_VAE_FILE, seed=seed)
    write_tiny_fast_lora(folder / FAST_LORA_FILE, transformer_shapes, seed=seed + 1)
    return folder
