"""The published StableAvatar folder layout the trained demo is written in, and the components nothing trains.

Tiny umT5 (+ tokenizer) and CLIP ViT with fixed random weights: they carry no information here, the DiT learns to rely
on the reference latents and the audio (as the published layout needs them, they exist). The trained weights are
written in the original key layouts (transformer3d-square.safetensors with Wan names, Wan2.1_VAE.safetensors with Wan
VAE names) and verified by loading them back through avatarcli.loading, strictly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from avatarcli.demo.training.config import DemoSizes

BASE = "Wan2.1-Fun-V1.1-1.3B-InP"
AVATAR = "StableAvatar-1.3B"
WAV2VEC = "wav2vec2-base-960h"


def transformer_sizes(sizes: DemoSizes) -> dict:
    """Sizes in the naming of avatarcli.testing.stableavatar (the original Wan key layout)."""
    from avatarcli.testing.components import TINY_CLIP, TINY_T5

    return dict(dim=sizes.dim, num_heads=sizes.num_heads, in_dim=36, out_dim=16, text_dim=TINY_T5["dim"],
                freq_dim=sizes.freq_dim, ffn_dim=sizes.ffn_dim, num_layers=sizes.num_layers,
                image_dim=TINY_CLIP["vision_dim"], audio_in_dim=sizes.audio_dim, audio_layers=2, text_len=512,
                eps=1e-6)


def write_fixed_components(folder: Path, sizes: DemoSizes, seed: int) -> None:
    """Tiny umT5 + tokenizer and CLIP (fixed random), and the Wan config.json, in the published layout."""
    from safetensors.torch import save_file

    from avatarcli.testing.components import (
        CLIP_FILE, T5_FILE, T5_TOKENIZER_FOLDER, TINY_CLIP, TINY_T5, random_state_dict,
        umt5_encoder_original_shapes, write_tiny_umt5_tokenizer, xlm_roberta_clip_original_shapes,
    )
    from avatarcli.testing.stableavatar import wan_config

    base = folder / BASE
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps(wan_config(transformer_sizes(sizes)), indent=2))
    t5 = random_state_dict(umt5_encoder_original_shapes(**TINY_T5), seed + 2, dtype=torch.bfloat16)
    save_file(t5, str((base / T5_FILE).with_suffix(".safetensors")))
    write_tiny_umt5_tokenizer(base / T5_TOKENIZER_FOLDER, vocab_size=TINY_T5["vocab"])
    clip = random_state_dict(xlm_roberta_clip_original_shapes(**TINY_CLIP), seed + 3)
    visual = {k: v for k, v in clip.items() if k.startswith("visual.") and k != "visual.head"}
    save_file(visual, str((base / CLIP_FILE).with_suffix(".safetensors")))


def export_transformer(model, sizes: DemoSizes, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """diffusers names -> the original Wan/StableAvatar names the published .pt uses (inverse of the loader), stored
    in `dtype` (the loader casts to the inference dtype)."""
    from avatarcli.loading.transformer import convert_original_keys
    from avatarcli.testing.stableavatar import original_key_shapes

    shapes = original_key_shapes(transformer_sizes(sizes))
    markers = {key: torch.empty(shape) for key, shape in shapes.items()}
    converted = convert_original_keys(markers)
    by_pointer = {value.data_ptr(): key for key, value in markers.items()}
    state = model.state_dict()
    out = {}
    for new_key, value in converted.items():
        original = by_pointer[value.data_ptr()]
        out[original] = state[new_key].detach().to(dtype).cpu().reshape(shapes[original]).contiguous()
    if set(converted) != set(state):
        raise RuntimeError(f"layout mismatch: {sorted(set(state) ^ set(converted))[:5]}")
    return out


def export_vae(vae, sizes: DemoSizes, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKLWan names -> Wan2.1_VAE.pth names (converted key by key, as the loader does), stored in
    `dtype` (the loader casts to float32)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from avatarcli.testing.components import wan_vae_original_shapes

    state = vae.state_dict()
    out = {}
    for key, shape in wan_vae_original_shapes(dim=sizes.vae_base, z_dim=16).items():
        (new_key,) = convert_wan_vae_to_diffusers({key: torch.empty(shape)}).keys()
        out[key] = state[new_key].detach().to(dtype).cpu().reshape(shape).contiguous()
    return out


def verify(folder: str | Path) -> None:
    """Load the written folder through the real loaders (strict) and run one tiny forward."""
    from avatarcli.loading.stableavatar import load_stableavatar

    load_stableavatar(Path(folder), "square", "cpu", torch.float32)
