"""Load StableAvatar transformers from the published files, unchanged.

Published layout (Hub repo FrancisRing/StableAvatar):
    Wan2.1-Fun-V1.1-1.3B-InP/config.json                      original Wan config (dim, num_heads, text_len, ...)
    Wan2.1-Fun-V1.1-1.3B-InP/diffusion_pytorch_model.safetensors   base DiT (only read if the .pt lacks keys)
    StableAvatar-1.3B/transformer3d-square.pt | transformer3d-rec-vec.pt   full transformer state dict, original names

Keys are converted to the diffusers layout in memory: the audio keys are split off first (diffusers' substring
renames would mangle them), the rest goes through diffusers' own Wan converter (norm2/norm3 swap etc.). The model is
built on the meta device and the tensors assigned, so nothing is initialised twice. Loading is strict.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from avatarcli.errors import AvatarError, CheckpointError, EnvironmentProblem
from avatarcli.loading.files import check_state_dict, read_state_dict
from avatarcli.models.stableavatar import StableAvatarTransformer3DModel

BASE_FOLDER = "Wan2.1-Fun-V1.1-1.3B-InP"
AVATAR_FOLDER = "StableAvatar-1.3B"
CHECKPOINTS = {"square": "transformer3d-square.pt", "rec-vec": "transformer3d-rec-vec.pt"}

# Modules diffusers keeps in float32 under a low-precision dtype (WanTransformer3DModel._keep_in_fp32_modules).
_FP32_PATTERNS = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3", "norm_out")


def is_audio_key(key: str) -> bool:
    return key.startswith("vocal_projector.") or ".k_vocal." in key or ".v_vocal." in key


def wan_key_names(keys: Iterable[str], passthrough: Callable[[str], bool] = lambda key: False) -> dict[str, str]:
    """Original Wan name -> diffusers name, for every key; the one converter of the Wan-based loaders.

    Keys of layers diffusers' Wan model lacks (`passthrough`, e.g. StableAvatar's audio keys or FlashPortrait's
    expression projections) are split off first, because diffusers' substring renames would mangle some of them; they
    keep their name with the block's `cross_attn` renamed to `attn2`. Everything else goes through diffusers' own
    converter (norm2/norm3 swap etc.), applied to the names only so the caller can say which file key failed.
    """
    keys = list(keys)
    stripped = {key: key.removeprefix("model.diffusion_model.") for key in keys}
    plain = {s: key for key, s in stripped.items() if not passthrough(s)}
    names = {original: new for new, original in convert_wan_transformer_to_diffusers(dict(plain)).items()}
    for key, s in stripped.items():
        if passthrough(s):
            names[key] = s.replace(".cross_attn.", ".attn2.") if s.startswith("blocks.") else s
    return names


def convert_original_keys(original: Mapping[str, torch.Tensor],
                          passthrough: Callable[[str], bool] = is_audio_key) -> dict[str, torch.Tensor]:
    """Original Wan/StableAvatar names -> model names (StableAvatar's audio keys passed through by default)."""
    names = wan_key_names(original, passthrough)
    return {names[key]: value for key, value in original.items()}


def assign_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, dtype: torch.dtype,
                   device: str | torch.device) -> torch.nn.Module:
    """Assign a checked, converted state dict to a model built on meta; diffusers' fp32 modules stay float32.

    A state dict of meta tensors (key/shape checks without weights) leaves the model on meta."""
    on_meta = all(t.device.type == "meta" for t in state.values())
    if not on_meta:
        state = {k: v.to(device=device, dtype=torch.float32 if any(p in k for p in _FP32_PATTERNS) else dtype)
                 for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if on_meta:
        return model
    # The RoPE tables are non-persistent buffers: they were created on meta and are not in any checkpoint.
    config = model.config
    model.rope = WanRotaryPosEmbed(config.attention_head_dim, config.patch_size, config.rope_max_seq_len)
    return model.to(device).eval()


def diffusers_key(original_key: str) -> str:
    """One original Wan key -> its name in our diffusers-layout models, by the same converter as checkpoints
    (e.g. blocks.0.norm3.bias -> blocks.0.norm2.bias, blocks.0.modulation -> blocks.0.scale_shift_table)."""
    (converted,) = convert_wan_transformer_to_diffusers({original_key: torch.empty(0)})
    return converted


def config_from_state_dict(original: Mapping[str, torch.Tensor], wan_config: Mapping) -> dict:
    """Model config: sizes from tensor shapes (works for any checkpoint), head count and text length from config.json."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in original:
            raise CheckpointError(f"checkpoint lacks {key!r}; is this a Wan2.1 i2v / StableAvatar transformer?")
        return tuple(original[key].shape)

    dim, in_channels, *patch = shape("patch_embedding.weight")
    num_heads = int(wan_config.get("num_heads", 12))
    layers = {int(k.split(".")[1]) for k in original if k.startswith("blocks.")}
    adapter_layers = {int(k.split(".")[2]) for k in original if k.startswith("vocal_projector.blocks.")}
    return dict(
        patch_size=tuple(patch),
        num_attention_heads=num_heads,
        attention_head_dim=dim // num_heads,
        in_channels=in_channels,
        out_channels=shape("head.head.weight")[0] // (patch[0] * patch[1] * patch[2]),
        text_dim=shape("text_embedding.0.weight")[1],
        freq_dim=shape("time_embedding.0.weight")[1],
        ffn_dim=shape("blocks.0.ffn.0.weight")[0],
        num_layers=len(layers),
        eps=float(wan_config.get("eps", 1e-6)),
        image_dim=shape("img_emb.proj.0.weight")[0],
        text_len=int(wan_config.get("text_len", 512)),
        audio_in_dim=shape("vocal_projector.proj_model.proj.weight")[1],
        audio_adapter_layers=len(adapter_layers),
    )


def build_transformer(original: Mapping[str, torch.Tensor], wan_config: Mapping, *, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu", source: str = "state dict") -> StableAvatarTransformer3DModel:
    """Build the model on meta and assign the (converted) original-layout tensors, strictly."""
    config = config_from_state_dict(original, wan_config)
    with torch.device("meta"):
        model = StableAvatarTransformer3DModel(**config)
    state = convert_original_keys(original)
    check_state_dict(model, state, source)
    return assign_weights(model, state, dtype=dtype, device=device)


def read_wan_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise EnvironmentProblem(f"missing {path}: the weights folder is incomplete (run `avatarcli download`)")
    return json.loads(path.read_text())


def load_stableavatar_transformer(weights_dir: Path, checkpoint: str = "square", *, dtype: torch.dtype = torch.bfloat16,
                                  device: str | torch.device = "cpu") -> StableAvatarTransformer3DModel:
    """Load from a folder in the published layout. The base safetensors is read only for keys the .pt lacks."""
    if checkpoint not in CHECKPOINTS:
        raise AvatarError(f"unknown checkpoint {checkpoint!r}; choose one of {', '.join(CHECKPOINTS)}")
    weights_dir = Path(weights_dir)
    pt_path = weights_dir / AVATAR_FOLDER / CHECKPOINTS[checkpoint]
    original = read_state_dict(pt_path, entry="state_dict")
    base_path = weights_dir / BASE_FOLDER / "diffusion_pytorch_model.safetensors"
    if "patch_embedding.weight" not in original and base_path.is_file():
        # An adapter-only .pt: fill the backbone from the base model.
        original = {**read_state_dict(base_path), **original}
    return build_transformer(original, read_wan_config(weights_dir / BASE_FOLDER), dtype=dtype, device=device,
                             source=str(pt_path))
