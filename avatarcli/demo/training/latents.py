"""Between the VAE and the DiT stage: the trained VAE's latent space made what the Wan inference path expects, and
the DiT's training inputs computed from it (nothing trains here).

The encoder's latent statistics are folded into its 1x1x1 quant / post-quant convolutions, so the Wan 2.1
latents_mean/std that every Wan VAE is loaded with normalise its latents to zero mean and unit variance, and the
inference path is unchanged. The whole pool is then encoded, and each portrait's reference condition computed, as the
inference code computes them.
"""

from __future__ import annotations

import numpy as np
import torch

from avatarcli.demo.training.config import WINDOW_VIDEO_FRAMES
from avatarcli.demo.training.data import Pool, to_unit


@torch.no_grad()
def latent_statistics(vae, pool: Pool, count: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (floored at 1e-3) of the latent mode of the first `count` pool videos."""
    mus = []
    for start in range(0, min(count, pool.videos.shape[0]), 8):
        mus.append(vae.encode(to_unit(pool.videos[start : start + 8])).latent_dist.mode().float())
    mu = torch.cat(mus).transpose(0, 1).reshape(16, -1)
    return mu.mean(dim=1), mu.std(dim=1).clamp_min(1e-3)


@torch.no_grad()
def fold_latent_statistics(vae, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make (mu - latents_mean) / latents_std of the config equal (mu - mean) / std of the trained encoder.

    mu' = a mu + c with a = s_wan / std, c = m_wan - a mean, folded into quant_conv (mu rows; log-variance rows
    shifted by 2 log a); post_quant_conv takes z = (z' - c) / a, folded into its weights."""
    m_wan = torch.tensor(vae.config.latents_mean, dtype=torch.float64)
    s_wan = torch.tensor(vae.config.latents_std, dtype=torch.float64)
    a = s_wan / std.double().cpu()
    c = m_wan - a * mean.double().cpu()
    z = len(a)
    quant, post = vae.quant_conv, vae.post_quant_conv
    w, b = quant.weight.double(), quant.bias.double()
    w[:z] *= a.view(-1, 1, 1, 1, 1).to(w.device)
    b[:z] = b[:z] * a.to(b.device) + c.to(b.device)
    b[z:] += 2 * torch.log(a).to(b.device)
    quant.weight.copy_(w)
    quant.bias.copy_(b)
    w2, b2 = post.weight.double(), post.bias.double()
    b2 -= (w2[:, :, 0, 0, 0] @ (c / a).to(w2.device))
    w2 /= a.view(1, -1, 1, 1, 1).to(w2.device)
    post.weight.copy_(w2)
    post.bias.copy_(b2)


@torch.no_grad()
def encode_pool(vae, pool: Pool, batch: int = 32) -> torch.Tensor:
    """Normalised latent mode of every whole pool video: [N, 16, L, h, w] (what the DiT denoises)."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    out = []
    for start in range(0, pool.videos.shape[0], batch):
        x = to_unit(pool.videos[start : start + batch])
        mode = vae.encode(x).latent_dist.mode()
        out.append(((mode - mean.to(mode)) / std.to(mode)).float())
    return torch.cat(out)


@torch.no_grad()
def reference_conditions(vae, portraits: np.ndarray) -> torch.Tensor:
    """avatarcli.features.image.reference_condition for a batch of portraits at their own size (same math)."""
    from avatarcli.features.image import MASK_CHANNELS

    parameter = next(vae.parameters())
    b, height, width, _ = portraits.shape
    video = torch.zeros(b, 3, WINDOW_VIDEO_FRAMES, height, width, device=parameter.device)
    video[:, :, 0] = torch.from_numpy(portraits).to(parameter.device).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
    latents = vae.encode(video.to(parameter.dtype)).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
    latents = (latents - mean) / std
    mask = torch.zeros(b, MASK_CHANNELS, *latents.shape[2:]).to(latents)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latents], dim=1)
