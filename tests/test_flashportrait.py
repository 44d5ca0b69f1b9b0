"""FlashPortrait: strict loading of the published layout, sampling pieces, memory options (tiny weights, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from avatarcli.errors import AvatarError, CheckpointError
from avatarcli.loading.flashportrait import (
    BASE_FOLDER,
    FLASHPORTRAIT_FOLDER,
    OVERLAY_FILE,
    SHARD_INDEX,
    build_flashportrait_transformer,
    load_flashportrait,
    load_flashportrait_transformer,
    load_portrait_encoder,
)
from avatarcli.loading.memory import has_offload_hooks, place_transformer
from avatarcli.models.flashportrait import ExpressionConditioning, group_index
from avatarcli.sampling.flashportrait import (
    ExpressionGuidance,
    FlashPortraitDenoiser,
    latent_frames_for_driving,
    output_frames,
    pixel_features_for_driving,
    plan_flashportrait_windows,
    reference_size,
    window_expression_tokens,
)
from avatarcli.sampling.sampler import sample_joint, sample_streaming
from avatarcli.sampling.schedule import flow_sigmas
from avatarcli.testing import make_tiny_weights
from avatarcli.testing.flashportrait import (
    FULL_SIZE,
    TINY_SIZE,
    is_fine_tuned,
    portrait_encoder_key_shapes,
    random_state,
    transformer_key_shapes,
    wan_config,
    write_flashportrait_weights,
)


def tiny_states(seed: int = 0):
    return random_state(transformer_key_shapes(TINY_SIZE), seed), random_state(portrait_encoder_key_shapes(TINY_SIZE),
                                                                               seed + 1)


@pytest.fixture
def tiny_dir(tmp_path):
    transformer, encoder = tiny_states()
    write_flashportrait_weights(tmp_path, transformer, encoder, wan_config(TINY_SIZE), shards=3)
    return tmp_path, transformer


def overlay_path(folder):
    return folder / FLASHPORTRAIT_FOLDER / OVERLAY_FILE


def rewrite_overlay(folder, change):
    state = torch.load(overlay_path(folder), weights_only=True)
    change(state)
    torch.save(state, overlay_path(folder))


def shards(folder):
    return sorted((folder / BASE_FOLDER).glob("diffusion_pytorch_model-*.safetensors"))


# ---- strict loading -----------------------------------------------------------------------------------------------


def test_overlay_wins_over_base_and_base_fills_the_rest(tiny_dir):
    folder, original = tiny_dir
    model = load_flashportrait_transformer(folder, dtype=torch.float32)
    state = model.state_dict()
    # fine-tuned attention weight: from the overlay (the base shards hold other random values)
    assert torch.equal(state["blocks.1.attn2.to_q.weight"], original["blocks.1.cross_attn.q.weight"])
    base_q = {k: v for s in shards(folder) for k, v in load_file(str(s)).items()}["blocks.1.cross_attn.q.weight"]
    assert not torch.equal(base_q, original["blocks.1.cross_attn.q.weight"])
    # stock weight only in the base: from the shards; norm2/norm3 swapped by the shared converter
    assert torch.equal(state["blocks.0.ffn.net.0.proj.weight"], original["blocks.0.ffn.0.weight"])
    assert torch.equal(state["blocks.0.norm2.weight"], original["blocks.0.norm3.weight"])
    assert torch.equal(state["blocks.0.attn2.emo_k_proj.weight"], original["blocks.0.cross_attn.emo_k_proj.weight"])


def test_overlay_holding_the_whole_model_never_reads_the_base_shards(tmp_path):
    transformer, encoder = tiny_states()
    write_flashportrait_weights(tmp_path, transformer, encoder, wan_config(TINY_SIZE), overlay="all", shards=3)
    for shard in shards(tmp_path):
        shard.write_bytes(b"not a safetensors file")
    (tmp_path / BASE_FOLDER / SHARD_INDEX).write_text("{broken")
    model = load_flashportrait_transformer(tmp_path, dtype=torch.float32)
    assert torch.equal(model.state_dict()["proj_out.weight"], transformer["head.head.weight"])


def test_unreadable_base_shard_is_named_when_it_is_needed(tiny_dir):
    folder, _ = tiny_dir
    shards(folder)[0].write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=shards(folder)[0].name):
        load_flashportrait_transformer(folder, dtype=torch.float32)


def test_overlay_key_without_a_model_weight_is_named(tiny_dir):
    folder, _ = tiny_dir
    rewrite_overlay(folder, lambda s: s.__setitem__("blocks.0.cross_attn.emo_q_proj.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.cross_attn\.emo_q_proj\.weight"):
        load_flashportrait_transformer(folder, dtype=torch.float32)


def test_weight_in_neither_overlay_nor_base_is_named(tiny_dir):
    folder, _ = tiny_dir
    for shard in shards(folder):
        state = load_file(str(shard))
        if state.pop("blocks.1.ffn.2.bias", None) is not None:
            save_file(state, str(shard))
    index = json.loads((folder / BASE_FOLDER / SHARD_INDEX).read_text())
    del index["weight_map"]["blocks.1.ffn.2.bias"]
    (folder / BASE_FOLDER / SHARD_INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.net\.2\.bias"):
        load_flashportrait_transformer(folder, dtype=torch.float32)


def test_expression_projection_only_in_the_base_is_an_error_naming_it(tmp_path):
    transformer, encoder = tiny_states()
    write_flashportrait_weights(tmp_path, transformer, encoder, wan_config(TINY_SIZE), shards=3)
    # move block 1's emo_v_proj from the overlay into the base shards
    key = "blocks.1.cross_attn.emo_v_proj.weight"
    rewrite_overlay(tmp_path, lambda s: s.pop(key))
    save_file({key: transformer[key]}, str(tmp_path / BASE_FOLDER / "extra.safetensors"))
    index = json.loads((tmp_path / BASE_FOLDER / SHARD_INDEX).read_text())
    index["weight_map"][key] = "extra.safetensors"
    (tmp_path / BASE_FOLDER / SHARD_INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn2\.emo_v_proj\.weight"):
        load_flashportrait_transformer(tmp_path, dtype=torch.float32)


def test_shape_mismatch_is_named(tiny_dir):
    folder, _ = tiny_dir
    rewrite_overlay(folder, lambda s: s.__setitem__("blocks.0.self_attn.q.weight", torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn1\.to_q\.weight"):
        load_flashportrait_transformer(folder, dtype=torch.float32)


def test_overlay_nested_under_state_dict_loads(tiny_dir):
    folder, original = tiny_dir
    rewrite_overlay(folder, lambda s: (lambda inner: (s.clear(), s.__setitem__("state_dict", inner)))(dict(s)))
    model = load_flashportrait_transformer(folder, dtype=torch.float32)
    assert torch.equal(model.state_dict()["blocks.0.attn1.to_k.weight"], original["blocks.0.self_attn.k.weight"])


def test_missing_overlay_file_is_named(tiny_dir):
    folder, _ = tiny_dir
    overlay_path(folder).unlink()
    with pytest.raises(AvatarError, match=OVERLAY_FILE):
        load_flashportrait_transformer(folder, dtype=torch.float32)


def test_full_size_published_layout_builds_strictly_on_meta():
    shapes = transformer_key_shapes(FULL_SIZE)
    assert len(shapes) == 1303 + 80  # Wan2.1-I2V-14B tensors + emo_k/v_proj of 40 blocks
    overlay = random_state(shapes, device="meta")
    model = build_flashportrait_transformer(overlay, wan_config(FULL_SIZE))
    assert model.config.num_layers == 40 and model.config.num_attention_heads == 40
    assert model.config.emo_token_dim == 2048 and model.config.image_dim == 1280
    params = sum(p.numel() for p in model.parameters())
    emo = 40 * 2 * 5120 * 2048
    assert params == sum(torch.Size(s).numel() for s in shapes.values())
    assert 16.3e9 < params - emo < 16.5e9  # Wan2.1-I2V-14B


def test_portrait_encoder_loads_strictly(tiny_dir):
    folder, _ = tiny_dir
    encoder = load_portrait_encoder(folder)
    assert encoder.tokens_per_frame == 24
    assert encoder(torch.randn(1, 5, 554)).shape == (1, 5 * 24, TINY_SIZE["emo_token_dim"])
    path = folder / FLASHPORTRAIT_FOLDER / "portrait_encoder.pt"
    state = torch.load(path, weights_only=True)
    state.pop("emo_proj_model.norm_out.bias")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"emo_proj_model\.norm_out\.bias"):
        load_portrait_encoder(folder)


def test_fine_tuned_split_is_what_training_unfroze():
    assert is_fine_tuned("blocks.3.self_attn.q.weight") and is_fine_tuned("blocks.0.cross_attn.emo_k_proj.weight")
    assert not is_fine_tuned("blocks.3.ffn.0.weight") and not is_fine_tuned("img_emb.proj.1.weight")


# ---- tiny weights end to end ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_weights(tmp_path_factory.mktemp("fp"), model="flashportrait")
    return load_flashportrait(folder, "cpu", torch.float32)


def test_make_tiny_weights_writes_both_published_folders(tiny, tmp_path):
    folder = make_tiny_weights(tmp_path, model="flashportrait")
    base = folder / BASE_FOLDER
    assert len(shards(folder)) == 7 and (base / SHARD_INDEX).is_file() and (base / "config.json").is_file()
    for name in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth",
                 "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "google/umt5-xxl"):
        assert (base / name).exists(), name
    assert (folder / FLASHPORTRAIT_FOLDER / "portrait_encoder.pt").is_file()
    overlay = torch.load(overlay_path(folder), weights_only=True)
    assert all(is_fine_tuned(k) for k in overlay)
    assert tiny.transformer.config.image_dim == tiny.image_encoder.config.hidden_size


def tiny_denoiser(parts, latent_frames, guidance, steps, features):
    model = parts.transformer
    h, w = 4, 4
    condition = torch.randn(1, 20, latent_frames, h, w)
    return FlashPortraitDenoiser(
        model, guidance, positive_text=torch.randn(1, 5, model.config.text_dim),
        negative_text=torch.randn(1, 3, model.config.text_dim),
        image_tokens=torch.randn(1, 257, model.config.image_dim),
        condition=condition, window_tokens=lambda win: window_expression_tokens(parts.portrait_encoder, features, win),
        sigmas=flow_sigmas(steps), steps=steps)


@pytest.mark.parametrize("driving_frames", [1, 6, 9])
def test_short_driving_videos_sample_one_window_of_their_own_length(tiny, driving_frames, one_thread):
    latent_frames = latent_frames_for_driving(driving_frames)
    plan = plan_flashportrait_windows(latent_frames)
    assert [(w.start, w.end) for w in plan.windows] == [(0, latent_frames)]
    features = pixel_features_for_driving(torch.randn(1, driving_frames, 554))
    steps = 2
    denoiser = tiny_denoiser(tiny, latent_frames, ExpressionGuidance(), steps, features)
    noise = torch.randn(1, 16, latent_frames, 4, 4)
    with torch.no_grad():
        chunks = list(sample_streaming(plan, flow_sigmas(steps), lambda s, e: noise[:, :, s:e], denoiser))
    out = torch.cat([c.latents for c in chunks], 2)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    decoded = 4 * (latent_frames - 1) + 1
    assert len(range(decoded)[output_frames(decoded, driving_frames)]) == driving_frames


def test_batched_branches_equal_separate_forwards(tiny, one_thread):
    model = tiny.transformer
    frames = 3
    x = torch.randn(1, 36, frames, 4, 4)
    t = torch.tensor([900.0])
    text, image = torch.randn(1, 5, model.config.text_dim), torch.randn(1, 257, model.config.image_dim)
    with torch.no_grad():
        tokens = group_tokens_for(tiny, frames)
        batched = model(x.expand(2, -1, -1, -1, -1), t.expand(2), text.expand(2, -1, -1), image.expand(2, -1, -1),
                        ExpressionConditioning(tokens, (1.0, 0.0)))
        on = model(x, t, text, image, ExpressionConditioning(tokens, (1.0,)))
        off = model(x, t, text, image, None)
    assert torch.allclose(batched[0:1], on, atol=1e-4)
    assert torch.allclose(batched[1:2], off, atol=1e-4)  # batch-size-dependent matmul rounding only
    assert (on - off).abs().max() > 1e-3


def group_tokens_for(parts, latent_frames):
    from avatarcli.models.flashportrait import group_tokens, pixel_frames_for

    enc = parts.portrait_encoder
    return group_tokens(enc(torch.randn(1, pixel_frames_for(latent_frames), 554)), latent_frames, enc.tokens_per_frame)


def test_streaming_equals_joint_loop_over_several_windows(tiny, one_thread):
    latent_frames, steps = 9, 3
    plan = plan_flashportrait_windows(latent_frames, window_frames=5, overlap=3)
    assert len(plan.windows) >= 3
    features = torch.randn(1, 4 * (latent_frames - 1) + 1, 554)
    denoiser = tiny_denoiser(tiny, 5, ExpressionGuidance(text_scale=2.0), steps, features)
    noise = torch.randn(1, 16, latent_frames, 4, 4)
    sigmas = flow_sigmas(steps)
    with torch.no_grad():
        joint = sample_joint(plan, sigmas, noise, denoiser)
        streamed = torch.cat([c.latents for c in sample_streaming(plan, sigmas, lambda s, e: noise[:, :, s:e],
                                                                   denoiser)], 2)
    assert torch.equal(joint, streamed)


# ---- sampling pieces ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent_frames", [1, 2, 26, 50, 51])
def test_videos_up_to_one_window_get_one_window(latent_frames):
    plan = plan_flashportrait_windows(latent_frames)
    assert plan.latent_frames == latent_frames
    assert [(w.start, w.end, w.overlap) for w in plan.windows] == [(0, latent_frames, 0)]


def test_one_frame_longer_than_a_window_overlaps_by_50():
    plan = plan_flashportrait_windows(52)
    assert [(w.start, w.end, w.overlap) for w in plan.windows] == [(0, 51, 0), (1, 52, 50)]
    assert plan.weights(plan.windows[1])[0] == 0 and plan.weights(plan.windows[1])[-1] == 1


def test_stableavatar_plan_is_unchanged_for_short_videos():
    from avatarcli.sampling.windows import plan_windows

    plan = plan_windows(7)
    assert plan.latent_frames == 21 and [(w.start, w.end) for w in plan.windows] == [(0, 21)]


@pytest.mark.parametrize("driving_frames", [1, 2, 3, 4, 5, 8, 200, 201, 202])
def test_driving_frames_map_onto_pixel_frames_keeping_count_and_timing(driving_frames):
    features = torch.arange(driving_frames, dtype=torch.float32)[None, :, None].expand(1, -1, 554)
    pixel = pixel_features_for_driving(features)
    latent_frames = latent_frames_for_driving(driving_frames)
    assert pixel.shape[1] == 4 * (latent_frames - 1) + 1 >= driving_frames + 1
    assert pixel.shape[1] - driving_frames - 1 < 4  # never a whole latent frame of padding
    kept = pixel[0, output_frames(pixel.shape[1], driving_frames), 0]
    assert torch.equal(kept, torch.arange(driving_frames, dtype=torch.float32))  # output frame k <- driving frame k
    assert pixel[0, 0, 0] == 0 and pixel[0, -1, 0] == driving_frames - 1


def test_group_index_latent_zero_is_its_frame_then_zero_slots():
    index = group_index(3)
    assert torch.equal(index[0, :24], torch.arange(24)) and (index[0, 24:] == -1).all()
    assert torch.equal(index[1], torch.arange(23, 120)) and torch.equal(index[2], torch.arange(119, 216))


@pytest.mark.parametrize("size, expected", [((1000, 750), (720, 544)), ((720, 1280), (416, 720)),
                                            ((512, 512), (720, 720)), ((333, 1000), (240, 720))])
def test_reference_size_scales_the_longer_side_and_rounds_up_to_16(size, expected):
    assert reference_size(*size) == expected


def test_reference_size_explicit_and_max_size():
    assert reference_size(1000, 750, max_size=512) == (512, 384)
    assert reference_size(1000, 750, size=(640, 352)) == (640, 352)
    with pytest.raises(AvatarError, match="multiples of 16"):
        reference_size(1000, 750, size=(650, 352))


def test_resize_portrait_uses_the_reference_size():
    from PIL import Image

    from avatarcli.sampling.flashportrait import resize_portrait

    out = resize_portrait(Image.new("L", (1000, 750), 128))
    assert out.size == (720, 544) and out.mode == "RGB"


def test_guidance_branches():
    assert [(b.prompt, b.ip_scale) for b in ExpressionGuidance().branches] == [("positive", 1.0), ("positive", 0.0)]
    assert [b.prompt for b in ExpressionGuidance(text_scale=3.0).branches] == ["positive", "positive", "negative"]


# ---- memory options -------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_model(tmp_path):
    transformer, encoder = tiny_states(seed=5)
    write_flashportrait_weights(tmp_path, transformer, encoder, wan_config(TINY_SIZE), overlay="all", shards=1)
    return lambda dtype=torch.float32: load_flashportrait_transformer(tmp_path, dtype=dtype)


def tiny_inputs(model, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    frames = 2
    tokens = torch.randn(1, frames, 97, model.config.emo_token_dim, generator=gen).to(dtype)
    return (torch.randn(2, 36, frames, 4, 4, generator=gen).to(dtype), torch.tensor([900.0, 900.0]),
            torch.randn(2, 5, model.config.text_dim, generator=gen).to(dtype),
            torch.randn(2, 257, model.config.image_dim, generator=gen).to(dtype),
            ExpressionConditioning(tokens, (1.0, 0.0)))


@pytest.mark.parametrize("mode", ["model", "group", "sequential"])
def test_offload_modes_attach_hooks_and_keep_the_output(tiny_model, mode, one_thread):
    reference = tiny_model()
    with torch.no_grad():
        expected = reference(*tiny_inputs(reference))
    model = tiny_model()
    placement = place_transformer(model, "cpu", offload=mode, compute_dtype=torch.float32)
    assert has_offload_hooks(model)
    with torch.no_grad():
        out = model(*tiny_inputs(model))
    assert torch.allclose(out, expected, atol=1e-5)
    placement.release()


def test_fp8_storage_keeps_linear_weights_in_fp8_and_computes_in_bf16(tiny_model, one_thread):
    reference = tiny_model(torch.bfloat16)
    with torch.no_grad():
        expected = reference(*tiny_inputs(reference, dtype=torch.bfloat16)).float()
    model = tiny_model(torch.bfloat16)
    placement = place_transformer(model, "cpu", weights_dtype="fp8")
    assert placement.dtype == torch.bfloat16
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert model.blocks[0].attn2.emo_k_proj.weight.dtype == torch.float8_e4m3fn
    assert model.patch_embedding.weight.dtype == torch.bfloat16  # skipped by diffusers' Wan patterns
    with torch.no_grad():
        out = model(*tiny_inputs(model, dtype=torch.bfloat16)).float()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel = (out - expected).norm() / expected.norm()
    assert 0 < rel < 0.2  # fp8 rounding changes the result, but only a little


def test_fast_numerics_reach_flashportraits_blocks_and_head(tiny_model, one_thread):
    from avatarcli.models.wan import FastNumerics, use_numerics

    model = tiny_model(torch.bfloat16)
    inputs = tiny_inputs(model, dtype=torch.bfloat16)
    with torch.no_grad():
        reference = model(*inputs).float()
        use_numerics(model, "fast")
        fast = model(*inputs).float()
    assert model.numerics is FastNumerics and all(block.numerics is FastNumerics for block in model.blocks)
    assert 0 < ((fast - reference).norm() / reference.norm()).item() < 2e-2


def test_library_pieces_compose_from_portrait_and_driving_features_to_frames(tiny, one_thread):
    """Portrait + 7 driving frames -> resized portrait, prompt, CLIP, I2V condition, denoised latents, 7 frames."""
    from PIL import Image

    from avatarcli.decode.stream import StreamingDecoder
    from avatarcli.features.image import clip_features, reference_condition
    from avatarcli.features.text import encode_prompts
    from avatarcli.sampling.flashportrait import resize_portrait

    portrait = resize_portrait(Image.new("RGB", (90, 60), (200, 120, 90)), max_size=64)
    width, height = portrait.size
    driving_frames = 7
    latent_frames = latent_frames_for_driving(driving_frames)
    plan = plan_flashportrait_windows(latent_frames)
    window_frames = plan.window_frames
    model = tiny.transformer
    with torch.no_grad():
        text = encode_prompts(tiny.text_encoder, tiny.tokenizer, ["the girl is singing"],
                              text_len=model.config.text_len)
        image = clip_features(tiny.image_encoder, portrait, width, height)
        condition = reference_condition(tiny.vae, portrait, width, height, num_frames=4 * (window_frames - 1) + 1)
        features = pixel_features_for_driving(torch.randn(1, driving_frames, 554))
        steps = 2
        denoiser = FlashPortraitDenoiser(
            model, ExpressionGuidance(), positive_text=text, negative_text=None, image_tokens=image,
            condition=condition,
            window_tokens=lambda win: window_expression_tokens(tiny.portrait_encoder, features, win),
            sigmas=flow_sigmas(steps))
        noise = torch.randn(1, 16, latent_frames, height // 8, width // 8)
        decoder = StreamingDecoder(tiny.vae)
        frames = [decoder.push(c.latents) for c in sample_streaming(plan, flow_sigmas(steps),
                                                                    lambda s, e: noise[:, :, s:e], denoiser)]
    video = [f for chunk in frames for f in chunk]
    kept = video[output_frames(len(video), driving_frames)]
    assert len(video) == 4 * (latent_frames - 1) + 1 and len(kept) == driving_frames
    assert kept[0].shape == (height, width, 3)
