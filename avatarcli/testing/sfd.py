"""Tiny random SFD weights in the published file layout, file names and key names.

Shapes are shrunk (2x2 latent, 32x32 images, widths 16-48) so the whole pipeline runs in a second on a CPU.
The files carry what the published ones carry beyond the sampling weights (the REPA projector in the
denoisers, the encoder side and a loss entry in the VAE checkpoint), so the loaders' explicit drops run too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from avatarcli.loading.sfd import SFD_MODELS, TEXTURE_STATS_FILE, VAE_FILE
from avatarcli.models.ldm_vae import LDMDecoderConfig, TextureVAEDecoder
from avatarcli.models.sfd import LightningDiT, LightningDiTConfig, RMSNorm

TINY_LATENT_SIZE = 2
TINY_TEXTURE_CHANS = 32
TINY_SEMANTIC_CHANS = 16


def tiny_lightningdit_config(hidden_size: int, num_heads: int, depth: int = 2) -> LightningDiTConfig:
    return LightningDiTConfig(
        input_size=TINY_LATENT_SIZE, in_channels=TINY_TEXTURE_CHANS + TINY_SEMANTIC_CHANS,
        hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_hidden_dim=int(2 / 3 * 4 * hidden_size),
        semantic_chans=TINY_SEMANTIC_CHANS, semfirst_delta_t=0.3,
    )


TINY_MAIN = {"xl": tiny_lightningdit_config(32, 2), "xxl": tiny_lightningdit_config(48, 3)}
TINY_GUIDANCE = tiny_lightningdit_config(16, 1)
TINY_DECODER = LDMDecoderConfig(block_out_channels=(32,) * 5, num_res_blocks=1, attn_levels=(4,),
                                z_channels=TINY_TEXTURE_CHANS, embed_dim=TINY_TEXTURE_CHANS)


def _randomize(module: nn.Module, generator: torch.Generator) -> None:
    # The reference zero-initialises adaLN and the output layer, which would make a random model ignore its
    # inputs; every layer gets fresh values instead (the fixed position tables are left as computed).
    def normal(shape: torch.Size, std: float) -> Tensor:
        return torch.randn(shape, generator=generator) * std

    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (RMSNorm, nn.GroupNorm)):
                layer.weight.copy_(1 + normal(layer.weight.shape, 0.1))
            elif isinstance(layer, (nn.Linear, nn.Conv2d, nn.Embedding)):
                fan_in = layer.weight[0].numel()
                layer.weight.copy_(normal(layer.weight.shape, fan_in**-0.5))
            else:
                continue
            if getattr(layer, "bias", None) is not None:
                layer.bias.copy_(normal(layer.bias.shape, 0.1))


def _repa_projector(hidden_size: int, generator: torch.Generator, projector_dim: int = 16) -> dict[str, Tensor]:
    shapes = {"0": (projector_dim, hidden_size), "2": (projector_dim, projector_dim), "4": (768, projector_dim)}
    state = {}
    for index, (rows, cols) in shapes.items():
        state[f"repa_projector.{index}.weight"] = torch.randn(rows, cols, generator=generator) * 0.1
        state[f"repa_projector.{index}.bias"] = torch.zeros(rows)
    return state


def _denoiser_checkpoint(config: LightningDiTConfig, generator: torch.Generator) -> dict[str, dict[str, Tensor]]:
    model = LightningDiT(config)
    _randomize(model, generator)
    return {"ema": {**model.state_dict(), **_repa_projector(config.hidden_size, generator)}}


def _vae_checkpoint(generator: torch.Generator) -> dict[str, dict[str, Tensor]]:
    decoder = TextureVAEDecoder(TINY_DECODER)
    _randomize(decoder, generator)
    encoder_side = {
        "encoder.conv_in.weight": torch.randn(32, 3, 3, 3, generator=generator),
        "encoder.conv_in.bias": torch.zeros(32),
        "quant_conv.weight": torch.randn(2 * TINY_TEXTURE_CHANS, 2 * TINY_TEXTURE_CHANS, 1, 1, generator=generator),
        "quant_conv.bias": torch.zeros(2 * TINY_TEXTURE_CHANS),
        "loss.logvar": torch.zeros(()),
    }
    return {"state_dict": {**decoder.state_dict(), **encoder_side}}


def write_tiny_sfd(folder: Path, seed: int = 0) -> Path:
    """Write tiny `sfd-xl`, `sfd-xxl` and `sfd-vae` files under `folder`; returns `folder`."""
    folder = Path(folder)
    generator = torch.Generator().manual_seed(seed)

    def save(relative: str, obj: object) -> None:
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, path)

    for name, files in SFD_MODELS.items():
        save(files.checkpoint, _denoiser_checkpoint(TINY_MAIN[name], generator))
        save(files.guidance_checkpoint, _denoiser_checkpoint(TINY_GUIDANCE, generator))
    stats_shape = (1, TINY_TEXTURE_CHANS, 1, 1)
    save(TEXTURE_STATS_FILE, {"mean": 0.1 * torch.randn(stats_shape, generator=generator),
                              "std": 0.5 + torch.rand(stats_shape, generator=generator)})
    save(VAE_FILE, _vae_checkpoint(generator))
    return folder
