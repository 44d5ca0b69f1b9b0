"""Every StableAvatar component from one folder in the published layout (Hub repo FrancisRing/StableAvatar)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from avatarcli.loading.components import load_audio_encoder, load_image_encoder, load_text_encoder, load_vae
from avatarcli.loading.transformer import BASE_FOLDER, load_stableavatar_transformer

VAE_FILE = f"{BASE_FOLDER}/Wan2.1_VAE.pth"
T5_FILE = f"{BASE_FOLDER}/models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_FOLDER = f"{BASE_FOLDER}/google/umt5-xxl"
CLIP_FILE = f"{BASE_FOLDER}/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
WAV2VEC_FOLDER = "wav2vec2-base-960h"


@dataclass
class StableAvatarComponents:
    transformer: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module | None  # dropped once the prompts are encoded
    tokenizer: object
    image_encoder: torch.nn.Module
    audio_encoder: torch.nn.Module
    feature_extractor: object
    prompt_cache: dict = field(default_factory=dict)  # (negative, positive) -> their umT5 embeddings
    weights_dir: Path | None = None  # where they were loaded from (umT5 is loaded from there when a prompt needs it)
    disk_prompts: object = None  # features.prompt_cache.PromptCache for this umT5 file, when the driver uses one
    tiny_decoder: torch.nn.Module | None = None  # models.taehv decoder (fast_vae.pth) for --decoder tiny


def text_dtype_for(device: str | torch.device) -> torch.dtype:
    """umT5 runs in bfloat16 on a GPU (the published file's dtype) and float32 on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_stableavatar(weights_dir: Path, checkpoint: str, device: str | torch.device, dtype: torch.dtype,
                      with_text_encoder: bool = True,
                      transformer_device: str | torch.device | None = None) -> StableAvatarComponents:
    """DiT in `dtype` (on `transformer_device`, default `device`; "cpu" when it will be offloaded); the VAE, CLIP and
    wav2vec2 in float32 and umT5 in bfloat16 (on CPU: float32), as the reference. `with_text_encoder=False` leaves
    umT5 and its tokenizer out (the prompts' embeddings are cached, or the caller places umT5 itself)."""
    weights_dir = Path(weights_dir)
    text_encoder = tokenizer = None
    if with_text_encoder:
        text_encoder, tokenizer = load_text_encoder(weights_dir / T5_FILE, weights_dir / TOKENIZER_FOLDER,
                                                    dtype=text_dtype_for(device), device=device)
    audio_encoder, feature_extractor = load_audio_encoder(weights_dir / WAV2VEC_FOLDER, device=device)
    return StableAvatarComponents(
        transformer=load_stableavatar_transformer(weights_dir, checkpoint, dtype=dtype,
                                                  device=transformer_device or device),
        vae=load_vae(weights_dir / VAE_FILE, device=device),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        image_encoder=load_image_encoder(weights_dir / CLIP_FILE, device=device),
        audio_encoder=audio_encoder,
        feature_extractor=feature_extractor,
    )
