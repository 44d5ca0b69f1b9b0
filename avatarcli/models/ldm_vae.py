"""Decoder half of the LDM KL autoencoder ("SD-VAE f16d32") that SFD decodes its texture latent with.

Ported as our own module rather than mapped onto diffusers' AutoencoderKL: the f16d32 variant has
attention at the lowest decoder level as well as in the mid block, which diffusers' LDM converter does
not map. Names follow the LDM checkpoint (`post_quant_conv.*`, `decoder.*`) so it loads as published.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LDMDecoderConfig:
    """Channels per level, listed from the full-resolution level 0 to the lowest-resolution level."""

    block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512)
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = (4,)
    z_channels: int = 32
    embed_dim: int = 32
    out_channels: int = 3

    @property
    def upsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_ddconfig(cls, ddconfig: dict[str, Any], embed_dim: int) -> "LDMDecoderConfig":
        """Map an LDM `ddconfig` (ch, ch_mult, attn_resolutions at the given image resolution)."""
        ch_mult = tuple(int(m) for m in ddconfig["ch_mult"])
        resolution = int(ddconfig["resolution"])
        attn = {int(r) for r in ddconfig.get("attn_resolutions", ())}
        return cls(
            block_out_channels=tuple(int(ddconfig["ch"]) * m for m in ch_mult),
            num_res_blocks=int(ddconfig["num_res_blocks"]),
            # Level i of the decoder works at resolution // 2**i.
            attn_levels=tuple(i for i in range(len(ch_mult)) if resolution // 2**i in attn),
            z_channels=int(ddconfig["z_channels"]),
            embed_dim=int(embed_dim),
            out_channels=int(ddconfig.get("out_ch", 3)),
        )


# tokenizer/configs/sdvae_f16d32.yaml: ch 128, ch_mult (1,1,2,2,4), 2 res blocks, attention at 16 of 256.
SDVAE_F16D32 = LDMDecoderConfig()


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)

        def tokens(conv: nn.Conv2d) -> Tensor:
            return conv(normed).reshape(b, 1, c, h * w).transpose(-1, -2)

        out = F.scaled_dot_product_attention(tokens(self.q), tokens(self.k), tokens(self.v))
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class UpLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[i], out_channels) for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if attention else 0))
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x if self.upsample is None else self.upsample(x)


class Decoder(nn.Module):
    def __init__(self, config: LDMDecoderConfig):
        super().__init__()
        widths = config.block_out_channels
        top = len(widths) - 1
        self.conv_in = nn.Conv2d(config.z_channels, widths[top], 3, padding=1)
        self.mid = MidBlock(widths[top])
        # Indexed by level (0 = full resolution) as in the checkpoint; run from the lowest level up.
        self.up = nn.ModuleList(
            UpLevel(
                widths[min(level + 1, top)], widths[level], config.num_res_blocks + 1,
                attention=level in config.attn_levels, upsample=level != 0,
            )
            for level in range(len(widths))
        )
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class TextureVAEDecoder(nn.Module):
    """De-normalised texture latent [B, embed_dim, h, w] -> image [B, 3, 16h, 16w] in about [-1, 1]."""

    def __init__(self, config: LDMDecoderConfig = SDVAE_F16D32):
        super().__init__()
        self.config = config
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    def forward(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))


def to_uint8_nhwc(images: Tensor) -> Tensor:
    # tokenizer/vavae.py::decode_to_images: +128.0 (not +127.5), and the uint8 cast truncates.
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)
