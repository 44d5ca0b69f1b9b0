"""Load the frozen StableAvatar components (VAE, umT5, CLIP ViT-H/14, wav2vec2) from the published files.

The Wan base folder ships original Wan pickles, not diffusers/transformers folders:

    Wan2.1_VAE.pth                                          -> diffusers.AutoencoderKLWan
    models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl/      -> transformers.UMT5EncoderModel + tokenizer
    models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth -> transformers.CLIPVisionModel (visual tower only)
    wav2vec2-base-960h/ (already transformers layout)       -> transformers.Wav2Vec2Model + feature extractor

Sizes are read from tensor shapes, so tiny test checkpoints load through the same code. Models are built with empty
(meta) weights and the checkpoint tensors assigned, so nothing is initialised twice and the pickles stay memory-mapped.
Loading is strict: every missing, unexpected or mis-shaped key is a CheckpointError naming the file and the keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from math import isqrt
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerBase,
    UMT5Config,
    UMT5EncoderModel,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
)
from transformers.utils import logging as transformers_logging

from avatarcli.errors import CheckpointError, EnvironmentProblem
from avatarcli.loading.files import read_state_dict

# Wan 2.1 VAE (wan/modules/vae.py _video_vae): only base_dim and z_dim are read from the file; the block layout is
# fixed, and any other layout fails the strict key check.
WAN21_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True])

# umT5-XXL encoder (wan/modules/t5.py umt5_xxl): gated tanh-GELU FFN, unscaled attention, a relative-position table
# in every block (shared_pos=False), RMS norms with eps 1e-6, buckets over a max distance of 128.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)

# Visual tower of open-clip xlm-roberta-large-vit-huge-14 (wan/modules/clip.py clip_xlm_roberta_vit_h_14):
# activation 'gelu' (exact erf GELU, not quick_gelu), pre_norm=True (bias-free patch conv + LayerNorm before the
# blocks, = HF pre_layrnorm), pre-LN blocks, LayerNorm eps 1e-5. HF hidden_states[-2] = output of block 31 of 32,
# which is Wan's visual(use_31_block=True).
VIT_H_14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                patch_size=14, image_size=224, hidden_act="gelu", layer_norm_eps=1e-5)

# Head count is not stored in a ViT checkpoint. The open-clip ViT widths use these; any other width (tiny test
# checkpoints) gets heads of 16 channels.
_VIT_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}
_VIT_FALLBACK_HEAD_DIM = 16

# Parts of the CLIP pickle that CLIPVisionModel has no place for: the XLM-R text tower, the contrastive logit scale
# and the image projection head (features are taken before it).
_CLIP_DROPPED_PREFIXES = ("textual.",)
_CLIP_DROPPED_KEYS = ("log_scale", "visual.head")

# The published wav2vec2-base-960h is a Wav2Vec2ForCTC checkpoint; its CTC head is not used.
_WAV2VEC_DROPPED_PREFIXES = ("lm_head.",)


def read_original_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A pickled original state dict, memory-mapped, through weights_only=True."""
    return read_state_dict(path)


def load_vae(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
) -> AutoencoderKLWan:
    """Wan2.1_VAE.pth as a diffusers AutoencoderKLWan (latents_mean/std in its config are the Wan 2.1 values).
    On the CPU its convolutions run through oneDNN (avatarcli.models.cpu_convs)."""
    from avatarcli.models.cpu_convs import use_onednn_convolutions

    vae = vae_from_state_dict(read_original_checkpoint(path), source=str(path), dtype=dtype)
    if torch.device(device).type == "cpu":
        use_onednn_convolutions(vae)
    return vae.to(device).eval().requires_grad_(False)


def load_text_encoder(
    pth_path: str | Path, tokenizer_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> tuple[UMT5EncoderModel, PreTrainedTokenizerBase]:
    """models_t5_umt5-xxl-enc-bf16.pth as a UMT5EncoderModel, and the google/umt5-xxl tokenizer (offline)."""
    encoder = text_encoder_from_state_dict(read_original_checkpoint(pth_path), source=str(pth_path), dtype=dtype)
    encoder = encoder.to(device).eval().requires_grad_(False)
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise EnvironmentProblem(f"tokenizer folder not found: {tokenizer_dir}; download google/umt5-xxl/ beside the T5 file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as error:
        raise EnvironmentProblem(f"cannot read the tokenizer in {tokenizer_dir} ({_one_line(error)}); download it "
                          "again") from error
    return encoder, tokenizer


def load_image_encoder(
    pth_path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
) -> CLIPVisionModel:
    """The visual tower of the open-clip XLM-R ViT-H/14 pickle as a CLIPVisionModel (use hidden_states[-2])."""
    encoder = image_encoder_from_state_dict(read_original_checkpoint(pth_path), source=str(pth_path), dtype=dtype)
    return encoder.to(device).eval().requires_grad_(False)


def load_audio_encoder(
    folder: str | Path, device: str | torch.device = "cpu",
) -> tuple[Wav2Vec2Model, Wav2Vec2FeatureExtractor]:
    """wav2vec2-base-960h in float32 (as the reference runs it) and its feature extractor."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "preprocessor_config.json").is_file():
        raise EnvironmentProblem(f"{folder} is not a wav2vec2 folder (config.json, preprocessor_config.json); download "
                          "wav2vec2-base-960h into it")
    try:
        with _quiet_transformers():
            model, info = Wav2Vec2Model.from_pretrained(
                str(folder), dtype=torch.float32, local_files_only=True, output_loading_info=True)
            feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot load wav2vec2 from {folder} ({_one_line(error)}); download it again") from error
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(_WAV2VEC_DROPPED_PREFIXES)]
    mismatched = [str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", [])]
    _raise_on_key_problems(str(folder), "Wav2Vec2Model", sorted(info["missing_keys"]), unexpected, mismatched)
    return model.to(device).eval().requires_grad_(False), feature_extractor


def vae_from_state_dict(
    original: Mapping[str, torch.Tensor], source: str = "VAE state dict", dtype: torch.dtype | None = None,
) -> AutoencoderKLWan:
    shape = _shape_reader(original, source, "a Wan 2.1 VAE")
    base_dim, z_dim = shape("encoder.conv1.weight")[0], shape("conv2.weight")[0]
    if z_dim != WAN21_VAE["z_dim"]:
        raise CheckpointError(f"{source} has {z_dim} latent channels; only the Wan 2.1 VAE (16) is supported")
    config = dict(WAN21_VAE, base_dim=base_dim, z_dim=z_dim)
    with init_empty_weights(include_buffers=False):
        vae = AutoencoderKLWan(**config)
    # diffusers' converter renames key by key, so converting one key at a time keeps each new name's origin.
    converted, origin = _rename(original, lambda key, value: convert_wan_vae_to_diffusers({key: value}))
    _assign_strict(vae, converted, origin, source, dtype)
    return vae


def text_encoder_from_state_dict(
    original: Mapping[str, torch.Tensor], source: str = "T5 state dict", dtype: torch.dtype | None = None,
) -> UMT5EncoderModel:
    shape = _shape_reader(original, source, "a umT5 encoder")
    vocab_size, d_model = shape("token_embedding.weight")
    num_buckets, num_heads = shape("blocks.0.pos_embedding.embedding.weight")
    config = UMT5Config(**dict(
        UMT5_XXL, vocab_size=vocab_size, d_model=d_model, num_heads=num_heads,
        d_kv=shape("blocks.0.attn.q.weight")[0] // num_heads, d_ff=shape("blocks.0.ffn.fc1.weight")[0],
        num_layers=_count_blocks(original, "blocks."), relative_attention_num_buckets=num_buckets,
    ))
    with init_empty_weights(include_buffers=False):
        encoder = UMT5EncoderModel(config)
    converted, origin = _rename(original, _umt5_names)
    _assign_strict(encoder, converted, origin, source, dtype)
    # Assigning replaced the two tied embedding parameters by two parameters over one tensor; tie them again.
    encoder.set_input_embeddings(encoder.shared)
    return encoder


def image_encoder_from_state_dict(
    original: Mapping[str, torch.Tensor], source: str = "CLIP state dict", dtype: torch.dtype | None = None,
) -> CLIPVisionModel:
    visual = {k: v for k, v in original.items()
              if not (k.startswith(_CLIP_DROPPED_PREFIXES) or k in _CLIP_DROPPED_KEYS)}
    shape = _shape_reader(visual, source, "an open-clip ViT")
    width, _, patch_size, _ = shape("visual.patch_embedding.weight")
    tokens = shape("visual.pos_embedding")[1]
    grid = isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise CheckpointError(f"{source}: visual.pos_embedding has {tokens} tokens, not 1 + a square grid")
    heads = _VIT_HEADS_BY_WIDTH.get(width, max(1, width // _VIT_FALLBACK_HEAD_DIM))
    config = CLIPVisionConfig(**dict(
        VIT_H_14, hidden_size=width, intermediate_size=shape("visual.transformer.0.mlp.0.weight")[0],
        num_hidden_layers=_count_blocks(visual, "visual.transformer."), num_attention_heads=heads,
        patch_size=patch_size, image_size=grid * patch_size,
    ))
    with init_empty_weights(include_buffers=False):
        encoder = CLIPVisionModel(config)
    # transformers 4 nests the tower under vision_model; transformers 5 does not.
    prefix = "vision_model." if hasattr(encoder, "vision_model") else ""
    converted, origin = _rename(visual, lambda key, value: _clip_visual_names(key, value, prefix))
    _assign_strict(encoder, converted, origin, source, dtype)
    return encoder


_UMT5_BLOCK_NAMES = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    # Wan computes fc1(x) * gelu(gate(x)); HF computes gelu(wi_0(x)) * wi_1(x).
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def _umt5_names(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    if key == "token_embedding.weight":  # tied input embedding: both names share one tensor
        return {"shared.weight": value, "encoder.embed_tokens.weight": value}
    if key == "norm.weight":
        return {"encoder.final_layer_norm.weight": value}
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if match and match.group(2) in _UMT5_BLOCK_NAMES:
        return {f"encoder.block.{match.group(1)}.{_UMT5_BLOCK_NAMES[match.group(2)]}": value}
    return {key: value}


_CLIP_BLOCK_NAMES = {
    "norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
    "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2",
}


def _clip_visual_names(key: str, value: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    if key == "visual.patch_embedding.weight":
        return {f"{prefix}embeddings.patch_embedding.weight": value}
    if key == "visual.cls_embedding":
        return {f"{prefix}embeddings.class_embedding": value.reshape(-1)}
    if key == "visual.pos_embedding":
        return {f"{prefix}embeddings.position_embedding.weight": value.reshape(value.shape[-2], value.shape[-1])}
    match = re.fullmatch(r"visual\.(pre_norm|post_norm)\.(weight|bias)", key)
    if match:
        name = "pre_layrnorm" if match.group(1) == "pre_norm" else "post_layernorm"  # sic, HF spelling
        return {f"{prefix}{name}.{match.group(2)}": value}
    match = re.fullmatch(r"visual\.transformer\.(\d+)\.(.+)\.(weight|bias)", key)
    if match:
        layer, module, kind = match.groups()
        base = f"{prefix}encoder.layers.{layer}"
        if module == "attn.to_qkv":  # one fused projection, rows ordered q, k, v
            q, k, v = value.chunk(3, dim=0)
            return {f"{base}.self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v))}
        if module in _CLIP_BLOCK_NAMES:
            return {f"{base}.{_CLIP_BLOCK_NAMES[module]}.{kind}": value}
    return {key: value}


def _rename(
    original: Mapping[str, torch.Tensor],
    rename: Callable[[str, torch.Tensor], Mapping[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    converted, origin = {}, {}
    for key, value in original.items():
        for new_key, new_value in rename(key, value).items():
            converted[new_key], origin[new_key] = new_value, key
    return converted, origin


def _assign_strict(
    model: torch.nn.Module, converted: Mapping[str, torch.Tensor], origin: Mapping[str, str], source: str,
    dtype: torch.dtype | None,
) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted({origin[k] for k in converted if k not in expected})
    mismatched = [f"{origin[k]} {tuple(converted[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in expected if k in converted and converted[k].shape != expected[k].shape]
    _raise_on_key_problems(source, type(model).__name__, missing, unexpected, mismatched)
    model.load_state_dict(_cast(converted, dtype), strict=True, assign=True)


def _cast(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast before assigning (no copy when the file already has the dtype); a tensor stored under two names (tied
    embeddings) is cast once."""
    cast: dict[int, torch.Tensor] = {}
    for value in state.values():
        if id(value) not in cast:
            cast[id(value)] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    return {key: cast[id(value)] for key, value in state.items()}


def _raise_on_key_problems(
    source: str, model_name: str, missing: list[str], unexpected: list[str], mismatched: list[str],
) -> None:
    problems = [f"{label} ({len(keys)}): {_first(keys)}"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("mis-shaped keys", mismatched)) if keys]
    if problems:
        raise CheckpointError(f"{source} does not match {model_name}: {'; '.join(problems)}; "
                              "check that it is the right file and re-download it if it is")


def _one_line(error: Exception, limit: int = 160) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... {len(keys) - limit} more" if len(keys) > limit else "")


def _shape_reader(state: Mapping[str, torch.Tensor], source: str, what: str) -> Callable[[str], tuple[int, ...]]:
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"{source} lacks {key!r}; is it {what} checkpoint?")
        return tuple(state[key].shape)

    return shape


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """from_pretrained logs a load report and draws a progress bar; the strict check below replaces both."""
    verbosity, progress_bar = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if progress_bar:
            transformers_logging.enable_progress_bar()
