"""StableAvatar's time-step-aware audio adapter (the reference's `vocal_projector`).

wav2vec2 features -> projection -> split into one audio window per latent frame -> 2 modulated blocks whose
cross-attention reads the patch-embedded DiT input tokens of the same latent frame -> time-modulated head.
Attribute names follow the published checkpoint (`vocal_projector.*`), so its keys load without renaming.
Formulas follow the reference code, which the weights were trained with (not the paper's Eqs. 2-4).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.normalization import FP32LayerNorm


class RMSNorm(nn.Module):
    """RMS norm over the full width, computed in float32 (the reference's WanRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def audio_window_ranges(num_audio_tokens: int, latent_frames: int, expand: int) -> list[tuple[int, int]]:
    """Inclusive [start, end] audio-token range of each latent frame (may reach outside [0, T-1]).

    The reference centres a window of ±(half + expand) tokens on latent frame i's video frames 4i-3..4i, where
    half = int(2 * tokens_per_frame); frame 0's window ends where frame 1's starts.
    """
    video_frames = 4 * (latent_frames - 1) + 1
    per_frame = num_audio_tokens / video_frames
    half = int(per_frame * 4 / 2)
    centres = [0] + [int((per_frame * (4 * i - 3) + per_frame * (4 * i + 1)) / 2) - 1 for i in range(1, latent_frames)]
    ranges = [[c - half, c + half] for c in centres]
    if latent_frames > 1:
        ranges[0] = [ranges[1][0] - 2 * half, ranges[1][0]]
    return [(s - expand, e + expand) for s, e in ranges]


def split_audio_windows(tokens: torch.Tensor, latent_frames: int, expand: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, C] -> ([B, F, W, C], valid counts [F]).

    Quirk matched from the reference: the in-range tokens are copied left-aligned and ALL padding (also for
    indices below 0) goes to the end of the window.
    """
    b, t, c = tokens.shape
    ranges = audio_window_ranges(t, latent_frames, expand)
    width = ranges[0][1] - ranges[0][0] + 1
    out = tokens.new_zeros(b, latent_frames, width, c)
    valid = []
    for i, (start, end) in enumerate(ranges):
        lo, hi = max(start, 0), min(end, t - 1)
        n = max(hi - lo + 1, 0)
        if n:
            out[:, i, :n] = tokens[:, lo : hi + 1]
        valid.append(n)
    return out, torch.tensor(valid, dtype=torch.long)


class AudioProjection(nn.Module):
    def __init__(self, audio_in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(audio_in_dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)  # default eps 1e-5, as in the reference

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(audio))


class FrameCrossAttention(nn.Module):
    """Audio queries of latent frame f attend to the DiT tokens of latent frame f only."""

    def __init__(self, dim: int, dit_dim: int, heads: int, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dit_dim, dim)
        self.v = nn.Linear(dit_dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, latent_frames: int) -> torch.Tensor:
        b, n = x.shape[0], self.heads
        q = self.norm_q(self.q(x)).view(b * latent_frames, -1, n, x.shape[-1] // n).transpose(1, 2)
        k = self.norm_k(self.k(tokens)).view(b * latent_frames, -1, n, x.shape[-1] // n).transpose(1, 2)
        v = self.v(tokens).view(b * latent_frames, -1, n, x.shape[-1] // n).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, x.shape[-1])
        return self.o(out)


class AdapterBlock(nn.Module):
    def __init__(self, dim: int, dit_dim: int, ffn_dim: int, heads: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = FrameCrossAttention(dim, dit_dim, heads, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, tokens: torch.Tensor, latent_frames: int) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e0).chunk(6, dim=1)
        # The reference has no self-attention here: the modulated input itself is the gated residual.
        x = x + (self.norm1(x) * (1 + scale1) + shift1) * gate1
        x = x + self.cross_attn(self.norm3(x), tokens, latent_frames)
        return x + self.ffn(self.norm2(x) * (1 + scale2) + shift2) * gate2


class AdapterHead(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.final_proj = nn.Linear(dim, dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation + e.unsqueeze(1)).chunk(2, dim=1)
        return self.final_proj(self.norm(x) * (1 + scale) + shift)


class AudioAdapter(nn.Module):
    """wav2vec2 features + the DiT's own time embeddings and input tokens -> per-latent-frame audio context."""

    def __init__(self, audio_in_dim: int, dim: int, dit_dim: int, heads: int = 8, num_layers: int = 2,
                 ffn_dim: int | None = None, window_expand: int = 4, eps: float = 1e-6):
        super().__init__()
        self.window_expand = window_expand
        self.proj_model = AudioProjection(audio_in_dim, dim)
        self.blocks = nn.ModuleList(
            [AdapterBlock(dim, dit_dim, ffn_dim or 2 * dim, heads, eps) for _ in range(num_layers)]
        )
        self.final_head = AdapterHead(dim, eps)

    def forward(self, audio: torch.Tensor, tokens: torch.Tensor, e0: torch.Tensor, e: torch.Tensor,
                latent_frames: int) -> torch.Tensor:
        """audio [B, T_a, audio_in_dim], tokens [B, S, dit_dim], e0 [B, 6, dim], e [B, dim] -> [B, F, W, dim]."""
        windows, _ = split_audio_windows(self.proj_model(audio), latent_frames, self.window_expand)
        b, f, w, c = windows.shape
        x = windows.reshape(b, f * w, c)
        for block in self.blocks:
            x = block(x, e0, tokens, latent_frames)
        return self.final_head(x, e).view(b, f, w, c)
