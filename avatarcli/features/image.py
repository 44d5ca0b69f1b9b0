"""Reference image -> CLIP image tokens and the 20-channel i2v condition y (mask + reference latents)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from PIL import Image
from transformers import CLIPVisionModel

from avatarcli.errors import AvatarError

# OpenAI CLIP normalisation, used by open-clip XLM-R ViT-H/14 (wan/modules/clip.py).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MASK_CHANNELS = 4


def reference_pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """[1, 3, H, W] float32 in [-1, 1]: the portrait stretched to (W, H) with PIL bicubic, as the reference does."""
    resized = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
    return (pixels / 255.0 - 0.5) * 2.0


@torch.no_grad()
def clip_features(image_encoder: CLIPVisionModel, image: Image.Image, width: int, height: int) -> torch.Tensor:
    """[1, 257, image_dim] penultimate-block tokens (Wan's use_31_block=True) in the encoder's dtype.

    Preprocessing follows Wan's CLIPModel.visual: the (W, H) reference in [-1, 1], torch bicubic to 224x224
    (align_corners=False, no antialias), back to [0, 1], CLIP mean/std. The reference casts the pixels to bf16 before
    resizing; here they stay float32 until the encoder.
    """
    size = image_encoder.config.image_size
    pixels = F.interpolate(reference_pixels(image, width, height), size=(size, size), mode="bicubic",
                           align_corners=False)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = (pixels * 0.5 + 0.5 - mean) / std
    parameter = next(image_encoder.parameters())
    output = image_encoder(pixel_values=pixels.to(parameter.device, parameter.dtype), output_hidden_states=True)
    return output.hidden_states[-2]


@torch.no_grad()
def reference_condition(
    vae: AutoencoderKLWan, image: Image.Image, width: int, height: int, num_frames: int = 81,
) -> torch.Tensor:
    """y = [mask (4) | normalised VAE latent mode (16)] of the clip [reference, num_frames-1 zero frames].

    Shape [1, 20, F_lat, H/8, W/8] with F_lat = (num_frames-1)/4 + 1. The mask is 1 on all four channels at latent
    frame 0 (its first pixel frame repeated 4x) and 0 elsewhere; the latents are (mode - latents_mean) / latents_std.
    Same layout as diffusers' WanImageToVideoPipeline and StableAvatar's long pipeline.
    """
    temporal, spatial = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    if (num_frames - 1) % temporal:
        raise ValueError(f"num_frames must be {temporal}k+1, got {num_frames}")
    if width % spatial or height % spatial:
        raise AvatarError(f"width and height must be multiples of {spatial}, got {width}x{height}")
    parameter = next(vae.parameters())
    video = torch.zeros(1, 3, num_frames, height, width)
    video[:, :, 0] = reference_pixels(image, width, height)[0]
    latents = vae.encode(video.to(parameter.device, parameter.dtype)).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
    latents = (latents - mean) / std
    mask = torch.zeros(1, MASK_CHANNELS, *latents.shape[2:]).to(latents)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latents], dim=1)
