"""The frozen components load strictly from the original published files and produce the reference features."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from PIL import Image

from avatarcli.errors import AvatarError, CheckpointError
from avatarcli.features.audio import wav2vec_features
from avatarcli.features.image import clip_features, reference_condition
from avatarcli.features.text import encode_prompts
from avatarcli.loading.components import (
    image_encoder_from_state_dict,
    load_audio_encoder,
    load_image_encoder,
    load_text_encoder,
    load_vae,
    read_original_checkpoint,
    text_encoder_from_state_dict,
    vae_from_state_dict,
)
from avatarcli.testing.components import (
    CLIP_FILE,
    T5_FILE,
    T5_TOKENIZER_FOLDER,
    TINY_CLIP,
    TINY_T5,
    VAE_FILE,
    meta_state_dict,
    umt5_encoder_original_shapes,
    wan_vae_original_shapes,
    write_tiny_clip,
    write_tiny_t5,
    write_tiny_vae,
    write_tiny_wav2vec,
    xlm_roberta_clip_original_shapes,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    base, audio = root / "Wan2.1-Fun-V1.1-1.3B-InP", root / "wav2vec2-base-960h"
    return {
        "vae": write_tiny_vae(base, seed=1),
        "t5": write_tiny_t5(base, seed=2),
        "tokenizer": base / T5_TOKENIZER_FOLDER,
        "clip": write_tiny_clip(base, seed=3),
        "wav2vec": write_tiny_wav2vec(audio, seed=4),
    }


@pytest.fixture(scope="module")
def portrait() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(50, 40, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_tiny_checkpoints_use_published_names_and_stay_small(checkpoints: dict[str, Path]) -> None:
    assert checkpoints["vae"].name == VAE_FILE and checkpoints["t5"].name == T5_FILE
    assert checkpoints["clip"].name == CLIP_FILE
    files = [p for p in checkpoints["vae"].parent.rglob("*") if p.is_file()]
    files += [p for p in checkpoints["wav2vec"].rglob("*") if p.is_file()]
    assert max(p.stat().st_size for p in files) < 5_000_000


# ----------------------------------------------------------------------------------------------------------- VAE


def test_vae_matches_diffusers_single_file_loading(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    vae = load_vae(checkpoints["vae"])
    AutoencoderKLWan(base_dim=4).save_config(tmp_path)
    reference = AutoencoderKLWan.from_single_file(str(checkpoints["vae"]), config=str(tmp_path)).eval()
    ours, theirs = vae.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        frames = vae.decode(z).sample
        # the same weights and layers; loaded for the CPU, its convolutions run through oneDNN (models/cpu_convs.py),
        # which sums in another order: equal up to float rounding
        torch.testing.assert_close(frames, reference.decode(z).sample, rtol=1e-5, atol=1e-5)
    assert frames.shape == (1, 3, 5, 32, 32)


def test_vae_full_size_layout_loads_strictly_on_meta() -> None:
    vae = vae_from_state_dict(meta_state_dict(wan_vae_original_shapes()))
    assert vae.config.base_dim == 96 and vae.config.z_dim == 16
    # 126.9 M parameters: the size of the real Wan 2.1 VAE.
    assert round(sum(p.numel() for p in vae.parameters()) / 1e5) == 1269


def test_vae_file_with_a_missing_key_names_the_file_and_key(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    state = dict(read_original_checkpoint(checkpoints["vae"]))
    del state["decoder.upsamples.4.shortcut.weight"]
    broken = tmp_path / VAE_FILE
    torch.save(state, broken)
    with pytest.raises(CheckpointError, match="missing keys") as error:
        load_vae(broken)
    assert str(broken) in str(error.value)
    assert "decoder.up_blocks.1.resnets.0.conv_shortcut.weight" in str(error.value)


def test_missing_weight_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(AvatarError, match="not found"):
        load_vae(tmp_path / VAE_FILE)


# --------------------------------------------------------------------------------------------------- strictness

FULL_SIZE = {
    "vae": (wan_vae_original_shapes, vae_from_state_dict),
    "t5": (umt5_encoder_original_shapes, text_encoder_from_state_dict),
    "clip": (xlm_roberta_clip_original_shapes, image_encoder_from_state_dict),
}
# A key each loader needs, but not to infer the sizes, and its name in the converted model.
NEEDED_KEY = {"vae": "encoder.middle.1.proj.bias", "t5": "blocks.23.ffn.fc2.weight",
              "clip": "visual.transformer.30.mlp.2.bias"}
CONVERTED_NAME = {"vae": "encoder.mid_block.attentions.0.proj.bias",
                  "t5": "encoder.block.23.layer.1.DenseReluDense.wo.weight", "clip": "encoder.layers.30.mlp.fc2.bias"}


@pytest.mark.parametrize("component", FULL_SIZE)
def test_one_missing_key_is_rejected_by_name(component: str) -> None:
    shapes, build = FULL_SIZE[component]
    state = meta_state_dict(shapes())
    del state[NEEDED_KEY[component]]
    with pytest.raises(CheckpointError, match=rf"the-file\.pth .*missing keys \(1\): {CONVERTED_NAME[component]};"):
        build(state, source="the-file.pth")


@pytest.mark.parametrize("component", FULL_SIZE)
def test_one_unexpected_key_is_rejected_by_its_original_name(component: str) -> None:
    shapes, build = FULL_SIZE[component]
    state = meta_state_dict(shapes())
    state["blocks.0.extra.weight"] = torch.empty(3, device="meta")
    with pytest.raises(CheckpointError, match=r"the-file\.pth .*unexpected keys \(1\): blocks\.0\.extra\.weight"):
        build(state, source="the-file.pth")


@pytest.mark.parametrize("component", FULL_SIZE)
def test_a_mis_shaped_key_is_rejected_by_name(component: str) -> None:
    shapes, build = FULL_SIZE[component]
    state = meta_state_dict(shapes())
    key = NEEDED_KEY[component]
    state[key] = torch.empty(*state[key].shape[:-1], state[key].shape[-1] + 1, device="meta")
    with pytest.raises(CheckpointError, match=f"mis-shaped keys \\(1\\): {key}"):
        build(state, source="the-file.pth")


# ------------------------------------------------------------------------------------------------------------ T5


def test_umt5_full_size_layout_loads_strictly_on_meta() -> None:
    encoder = text_encoder_from_state_dict(meta_state_dict(umt5_encoder_original_shapes(), torch.bfloat16))
    config = encoder.config
    assert (config.vocab_size, config.d_model, config.num_layers, config.num_heads) == (256384, 4096, 24, 64)
    assert (config.d_kv, config.d_ff, config.relative_attention_num_buckets) == (64, 10240, 32)
    assert config.is_gated_act and config.dense_act_fn == "gelu_new"
    assert encoder.shared.weight is encoder.encoder.embed_tokens.weight


def _relative_buckets(length: int, num_buckets: int, max_distance: int = 128) -> torch.Tensor:
    # Wan's T5RelativeEmbedding._relative_position_bucket, bidirectional.
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    relative = relative.abs()
    exact = half // 2
    large = exact + (torch.log(relative.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return buckets + torch.where(relative < exact, relative, large.clamp(max=half - 1))


def _wan_t5_encode(state: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Wan's T5Encoder (wan/modules/t5.py) written out with the original keys, float32."""
    state = {k: v.float() for k, v in state.items()}

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    x = state["token_embedding.weight"][ids]
    b, length, _ = x.shape
    layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(layers):
        p = f"blocks.{i}."
        table = state[p + "pos_embedding.embedding.weight"]
        bias = table[_relative_buckets(length, table.shape[0])].permute(2, 0, 1)[None]
        h = rms(x, state[p + "norm1.weight"])
        q, k, v = (F.linear(h, state[p + f"attn.{n}.weight"]).view(b, length, heads, -1) for n in "qkv")
        scores = torch.einsum("binc,bjnc->bnij", q, k) + bias  # T5: no 1/sqrt(d) scaling
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        out = torch.einsum("bnij,bjnc->binc", scores.softmax(-1), v).reshape(b, length, -1)
        x = x + F.linear(out, state[p + "attn.o.weight"])
        h = rms(x, state[p + "norm2.weight"])
        gate = F.gelu(F.linear(h, state[p + "ffn.gate.0.weight"]), approximate="tanh")
        x = x + F.linear(F.linear(h, state[p + "ffn.fc1.weight"]) * gate, state[p + "ffn.fc2.weight"])
    return rms(x, state["norm.weight"])


def test_umt5_encoder_matches_wan_t5_computed_from_original_keys(checkpoints: dict[str, Path]) -> None:
    encoder, _ = load_text_encoder(checkpoints["t5"], checkpoints["tokenizer"], dtype=torch.float32)
    ids = torch.randint(3, TINY_T5["vocab"], (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # positions 15+ are padding; long enough for the logarithmic buckets
    expected = _wan_t5_encode(read_original_checkpoint(checkpoints["t5"]), ids, mask, TINY_T5["num_heads"])
    with torch.no_grad():
        actual = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(actual[1, :15], expected[1, :15], rtol=1e-4, atol=1e-5)


def test_prompt_features_are_zero_past_each_prompt_and_padded_to_text_len(checkpoints: dict[str, Path]) -> None:
    encoder, tokenizer = load_text_encoder(checkpoints["t5"], checkpoints["tokenizer"])
    prompts = ["the protagonist is talking", "a"]
    features = encode_prompts(encoder, tokenizer, prompts, text_len=512)
    assert features.shape == (2, 512, TINY_T5["dim"]) and features.dtype == torch.bfloat16
    lengths = [len(tokenizer(p).input_ids) for p in prompts]
    assert lengths == [5, 2]  # 4 words + eos, 1 word + eos
    for row, length in zip(features, lengths):
        assert row[:length].abs().sum(-1).gt(0).all()
        assert row[length:].eq(0).all()


def test_prompt_features_equal_the_prompt_encoded_alone_at_its_real_length(checkpoints: dict[str, Path]) -> None:
    encoder, tokenizer = load_text_encoder(checkpoints["t5"], checkpoints["tokenizer"], dtype=torch.float32)
    batch = encode_prompts(encoder, tokenizer, ["a", "the protagonist is singing and talking"], text_len=32)
    ids = tokenizer("a", return_tensors="pt").input_ids
    with torch.no_grad():
        alone = encoder(input_ids=ids).last_hidden_state
    torch.testing.assert_close(batch[0, : ids.shape[1]], alone[0], rtol=1e-4, atol=1e-5)


def test_prompts_are_whitespace_cleaned_like_wan(checkpoints: dict[str, Path]) -> None:
    encoder, tokenizer = load_text_encoder(checkpoints["t5"], checkpoints["tokenizer"])
    messy, clean = encode_prompts(encoder, tokenizer, ["  the\n protagonist \t is &amp;amp; talking ",
                                                       "the protagonist is & talking"], text_len=16)
    assert torch.equal(messy, clean)


# ---------------------------------------------------------------------------------------------------------- CLIP


def test_clip_full_size_layout_loads_strictly_on_meta_as_vit_h_14() -> None:
    encoder = image_encoder_from_state_dict(meta_state_dict(xlm_roberta_clip_original_shapes()))
    config = encoder.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1280, 32, 16)
    assert (config.intermediate_size, config.patch_size, config.image_size) == (5120, 14, 224)
    assert config.hidden_act == "gelu"


def test_clip_keys_outside_the_visual_tower_must_be_the_known_ones() -> None:
    state = meta_state_dict(xlm_roberta_clip_original_shapes())
    state["visual.proj"] = torch.empty(1280, 1024, device="meta")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): visual\.proj"):
        image_encoder_from_state_dict(state, source="clip.pth")


def _open_clip_penultimate(state: dict[str, torch.Tensor], pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """Wan's VisionTransformer.forward(use_31_block=True) written out with the original keys."""
    weight = state["visual.patch_embedding.weight"]
    width, patch = weight.shape[0], weight.shape[-1]
    x = F.conv2d(pixels, weight, stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.cls_embedding"].expand(x.shape[0], -1, -1), x], dim=1) + state["visual.pos_embedding"]

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (width,), state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)

    x = norm(x, "visual.pre_norm")
    b, s, _ = x.shape
    layers = len({k.split(".")[2] for k in state if k.startswith("visual.transformer.")})
    for i in range(layers - 1):
        p = f"visual.transformer.{i}"
        qkv = F.linear(norm(x, f"{p}.norm1"), state[f"{p}.attn.to_qkv.weight"], state[f"{p}.attn.to_qkv.bias"])
        q, k, v = qkv.view(b, s, 3, heads, -1).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + F.linear(out.transpose(1, 2).reshape(b, s, width), state[f"{p}.attn.proj.weight"],
                         state[f"{p}.attn.proj.bias"])
        hidden = F.gelu(F.linear(norm(x, f"{p}.norm2"), state[f"{p}.mlp.0.weight"], state[f"{p}.mlp.0.bias"]))
        x = x + F.linear(hidden, state[f"{p}.mlp.2.weight"], state[f"{p}.mlp.2.bias"])
    return x


def test_clip_features_match_open_clip_block_31_computed_from_original_keys(
    checkpoints: dict[str, Path], portrait: Image.Image,
) -> None:
    encoder = load_image_encoder(checkpoints["clip"])
    features = clip_features(encoder, portrait, width=48, height=64)
    assert features.shape == (1, 257, TINY_CLIP["vision_dim"])

    # Wan's preprocessing: PIL stretch to (W, H), [-1, 1], torch bicubic to 224, back to [0, 1], CLIP mean/std.
    stretched = np.asarray(portrait.resize((48, 64), Image.Resampling.BICUBIC), dtype=np.float32)
    pixels = (torch.from_numpy(stretched).permute(2, 0, 1)[None] / 255 - 0.5) * 2
    pixels = F.interpolate(pixels, size=(224, 224), mode="bicubic", align_corners=False) * 0.5 + 0.5
    pixels = (pixels - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    # Width 32 is not a published ViT, so the loader's fallback rule gives heads of 16 channels: 2 heads.
    expected = _open_clip_penultimate(read_original_checkpoint(checkpoints["clip"]), pixels, heads=2)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- condition y


def test_reference_condition_has_mask_then_latents_for_81_frames(
    checkpoints: dict[str, Path], portrait: Image.Image,
) -> None:
    vae = load_vae(checkpoints["vae"])
    y = reference_condition(vae, portrait, width=32, height=16, num_frames=81)
    assert y.shape == (1, 20, 21, 2, 4)
    assert y[:, :4, 0].eq(1).all() and y[:, :4, 1:].eq(0).all()


def test_reference_latents_are_the_normalised_mode_of_the_reference_then_zero_frames(
    checkpoints: dict[str, Path], portrait: Image.Image,
) -> None:
    vae = load_vae(checkpoints["vae"])
    y = reference_condition(vae, portrait, width=32, height=16, num_frames=9)
    stretched = np.asarray(portrait.resize((32, 16), Image.Resampling.BICUBIC), dtype=np.float32)
    video = torch.zeros(1, 3, 9, 16, 32)
    video[0, :, 0] = (torch.from_numpy(stretched).permute(2, 0, 1) / 255 - 0.5) * 2
    with torch.no_grad():
        mode = vae.encode(video).latent_dist.mean
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(y[:, 4:], (mode - mean) / std)


def test_reference_condition_rejects_sizes_the_vae_cannot_halve(
    checkpoints: dict[str, Path], portrait: Image.Image,
) -> None:
    with pytest.raises(AvatarError, match="multiples of 8"):
        reference_condition(load_vae(checkpoints["vae"]), portrait, width=36, height=16, num_frames=9)


# --------------------------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize(("video_frames", "expected_tokens"), [(81, 161), (84, 167)])
def test_wav2vec_gives_reference_token_counts_for_a_window_slice(
    checkpoints: dict[str, Path], video_frames: int, expected_tokens: int,
) -> None:
    model, feature_extractor = load_audio_encoder(checkpoints["wav2vec"])
    samples = np.random.default_rng(0).standard_normal(video_frames * 640).astype(np.float32)  # 25 fps, 16 kHz
    features = wav2vec_features(model, feature_extractor, samples)
    assert features.shape == (1, expected_tokens, 768) and features.dtype == torch.float32


def test_wav2vec_normalises_each_slice_by_itself(checkpoints: dict[str, Path]) -> None:
    model, feature_extractor = load_audio_encoder(checkpoints["wav2vec"])
    samples = np.random.default_rng(1).standard_normal(4000).astype(np.float32)
    quiet = wav2vec_features(model, feature_extractor, samples)
    loud = wav2vec_features(model, feature_extractor, 3.0 * samples + 0.5)
    torch.testing.assert_close(quiet, loud, rtol=1e-3, atol=1e-3)


def test_wav2vec_folder_without_weights_is_a_checkpoint_error(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_text((checkpoints["wav2vec"] / name).read_text())
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        load_audio_encoder(tmp_path)


def test_audio_slice_shorter_than_one_wav2vec_window_is_a_user_error(checkpoints: dict[str, Path]) -> None:
    model, feature_extractor = load_audio_encoder(checkpoints["wav2vec"])
    with pytest.raises(AvatarError, match="shorter"):
        wav2vec_features(model, feature_extractor, np.zeros(399, dtype=np.float32))
