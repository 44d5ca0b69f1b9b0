"""Load the published SFD files: LightningDiT denoisers, the texture-VAE decoder and the latent statistics.

Published layout (Hub repo SFD-Project/SFD, paths as in its README download commands):
    model_weights/sfd_xl/checkpoints/4000000.pt                  SFD-XL (LightningDiT-XL/1), 800 epochs
    model_weights/sfd_1p0/checkpoints/4000000.pt                 SFD-XXL (LightningDiT-1p0B/1), 800 epochs
    model_weights/sfd_autoguidance_b/checkpoints/00N0000.pt      AutoGuidance model (LightningDiT-B/1)
    imagenet1k-latents/<latent set>/imagenet_train_256/latents_stats.pt   texture-latent mean / std
and, from hustvl/va-vae-imagenet256-experimental-variants, ldm-imagenet256-f16d32-50ep.ckpt (the texture VAE).

Pickles are read with weights_only=True (through loading/files.py, which reads the OmegaConf training config saved
beside `ema` as an inert placeholder). A training checkpoint's `ema` entry is used when present. Keys the
sampler has no use for are dropped by name (the REPA projector; the VAE's encoder side and training losses);
everything else must match exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from avatarcli.errors import AvatarError, CheckpointError, EnvironmentProblem
from avatarcli.loading.files import check_state_dict, listing, read_checkpoint
from avatarcli.models.ldm_vae import LDMDecoderConfig, TextureVAEDecoder
from avatarcli.models.sfd import LightningDiT, LightningDiTConfig

from avatarcli.loading.sfd_files import (  # noqa: F401  (re-exported; the file tables live torch-free)
    LATENT_SET,
    SFD_DOWNLOADS,
    SFD_MODELS,
    SFD_REPO,
    TEXTURE_STATS_FILE,
    VAE_FILE,
    VAE_REPO,
    SfdModelFiles,
)

# Trained alongside but unused when sampling: REPA aligns block-2 features with DINOv2 during training only.
DIT_TRAINING_ONLY = ("repa_projector.",)
# The LDM autoencoder checkpoint also holds the encoder side and the training losses (LPIPS, discriminator).
VAE_UNUSED = ("encoder.", "quant_conv.", "loss.", "model_ema.")
VAE_USED = ("decoder.", "post_quant_conv.")


@dataclass(frozen=True)
class SfdFiles:
    checkpoint: Path
    guidance_checkpoint: Path
    vae: Path
    texture_stats: Path


def sfd_files(weights_dir: Path, model: str, vae_dir: Path | None = None) -> SfdFiles:
    """Paths of one model's files, checked to exist (the VAE may sit in a separate folder)."""
    if model not in SFD_MODELS:
        raise AvatarError(f"unknown SFD model {model!r}; choose one of {', '.join(SFD_MODELS)}")
    spec = SFD_MODELS[model]
    weights_dir = Path(weights_dir)
    if weights_dir.is_file():
        raise AvatarError(f"--weights {weights_dir} is a file; it takes the folder that holds the SFD files")
    files = SfdFiles(
        checkpoint=weights_dir / spec.checkpoint,
        guidance_checkpoint=weights_dir / spec.guidance_checkpoint,
        vae=Path(vae_dir or weights_dir) / VAE_FILE,
        texture_stats=weights_dir / TEXTURE_STATS_FILE,
    )
    for name, path in vars(files).items():
        if not path.is_file():
            import shlex

            download = "sfd-vae" if name == "vae" else f"sfd-{model}"
            folder = shlex.quote(str(Path(vae_dir or weights_dir) if name == "vae" else weights_dir))
            raise EnvironmentProblem(f"missing SFD file {path}; run `avatarcli download {download} --dir {folder}` "
                                     "(the layout sfd reads) or pass the folder that holds it")
    return files


# ----------------------------------------------------------------------------------------------- reading


def _tensors(state: Mapping[str, object], path: Path, entry: str | None) -> dict[str, Tensor]:
    if entry is not None and entry in state:
        state = state[entry]  # type: ignore[assignment]
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}  # type: ignore[union-attr]
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors; re-download it")
    return tensors


def load_strict(module: nn.Module, state: Mapping[str, Tensor], source: Path | str, *, assign: bool = False) -> None:
    """Load with 0 missing, 0 unexpected and equal shapes; a CheckpointError names the file and the keys."""
    check_state_dict(module, state, source)
    module.load_state_dict(state, strict=True, assign=assign)


def _drop(state: Mapping[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


# ----------------------------------------------------------------------------------------------- denoiser


def lightningdit_state_dict(path: Path) -> dict[str, Tensor]:
    """The sampling weights of a checkpoint: its `ema` entry when present, without the REPA projector."""
    return _drop(_tensors(read_checkpoint(path), path, "ema"), DIT_TRAINING_ONLY)


def infer_lightningdit_config(state: Mapping[str, Tensor], *, semantic_chans: int = 16,
                              semfirst_delta_t: float = 0.3, source: Path | str = "state dict") -> LightningDiTConfig:
    """Sizes from the tensor shapes; the stream split and delta_t are not in the weights, so they are passed."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"{source} is not a LightningDiT checkpoint: no {key}")
        return tuple(state[key].shape)

    hidden, in_channels, patch, _ = shape("x_embedder.proj.weight")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if "blocks.0.attn.q_norm.weight" in state:
        head_dim = shape("blocks.0.attn.q_norm.weight")[0]
    elif "feat_rope.freqs_cos" in state:
        head_dim = shape("feat_rope.freqs_cos")[1]
    else:
        raise CheckpointError(f"{source}: cannot tell the head count (no QK-norm or RoPE tables)")
    swiglu = "blocks.0.mlp.w12.weight" in state
    mlp_hidden = shape("blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc1.weight")[1 if swiglu else 0]
    tokens = shape("pos_embed")[1]
    semantic_first = "t_embedder_sem.mlp.0.weight" in state
    return LightningDiTConfig(
        input_size=math.isqrt(tokens) * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=hidden // head_dim,
        mlp_hidden_dim=mlp_hidden,
        # SFD models keep the CFG null row (class_dropout_prob 0.1): rows = classes + 1.
        num_classes=shape("y_embedder.embedding_table.weight")[0] - 1,
        has_null_class=True,
        learn_sigma=shape("final_layer.linear.bias")[0] == 2 * in_channels * patch * patch,
        use_qknorm="blocks.0.attn.q_norm.weight" in state,
        use_swiglu=swiglu,
        use_rope="feat_rope.freqs_cos" in state,
        use_rmsnorm="blocks.0.norm1.weight" in state,
        wo_shift=shape("blocks.0.adaLN_modulation.1.weight")[0] == 4 * hidden,
        semantic_chans=semantic_chans if semantic_first else 0,
        semfirst_delta_t=semfirst_delta_t if semantic_first else 0.0,
    )


def load_lightningdit(path: Path, config: LightningDiTConfig | None = None, *, semantic_chans: int = 16,
                      semfirst_delta_t: float = 0.3) -> LightningDiT:
    """A LightningDiT in eval mode from a published checkpoint (.pt/.pth pickle or .safetensors)."""
    state = lightningdit_state_dict(path)
    if config is None:
        config = infer_lightningdit_config(state, semantic_chans=semantic_chans,
                                           semfirst_delta_t=semfirst_delta_t, source=path)
    # Built on meta and given the checkpoint's tensors, so a 1B model is never initialised twice in memory.
    with torch.device("meta"):
        model = LightningDiT(config)
    load_strict(model, state, path, assign=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------- texture VAE


def texture_vae_state_dict(path: Path) -> dict[str, Tensor]:
    """`post_quant_conv.*` and `decoder.*` of an LDM autoencoder checkpoint (its `state_dict` entry)."""
    state = _drop(_tensors(read_checkpoint(path), path, "state_dict"), VAE_UNUSED)
    foreign = sorted(k for k in state if not k.startswith(VAE_USED))
    if foreign:
        raise CheckpointError(f"{path} has keys outside the LDM autoencoder: {listing(foreign)}")
    return state


def infer_decoder_config(state: Mapping[str, Tensor], source: Path | str = "state dict") -> LDMDecoderConfig:
    if "post_quant_conv.weight" not in state or "decoder.conv_in.weight" not in state:
        raise CheckpointError(f"{source} is not an LDM autoencoder decoder: no post_quant_conv / decoder.conv_in")
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up."))
    blocks = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("decoder.up.0.block."))
    z_channels, embed_dim = state["post_quant_conv.weight"].shape[:2]
    return LDMDecoderConfig(
        block_out_channels=tuple(int(state[f"decoder.up.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)),
        num_res_blocks=blocks - 1,
        attn_levels=tuple(i for i in range(levels) if f"decoder.up.{i}.attn.0.q.weight" in state),
        z_channels=int(z_channels),
        embed_dim=int(embed_dim),
        out_channels=int(state["decoder.conv_out.weight"].shape[0]),
    )


def load_texture_vae(path: Path, config: LDMDecoderConfig | None = None) -> TextureVAEDecoder:
    state = texture_vae_state_dict(path)
    config = config or infer_decoder_config(state, path)
    decoder = TextureVAEDecoder(config)
    load_strict(decoder, state, path)
    return decoder.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------- latent statistics


@dataclass
class LatentStats:
    """Per-channel mean / std [1, C, 1, 1] the texture latent was normalised with before diffusion."""

    mean: Tensor
    std: Tensor
    latent_multiplier: float = 1.0

    def denormalize(self, latent: Tensor) -> Tensor:
        # inference.py: samples * std / latent_multiplier + mean.
        mean, std = self.mean.to(latent), self.std.to(latent)
        return latent * std / self.latent_multiplier + mean


def load_latent_stats(path: Path, latent_multiplier: float = 1.0) -> LatentStats:
    state = _tensors(read_checkpoint(path), path, None)
    if "mean" not in state or "std" not in state:
        raise CheckpointError(f"{path} must hold 'mean' and 'std' tensors; re-download it")
    mean, std = state["mean"].float(), state["std"].float()
    if mean.numel() != std.numel():
        raise CheckpointError(f"{path}: mean has {mean.numel()} channels but std has {std.numel()}")
    return LatentStats(mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1), latent_multiplier)
