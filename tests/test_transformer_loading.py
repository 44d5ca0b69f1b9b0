"""Strict loading of StableAvatar transformer checkpoints in the published (original Wan) key layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from avatarcli.errors import CheckpointError
from avatarcli.loading.transformer import build_transformer, load_stableavatar_transformer
from avatarcli.models.stableavatar import parameter_count
from avatarcli.testing.stableavatar import FULL_SIZE, original_key_shapes, random_state_dict, wan_config, \
    write_tiny_transformer
from test_golden_stableavatar import ROOT

TINY = dict(FULL_SIZE, dim=48, num_heads=2, text_dim=16, ffn_dim=64, num_layers=2, image_dim=8, freq_dim=32)


def test_key_generator_matches_the_reference_checkpoint_layout():
    """The golden state dict was written by the reference model class: same names, same shapes."""
    from safetensors.torch import load_file

    config = json.loads((ROOT / "config.json").read_text())
    golden = load_file(str(ROOT / "state_dict.safetensors"))
    sizes = dict(FULL_SIZE, dim=config["dim"], num_heads=config["num_heads"], text_dim=config["text_dim"],
                 ffn_dim=config["ffn_dim"], num_layers=config["num_layers"], image_dim=config["image_dim"],
                 freq_dim=config["freq_dim"], audio_layers=config["audio_adapter_num_layers"])
    assert {k: tuple(v.shape) for k, v in golden.items()} == original_key_shapes(sizes)


def test_full_size_published_layout_loads_strictly_on_meta():
    state = random_state_dict(FULL_SIZE, device="meta")
    assert len(state) == 1143  # 983 Wan-Fun-InP tensors + 160 StableAvatar audio tensors
    model = build_transformer(state, wan_config(FULL_SIZE))
    assert model.config.num_layers == 30 and model.config.num_attention_heads == 12
    assert 1.74e9 < parameter_count(model) < 1.76e9


def test_a_missing_key_is_named_in_the_error():
    state = random_state_dict(FULL_SIZE, device="meta")
    del state["blocks.17.cross_attn.k_vocal.weight"]
    with pytest.raises(CheckpointError, match=r"missing: blocks\.17\.attn2\.k_vocal\.weight"):
        build_transformer(state, wan_config(FULL_SIZE), source="transformer3d-square.pt")


def test_an_unexpected_key_is_named_in_the_error():
    state = random_state_dict(FULL_SIZE, device="meta")
    state["blocks.3.cross_attn.k_extra.weight"] = torch.empty(4, device="meta")
    with pytest.raises(CheckpointError, match=r"unexpected: blocks\.3\.attn2\.k_extra\.weight"):
        build_transformer(state, wan_config(FULL_SIZE))


def test_a_wrong_shape_is_named_in_the_error():
    state = random_state_dict(FULL_SIZE, device="meta")
    state["blocks.5.ffn.0.weight"] = torch.empty(100, 1536, device="meta")
    with pytest.raises(CheckpointError, match=r"blocks\.5\.ffn\.net\.0\.proj\.weight \(100, 1536\) != \(8960, 1536\)"):
        build_transformer(state, wan_config(FULL_SIZE))


def test_published_folder_loads_without_the_base_safetensors(tmp_path: Path):
    write_tiny_transformer(tmp_path, TINY)
    assert not (tmp_path / "Wan2.1-Fun-V1.1-1.3B-InP" / "diffusion_pytorch_model.safetensors").exists()
    square = load_stableavatar_transformer(tmp_path, "square", dtype=torch.float32)
    rec = load_stableavatar_transformer(tmp_path, "rec-vec", dtype=torch.float32)
    assert not torch.equal(square.proj_out.weight, rec.proj_out.weight)
    reference = torch.load(tmp_path / "StableAvatar-1.3B" / "transformer3d-square.pt", weights_only=True)
    # norm2 <-> norm3 swap of the converter: the original affine cross-attention norm is diffusers' norm2.
    assert torch.equal(square.blocks[1].norm2.weight, reference["blocks.1.norm3.weight"])
    assert torch.equal(square.blocks[1].attn2.k_vocal.bias, reference["blocks.1.cross_attn.k_vocal.bias"])


def test_bfloat16_load_keeps_norms_and_time_embedding_in_float32(tmp_path: Path):
    write_tiny_transformer(tmp_path, TINY)
    model = load_stableavatar_transformer(tmp_path, "square", dtype=torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert model.blocks[0].scale_shift_table.dtype == torch.float32


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path: Path):
    write_tiny_transformer(tmp_path, TINY)
    pt = tmp_path / "StableAvatar-1.3B" / "transformer3d-square.pt"
    pt.write_bytes(pt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_stableavatar_transformer(tmp_path, "square")
