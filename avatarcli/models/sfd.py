"""LightningDiT with the SFD dual-timestep conditioning (arXiv 2512.04926, models/lightningdit.py of the SFD code).

The denoiser sees a composite latent [texture | semantic] and two timesteps, one per stream. Module and
parameter names follow the published checkpoints, so their state dicts load without renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LightningDiTConfig:
    input_size: int = 16
    patch_size: int = 1
    in_channels: int = 48
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_hidden_dim: int = 3072
    num_classes: int = 1000
    has_null_class: bool = True
    learn_sigma: bool = False
    use_qknorm: bool = True
    use_swiglu: bool = True
    use_rope: bool = True
    use_rmsnorm: bool = True
    wo_shift: bool = False
    semantic_chans: int = 16
    semfirst_delta_t: float = 0.3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def texture_chans(self) -> int:
        return self.in_channels - self.semantic_chans

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def semantic_first(self) -> bool:
        # The reference builds two half-width timestep embedders only under this condition.
        return self.semfirst_delta_t > 0 and self.semantic_chans > 0

    @property
    def null_class(self) -> int:
        return self.num_classes

    @classmethod
    def from_reference_kwargs(cls, kwargs: dict[str, Any]) -> "LightningDiTConfig":
        """Map the reference `LightningDiT(...)` constructor arguments (REPA options are training-only)."""
        hidden = int(kwargs["hidden_size"])
        ratio = float(kwargs.get("mlp_ratio", 4.0))
        swiglu = bool(kwargs.get("use_swiglu", False))
        # SwiGLU keeps the parameter count of a ratio-4 MLP: hidden width int(2/3 * ratio * D).
        mlp_hidden = int(2 / 3 * int(hidden * ratio)) if swiglu else int(hidden * ratio)
        return cls(
            input_size=int(kwargs["input_size"]),
            patch_size=int(kwargs.get("patch_size", 1)),
            in_channels=int(kwargs.get("in_channels", kwargs.get("in_chans", 48))),
            hidden_size=hidden,
            depth=int(kwargs["depth"]),
            num_heads=int(kwargs["num_heads"]),
            mlp_hidden_dim=mlp_hidden,
            num_classes=int(kwargs.get("num_classes", 1000)),
            has_null_class=float(kwargs.get("class_dropout_prob", 0.1)) > 0,
            learn_sigma=bool(kwargs.get("learn_sigma", False)),
            use_qknorm=bool(kwargs.get("use_qknorm", False)),
            use_swiglu=swiglu,
            use_rope=bool(kwargs.get("use_rope", False)),
            use_rmsnorm=bool(kwargs.get("use_rmsnorm", False)),
            wo_shift=bool(kwargs.get("wo_shift", False)),
            semantic_chans=int(kwargs.get("semantic_chans", 0)),
            semfirst_delta_t=float(kwargs.get("semfirst_delta_t", 0.0)),
        )


# Shared `model:` block of every SFD config: 48 = 32 texture + 16 semantic channels, 16x16 latent.
SFD_OPTIONS: dict[str, Any] = dict(
    input_size=16, patch_size=1, in_channels=48, semantic_chans=16, semfirst_delta_t=0.3,
    use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False,
    num_classes=1000, class_dropout_prob=0.1, mlp_ratio=4.0,
)

PRESETS: dict[str, LightningDiTConfig] = {
    name: LightningDiTConfig.from_reference_kwargs({**SFD_OPTIONS, **size})
    for name, size in {
        "LightningDiT-B/1": dict(depth=12, hidden_size=768, num_heads=12),
        "LightningDiT-XL/1": dict(depth=28, hidden_size=1152, num_heads=16),
        "LightningDiT-1p0B/1": dict(depth=24, hidden_size=1536, num_heads=24),
    }.items()
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Reference order: normalise in fp32, cast back, then scale by the weight.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def make_norm(dim: int, rms: bool) -> nn.Module:
    return RMSNorm(dim) if rms else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def modulate(x: Tensor, shift: Tensor | None, scale: Tensor) -> Tensor:
    return x * (1 + scale) if shift is None else x * (1 + scale) + shift


def sincos_pos_embed_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed DiT/MAE position table [grid_size**2, dim].

    Quirk kept from the MAE code: its meshgrid puts the column index first, so the first half of the
    channels encodes the column and the second half the row; each half is [sin | cos].
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_axis(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()


class VisionRope(nn.Module):
    """2D rotary tables of EVA-02 `VisionRotaryEmbeddingFast`, as stored in the checkpoints.

    Per axis, dim = head_dim / 2 channels with frequencies 1/10000^(2i/dim), each used by an adjacent
    pair. The first half of head_dim rotates with the token's row, the second half with its column.
    """

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        axis_dim = head_dim // 2
        inv_freq = 1.0 / theta ** (torch.arange(0, axis_dim, 2)[: axis_dim // 2].float() / axis_dim)
        angles = torch.outer(torch.arange(grid_size, dtype=torch.float32), inv_freq)
        angles = angles.repeat_interleave(2, dim=-1)  # [grid, axis_dim]
        table = torch.cat(
            [angles[:, None, :].expand(-1, grid_size, -1), angles[None, :, :].expand(grid_size, -1, -1)],
            dim=-1,
        ).reshape(grid_size * grid_size, head_dim)
        self.register_buffer("freqs_cos", table.cos())
        self.register_buffer("freqs_sin", table.sin())

    def forward(self, x: Tensor) -> Tensor:
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return x * self.freqs_cos + rotated * self.freqs_sin


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rms: bool):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = make_norm(head_dim, rms) if qk_norm else nn.Identity()
        self.k_norm = make_norm(head_dim, rms) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: VisionRope | None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class GeluMlp(nn.Module):
    """timm `Mlp` with tanh-GELU, used by LightningDiT when SwiGLU is off."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    """DiT timestep embedder; SFD feeds t in [0, 1] raw (no x1000)."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, width: int, has_null_class: bool):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(has_null_class), width)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class LightningDiTBlock(nn.Module):
    def __init__(self, config: LightningDiTConfig):
        super().__init__()
        dim = config.hidden_size
        self.norm1 = make_norm(dim, config.use_rmsnorm)
        self.attn = Attention(dim, config.num_heads, config.use_qknorm, config.use_rmsnorm)
        self.norm2 = make_norm(dim, config.use_rmsnorm)
        mlp = SwiGLUFFN if config.use_swiglu else GeluMlp
        self.mlp = mlp(dim, config.mlp_hidden_dim)
        self.wo_shift = config.wo_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (4 if config.wo_shift else 6) * dim))

    def forward(self, x: Tensor, c: Tensor, rope: VisionRope | None) -> Tensor:
        chunks = self.adaLN_modulation(c).chunk(4 if self.wo_shift else 6, dim=-1)
        if self.wo_shift:
            (scale_msa, gate_msa, scale_mlp, gate_mlp), shift_msa, shift_mlp = chunks, None, None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, config: LightningDiTConfig):
        super().__init__()
        dim = config.hidden_size
        self.norm_final = make_norm(dim, config.use_rmsnorm)
        self.linear = nn.Linear(dim, config.patch_size**2 * config.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LightningDiT(nn.Module):
    """Velocity model v(x, t_tex, t_sem, y) on the composite latent [B, in_channels, H, W]."""

    def __init__(self, config: LightningDiTConfig):
        super().__init__()
        self.config = config
        dim, grid = config.hidden_size, config.input_size // config.patch_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, dim)
        if config.semantic_first:
            self.t_embedder_sem = TimestepEmbedder(dim // 2)
            self.t_embedder_tex = TimestepEmbedder(dim // 2)
        else:
            self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder(config.num_classes, dim, config.has_null_class)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid).unsqueeze(0))
        self.feat_rope = VisionRope(config.head_dim, grid) if config.use_rope else None
        self.blocks = nn.ModuleList(LightningDiTBlock(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(config)

    def condition(self, t_tex: Tensor, t_sem: Tensor, y: Tensor) -> Tensor:
        if self.config.semantic_first:
            # The pair arrives as (tex, sem) but the embedding is concatenated sem-first, as in the reference.
            t_emb = torch.cat([self.t_embedder_sem(t_sem), self.t_embedder_tex(t_tex)], dim=1)
        else:
            t_emb = self.t_embedder(t_tex)
        return t_emb + self.y_embedder(y)

    def forward(self, x: Tensor, t_tex: Tensor, t_sem: Tensor, y: Tensor) -> Tensor:
        b, _, h, w = x.shape
        p = self.config.patch_size
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.condition(t_tex, t_sem, y).unsqueeze(1)
        for block in self.blocks:
            tokens = block(tokens, c, self.feat_rope)
        out = self.final_layer(tokens, c)
        out = out.reshape(b, h // p, w // p, p, p, self.config.out_channels)
        out = torch.einsum("nhwpqc->nchpwq", out).reshape(b, self.config.out_channels, h, w)
        return out[:, : self.config.in_channels] if self.config.learn_sigma else out
