"""Tiny random checkpoints of the encoders/VAE in the ORIGINAL published layout, and the full-size key layouts.

The layouts are enumerated here from the original Wan module definitions (Wan-Video/Wan2.1 wan/modules/vae.py, t5.py,
clip.py, xlm_roberta.py), independently of the diffusers/transformers classes they are converted into, so a test that
loads them proves the converters against the real file format. File names match the published folders:

    Wan2.1-Fun-V1.1-1.3B-InP/Wan2.1_VAE.pth
    Wan2.1-Fun-V1.1-1.3B-InP/models_t5_umt5-xxl-enc-bf16.pth   + google/umt5-xxl/ (tokenizer)
    Wan2.1-Fun-V1.1-1.3B-InP/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth
    wav2vec2-base-960h/                                          (transformers layout)

Each writer takes the component folder (the first for VAE/T5/CLIP, the second for wav2vec2) and a seed.
"""

from __future__ import annotations

from math import prod
from pathlib import Path

import torch

VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER_FOLDER = "google/umt5-xxl"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"

Shapes = dict[str, tuple[int, ...]]


def wan_vae_original_shapes(dim: int = 96, z_dim: int = 16) -> Shapes:
    """Keys of Wan2.1_VAE.pth: WanVAE_ with dim_mult [1,2,4,4], 2 res blocks, temporal downsample [F,T,T]."""
    shapes: Shapes = {}
    dim_mult = [1, 2, 4, 4]
    temporal_down = [False, True, True]

    def conv3d(name: str, c_out: int, c_in: int, kernel: tuple[int, int, int]) -> None:
        shapes[f"{name}.weight"] = (c_out, c_in, *kernel)
        shapes[f"{name}.bias"] = (c_out,)

    def residual(name: str, c_in: int, c_out: int) -> None:
        shapes[f"{name}.residual.0.gamma"] = (c_in, 1, 1, 1)
        conv3d(f"{name}.residual.2", c_out, c_in, (3, 3, 3))
        shapes[f"{name}.residual.3.gamma"] = (c_out, 1, 1, 1)
        conv3d(f"{name}.residual.6", c_out, c_out, (3, 3, 3))
        if c_in != c_out:
            conv3d(f"{name}.shortcut", c_out, c_in, (1, 1, 1))

    def attention(name: str, c: int) -> None:
        shapes[f"{name}.norm.gamma"] = (c, 1, 1)
        shapes[f"{name}.to_qkv.weight"] = (3 * c, c, 1, 1)
        shapes[f"{name}.to_qkv.bias"] = (3 * c,)
        shapes[f"{name}.proj.weight"] = (c, c, 1, 1)
        shapes[f"{name}.proj.bias"] = (c,)

    def middle(name: str, c: int) -> None:
        residual(f"{name}.0", c, c)
        attention(f"{name}.1", c)
        residual(f"{name}.2", c, c)

    def head(name: str, c_in: int, c_out: int) -> None:
        shapes[f"{name}.0.gamma"] = (c_in, 1, 1, 1)
        conv3d(f"{name}.2", c_out, c_in, (3, 3, 3))

    # Encoder: the head outputs mean and log-variance, hence 2*z_dim.
    dims = [dim * m for m in [1, *dim_mult]]
    conv3d("encoder.conv1", dims[0], 3, (3, 3, 3))
    index = 0
    for level, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(2):
            residual(f"encoder.downsamples.{index}", c_in, c_out)
            c_in, index = c_out, index + 1
        if level != len(dim_mult) - 1:
            shapes[f"encoder.downsamples.{index}.resample.1.weight"] = (c_out, c_out, 3, 3)
            shapes[f"encoder.downsamples.{index}.resample.1.bias"] = (c_out,)
            if temporal_down[level]:
                conv3d(f"encoder.downsamples.{index}.time_conv", c_out, c_out, (3, 1, 1))
            index += 1
    middle("encoder.middle", dims[-1])
    head("encoder.head", dims[-1], 2 * z_dim)
    conv3d("conv1", 2 * z_dim, 2 * z_dim, (1, 1, 1))
    conv3d("conv2", z_dim, z_dim, (1, 1, 1))

    # Decoder: levels after an upsample take half the channels (the upsample conv halves them).
    dims = [dim * m for m in [dim_mult[-1], *dim_mult[::-1]]]
    temporal_up = temporal_down[::-1]
    conv3d("decoder.conv1", dims[0], z_dim, (3, 3, 3))
    middle("decoder.middle", dims[0])
    index = 0
    for level, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
        if level in (1, 2, 3):
            c_in //= 2
        for _ in range(3):
            residual(f"decoder.upsamples.{index}", c_in, c_out)
            c_in, index = c_out, index + 1
        if level != len(dim_mult) - 1:
            shapes[f"decoder.upsamples.{index}.resample.1.weight"] = (c_out // 2, c_out, 3, 3)
            shapes[f"decoder.upsamples.{index}.resample.1.bias"] = (c_out // 2,)
            if temporal_up[level]:
                conv3d(f"decoder.upsamples.{index}.time_conv", 2 * c_out, c_out, (3, 1, 1))
            index += 1
    head("decoder.head", dims[-1], 3)
    return shapes


def umt5_encoder_original_shapes(
    vocab: int = 256384, dim: int = 4096, dim_attn: int = 4096, dim_ffn: int = 10240,
    num_heads: int = 64, num_layers: int = 24, num_buckets: int = 32,
) -> Shapes:
    """Keys of models_t5_umt5-xxl-enc-bf16.pth: Wan's T5Encoder with a relative-position table in every block."""
    shapes: Shapes = {"token_embedding.weight": (vocab, dim)}
    for i in range(num_layers):
        block = f"blocks.{i}"
        shapes[f"{block}.norm1.weight"] = (dim,)
        for name in ("q", "k", "v"):
            shapes[f"{block}.attn.{name}.weight"] = (dim_attn, dim)
        shapes[f"{block}.attn.o.weight"] = (dim, dim_attn)
        shapes[f"{block}.norm2.weight"] = (dim,)
        shapes[f"{block}.ffn.gate.0.weight"] = (dim_ffn, dim)
        shapes[f"{block}.ffn.fc1.weight"] = (dim_ffn, dim)
        shapes[f"{block}.ffn.fc2.weight"] = (dim, dim_ffn)
        shapes[f"{block}.pos_embedding.embedding.weight"] = (num_buckets, num_heads)
    shapes["norm.weight"] = (dim,)
    return shapes


def xlm_roberta_clip_original_shapes(
    vision_dim: int = 1280, vision_layers: int = 32, vision_mlp: int = 5120, patch_size: int = 14,
    image_size: int = 224, embed_dim: int = 1024, text_vocab: int = 250002, text_dim: int = 1024,
    text_layers: int = 24, max_text_len: int = 514,
) -> Shapes:
    """Keys of the open-clip XLM-RoBERTa-L + ViT-H/14 pickle (XLMRobertaCLIP: visual, textual, log_scale)."""
    shapes: Shapes = {}
    tokens = (image_size // patch_size) ** 2 + 1
    # pre_norm=True: the patch conv has no bias and a LayerNorm follows the embeddings.
    shapes["visual.patch_embedding.weight"] = (vision_dim, 3, patch_size, patch_size)
    shapes["visual.cls_embedding"] = (1, 1, vision_dim)
    shapes["visual.pos_embedding"] = (1, tokens, vision_dim)
    shapes["visual.pre_norm.weight"] = shapes["visual.pre_norm.bias"] = (vision_dim,)
    for i in range(vision_layers):
        block = f"visual.transformer.{i}"
        shapes[f"{block}.norm1.weight"] = shapes[f"{block}.norm1.bias"] = (vision_dim,)
        shapes[f"{block}.attn.to_qkv.weight"] = (3 * vision_dim, vision_dim)
        shapes[f"{block}.attn.to_qkv.bias"] = (3 * vision_dim,)
        shapes[f"{block}.attn.proj.weight"] = (vision_dim, vision_dim)
        shapes[f"{block}.attn.proj.bias"] = (vision_dim,)
        shapes[f"{block}.norm2.weight"] = shapes[f"{block}.norm2.bias"] = (vision_dim,)
        shapes[f"{block}.mlp.0.weight"] = (vision_mlp, vision_dim)
        shapes[f"{block}.mlp.0.bias"] = (vision_mlp,)
        shapes[f"{block}.mlp.2.weight"] = (vision_dim, vision_mlp)
        shapes[f"{block}.mlp.2.bias"] = (vision_dim,)
    shapes["visual.post_norm.weight"] = shapes["visual.post_norm.bias"] = (vision_dim,)
    shapes["visual.head"] = (vision_dim, embed_dim)

    shapes["textual.token_embedding.weight"] = (text_vocab, text_dim)
    shapes["textual.type_embedding.weight"] = (1, text_dim)
    shapes["textual.pos_embedding.weight"] = (max_text_len, text_dim)
    for i in range(text_layers):
        block = f"textual.blocks.{i}"
        for name in ("q", "k", "v", "o"):
            shapes[f"{block}.attn.{name}.weight"] = (text_dim, text_dim)
            shapes[f"{block}.attn.{name}.bias"] = (text_dim,)
        shapes[f"{block}.norm1.weight"] = shapes[f"{block}.norm1.bias"] = (text_dim,)
        shapes[f"{block}.ffn.0.weight"] = (4 * text_dim, text_dim)
        shapes[f"{block}.ffn.0.bias"] = (4 * text_dim,)
        shapes[f"{block}.ffn.2.weight"] = (text_dim, 4 * text_dim)
        shapes[f"{block}.ffn.2.bias"] = (text_dim,)
        shapes[f"{block}.norm2.weight"] = shapes[f"{block}.norm2.bias"] = (text_dim,)
    shapes["textual.norm.weight"] = shapes["textual.norm.bias"] = (text_dim,)
    mid_dim = (text_dim + embed_dim) // 2
    shapes["textual.head.0.weight"] = (mid_dim, text_dim)
    shapes["textual.head.2.weight"] = (embed_dim, mid_dim)
    shapes["log_scale"] = ()
    return shapes


def meta_state_dict(shapes: Shapes, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Shape-only tensors: enough to prove a layout loads, without allocating gigabytes."""
    return {key: torch.empty(shape, dtype=dtype, device="meta") for key, shape in shapes.items()}


def random_state_dict(shapes: Shapes, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights that keep activations in a sane range: fan-in scaled weights, norm gains near 1, small biases."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        parts = key.split(".")
        noise = torch.randn(shape, generator=generator)
        if parts[-1] == "gamma" or (parts[-1] == "weight" and len(parts) > 1 and "norm" in parts[-2]):
            value = 1.0 + 0.1 * noise
        elif parts[-1] == "bias":
            value = 0.05 * noise
        else:
            value = noise / max(1, prod(shape[1:])) ** 0.5
        state[key] = value.to(dtype)
    return state


def write_tiny_vae(folder: Path, seed: int = 0) -> Path:
    """Wan2.1_VAE.pth at base width 4 (real: 96); z_dim stays 16 so the latent mean/std apply."""
    path = Path(folder) / VAE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_state_dict(wan_vae_original_shapes(dim=4, z_dim=16), seed), path)
    return path


TINY_T5 = dict(vocab=64, dim=32, dim_attn=32, dim_ffn=48, num_heads=4, num_layers=2, num_buckets=32)


def write_tiny_t5(folder: Path, seed: int = 0) -> Path:
    """The bf16 umT5 encoder pickle (2 blocks, width 32) plus an offline google/umt5-xxl/ tokenizer folder."""
    folder = Path(folder)
    path = folder / T5_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_state_dict(umt5_encoder_original_shapes(**TINY_T5), seed, dtype=torch.bfloat16), path)
    write_tiny_umt5_tokenizer(folder / T5_TOKENIZER_FOLDER, vocab_size=TINY_T5["vocab"])
    return path


def write_tiny_umt5_tokenizer(folder: Path, vocab_size: int = 64) -> Path:
    """A Unigram T5 tokenizer (pad 0, eos 1, unk 2, eos appended) with letter pieces, built without the Hub."""
    from transformers import T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces = [("▁", -2.0)] + [(f"▁{c}", -3.0) for c in letters] + [(c, -4.0) for c in letters]
    words = ["▁the", "▁is", "▁talking", "▁singing", "▁protagonist", "▁a", "▁of", "▁and"]
    pieces += [(w, -1.0) for w in words if w not in dict(pieces)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + pieces
    vocab = vocab[:vocab_size]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return folder


TINY_CLIP = dict(vision_dim=32, vision_layers=3, vision_mlp=128, patch_size=14, image_size=224, embed_dim=16,
                 text_vocab=16, text_dim=16, text_layers=1, max_text_len=8)


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """The open-clip pickle with a 3-block width-32 ViT (real image size, patch 14 and 257 tokens) and a 1-block
    text tower, which the loader must drop."""
    path = Path(folder) / CLIP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_state_dict(xlm_roberta_clip_original_shapes(**TINY_CLIP), seed), path)
    return path


def write_tiny_wav2vec(folder: Path, seed: int = 0) -> Path:
    """A wav2vec2-base-960h-like folder: Wav2Vec2ForCTC (as published, so an lm_head is present), default conv
    kernels/strides (50 Hz frames) with narrow convs, hidden size 768 (the audio adapter input), one transformer
    layer with 2 heads, stored in float16 to stay under 5 MB."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = Wav2Vec2Config(
        vocab_size=32, hidden_size=768, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
        conv_dim=(16,) * 7, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=128,
        architectures=["Wav2Vec2ForCTC"],
    )
    from transformers.utils import logging as transformers_logging

    torch.manual_seed(seed)
    model = Wav2Vec2ForCTC(config).eval()
    bar_was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # no "Writing model shards" bar for a 5 MB file
    try:
        model.half().save_pretrained(str(folder))
    finally:
        if bar_was_on:
            transformers_logging.enable_progress_bar()
    # wav2vec2-base-960h's preprocessor: per-utterance zero-mean/unit-variance, no attention mask.
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False,
    ).save_pretrained(str(folder))
    return folder
