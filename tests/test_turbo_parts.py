"""FlashPortrait 4-step parts beyond the golden vectors: the LoRA merge into our diffusers-named model, the decoder
choice, the tiny published-layout files, and the step-distill update inside the window samplers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatarcli.decode.decoders import DECODERS, streaming_decoder
from avatarcli.decode.tiny import TinyStreamingDecoder
from avatarcli.errors import CheckpointError
from avatarcli.loading.lora import FAST_LORA_FILE, merge_lora, merge_lora_into_model, read_lora
from avatarcli.loading.taehv import FAST_VAE_FILE, load_tiny_decoder
from avatarcli.loading.transformer import build_transformer, diffusers_key
from avatarcli.models.taehv import TAEHVConfig, TAEHVDecoder
from avatarcli.sampling.sampler import sample_joint, sample_streaming
from avatarcli.sampling.schedule import euler_step, flow_sigmas
from avatarcli.sampling.step_distill import schedule_for, step_distill_sigmas, step_distill_step
from avatarcli.sampling.windows import plan_windows
from avatarcli.testing import TINY_STABLEAVATAR
from avatarcli.testing.flashportrait_turbo import (
    TINY_TAEHV,
    tae_key_shapes,
    write_tiny_fast_lora,
    write_tiny_fast_vae,
    write_tiny_turbo_files,
)
from avatarcli.testing.stableavatar import original_key_shapes, random_state_dict, wan_config

# ---- LoRA merge into the diffusers-named transformer -----------------------------------------------------------


@pytest.fixture(scope="module")
def original_state():
    return random_state_dict(TINY_STABLEAVATAR, seed=3)


@pytest.fixture(scope="module")
def lora(original_state, tmp_path_factory):
    shapes = {k: tuple(v.shape) for k, v in original_state.items()}
    path = write_tiny_fast_lora(tmp_path_factory.mktemp("lora") / "fast_lora_rank64.safetensors", shapes, seed=5)
    return read_lora(path)


def build(state):
    return build_transformer(state, wan_config(TINY_STABLEAVATAR), dtype=torch.float32)


def test_tiny_turbo_files_load_and_merge_strictly(original_state, tmp_path):
    shapes = {k: tuple(v.shape) for k, v in original_state.items()}
    folder = write_tiny_turbo_files(tmp_path, shapes)
    assert load_tiny_decoder(folder / FAST_VAE_FILE).config == TINY_TAEHV
    model = build(original_state)
    assert merge_lora_into_model(model, read_lora(folder / FAST_LORA_FILE), 1.0) > 0


def test_tiny_lora_covers_every_kind_of_term(lora):
    kinds = {key.rsplit(".", 1)[-1] if "lora_" not in key else key.rsplit(".", 2)[-2] for key in lora}
    assert kinds == {"lora_down", "lora_up", "diff", "diff_b", "diff_m"}
    assert all(key.startswith("diffusion_model.") for key in lora)
    assert not any("vocal" in key for key in lora)  # only the Wan layers the step-distill LoRA adapts


def test_merge_into_the_model_equals_merging_the_original_checkpoint(original_state, lora):
    # Names through the checkpoint converter: norm3 -> norm2, modulation -> scale_shift_table, head.head -> proj_out.
    expected = build(merge_lora(original_state, lora, 0.7)).state_dict()
    model = build(original_state)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    merged_terms = merge_lora_into_model(model, lora, 0.7)

    assert merged_terms == len([k for k in lora if "lora_up" not in k])
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "blocks.0.norm2.weight" in changed and "blocks.1.scale_shift_table" in changed
    assert "proj_out.weight" in changed and "blocks.0.attn2.add_k_proj.weight" in changed
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_merge_into_a_bfloat16_model_rounds_once(original_state, lora):
    model = build_transformer(original_state, wan_config(TINY_STABLEAVATAR), dtype=torch.bfloat16)
    weight = model.blocks[0].attn1.to_q.weight
    start = weight.detach().float().clone()
    merge_lora_into_model(model, lora, 1.0)
    down = lora["diffusion_model.blocks.0.self_attn.q.lora_down.weight"]
    up = lora["diffusion_model.blocks.0.self_attn.q.lora_up.weight"]
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight.float(), (start + up @ down).to(torch.bfloat16).float())


def test_a_failing_merge_changes_nothing(original_state, lora):
    model = build(original_state)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {**lora, "diffusion_model.blocks.9.self_attn.q.diff_b": torch.zeros(TINY_STABLEAVATAR["dim"])}
    with pytest.raises(CheckpointError, match=r"diffusion_model\.blocks\.9\.self_attn\.q\.diff_b"):
        merge_lora_into_model(model, bad, 1.0, source="fast_lora_rank64.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_lora_pair_of_the_wrong_shape_fails_naming_it(original_state, lora):
    key = "diffusion_model.blocks.0.ffn.0.lora_down.weight"
    bad = {**lora, key: torch.zeros(4, 7)}
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        merge_lora_into_model(build(original_state), bad, 1.0)


def test_alpha_equal_to_the_rank_is_accepted_any_other_is_an_error(original_state, lora):
    alpha_key = "diffusion_model.head.head.alpha"
    rank = lora["diffusion_model.head.head.lora_down.weight"].shape[0]
    same = merge_lora(original_state, {**lora, alpha_key: torch.tensor(float(rank))}, 1.0)
    assert torch.equal(same["head.head.weight"], merge_lora(original_state, lora, 1.0)["head.head.weight"])
    with pytest.raises(CheckpointError, match=alpha_key.replace(".", r"\.")):
        merge_lora(original_state, {**lora, alpha_key: torch.tensor(2.0 * rank)}, 1.0)


def test_mixed_pair_naming_is_an_error(original_state, lora):
    bad = dict(lora)
    bad["diffusion_model.head.head.lora_B.weight"] = bad.pop("diffusion_model.head.head.lora_up.weight")
    with pytest.raises(CheckpointError, match="head.head"):
        merge_lora(original_state, bad, 1.0)


def test_diffusers_key_uses_the_checkpoint_converter():
    assert diffusers_key("blocks.3.norm3.weight") == "blocks.3.norm2.weight"
    assert diffusers_key("blocks.3.modulation") == "blocks.3.scale_shift_table"
    assert diffusers_key("blocks.3.cross_attn.k_img.weight") == "blocks.3.attn2.add_k_proj.weight"
    assert diffusers_key("head.head.bias") == "proj_out.bias"
    shapes = original_key_shapes(TINY_STABLEAVATAR)
    model_keys = set(build(random_state_dict(TINY_STABLEAVATAR)).state_dict())
    assert {diffusers_key(k) for k in shapes if "vocal" not in k} <= model_keys


# ---- tiny decoder: published-layout file, streaming, the decoder choice -----------------------------------------


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    return load_tiny_decoder(write_tiny_fast_vae(tmp_path_factory.mktemp("tae") / FAST_VAE_FILE))


def test_tiny_fast_vae_file_holds_encoder_and_decoder_in_the_published_layout(tmp_path):
    path = write_tiny_fast_vae(tmp_path / FAST_VAE_FILE)
    state = torch.load(path, weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == tae_key_shapes(TINY_TAEHV, encoder_width=8)
    assert any(k.startswith("encoder.") for k in state)
    loaded = load_tiny_decoder(path)
    assert loaded.config == TINY_TAEHV


def test_published_size_decoder_layout_is_the_key_list_without_the_encoder():
    expected = {k: v for k, v in tae_key_shapes(TAEHVConfig()).items() if k.startswith("decoder.")}
    with torch.device("meta"):
        model = TAEHVDecoder()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


@pytest.mark.parametrize("per_call", [1, 4, 16])
@pytest.mark.parametrize("sizes", [[1, 1, 1, 1, 1, 1], [2, 4], [1, 5], [6]], ids=str)
def test_tiny_stream_equals_one_decode(tiny_vae, sizes, per_call, one_thread):
    latents = torch.randn(1, 16, 6, 4, 4, generator=torch.Generator().manual_seed(2))
    whole = tiny_vae.decode_video(latents)
    decoder, pieces, start = TinyStreamingDecoder(tiny_vae, latent_frames_per_call=per_call), [], 0
    for size in sizes:
        pieces.append(decoder.push_video(latents[:, :, start : start + size]))
        start += size
    torch.testing.assert_close(torch.cat(pieces, dim=2), whole, atol=1e-5, rtol=0)  # conv kernels differ by batch
    assert whole.shape == (1, 3, 21, 32, 32)


def test_tiny_stream_carries_memory_between_chunks(tiny_vae, one_thread):
    # Guards the test above: a wrong history changes later frames.
    latents = torch.randn(1, 16, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    decoder = TinyStreamingDecoder(tiny_vae)
    decoder.push_video(torch.zeros_like(latents[:, :, :2]))
    tail = decoder.push_video(latents[:, :, 2:])
    assert not torch.allclose(tail, tiny_vae.decode_video(latents)[:, :, 5:], atol=1e-3)


@pytest.mark.parametrize("cut", [0, 1, 3])
def test_tiny_stream_resumes_from_its_saved_state(tiny_vae, cut, one_thread, tmp_path):
    """A resumed run (animate --resume with the tiny decoder) continues the stream exactly."""
    latents = torch.randn(1, 16, 5, 4, 4, generator=torch.Generator().manual_seed(5))
    straight = TinyStreamingDecoder(tiny_vae)  # the same chunks without the interruption
    whole = torch.cat([straight.push_video(latents[:, :, :cut]), straight.push_video(latents[:, :, cut:])], dim=2)
    first = TinyStreamingDecoder(tiny_vae)
    head = first.push_video(latents[:, :, :cut])
    torch.save(first.state_dict(), tmp_path / "d.pt")
    second = TinyStreamingDecoder(tiny_vae)
    second.load_state_dict(torch.load(tmp_path / "d.pt", weights_only=True))
    assert second.started == (cut > 0)
    torch.testing.assert_close(torch.cat([head, second.push_video(latents[:, :, cut:])], dim=2), whole, atol=0, rtol=0)


def test_tiny_stream_close_starts_a_new_video(tiny_vae, one_thread):
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    decoder = TinyStreamingDecoder(tiny_vae)
    first = list(decoder.decode(iter([latents[:, :, :1], latents[:, :, 1:]])))
    assert not decoder.started
    again = list(decoder.decode(iter([latents])))
    assert np.array_equal(np.concatenate(first), again[0])


def test_both_decoders_give_the_same_frame_counts_and_sizes(tiny_vae, one_thread):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    shapes = {}
    for kind in DECODERS:
        decoder = streaming_decoder(kind, vae=vae, tiny_vae=tiny_vae)
        pieces = [decoder.push(latents[:, :, :1]), decoder.push(latents[:, :, 1:])]
        shapes[kind] = [piece.shape for piece in pieces]
        assert all(piece.dtype == np.uint8 for piece in pieces)
    assert shapes["full"] == shapes["tiny"] == [(1, 32, 32, 3), (8, 32, 32, 3)]


def test_unknown_or_unavailable_decoder_is_an_error(tiny_vae):
    with pytest.raises(ValueError, match="full, tiny"):
        streaming_decoder("taesd", tiny_vae=tiny_vae)
    with pytest.raises(ValueError, match="fast_vae.pth"):
        streaming_decoder("tiny")


def test_tiny_stream_rejects_latents_of_the_wrong_shape(tiny_vae):
    with pytest.raises(ValueError, match=r"\[1, 16, F, h, w\]"):
        TinyStreamingDecoder(tiny_vae).push(torch.zeros(1, 8, 1, 4, 4))


# ---- step-distill schedule and update in the samplers ----------------------------------------------------------


def test_step_distill_update_is_the_euler_step_up_to_rounding():
    x, v = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    for sigma, sigma_next in [(1.0, 0.9375), (0.8333, 0.625), (0.625, 0.0)]:
        torch.testing.assert_close(step_distill_step(x, v, sigma, sigma_next), euler_step(x, v, sigma, sigma_next))


def test_last_step_returns_the_predicted_clean_sample():
    x, v = torch.randn(5), torch.randn(5)
    assert torch.equal(step_distill_step(x, v, 0.625, 0.0), x - 0.625 * v)


def test_step_distill_step_list_is_validated():
    for bad in ([], [750, 1000], [1000, 1000], [1000, 0], [1000, 1001]):
        with pytest.raises(ValueError):
            step_distill_sigmas(bad)
    assert step_distill_sigmas([1000, 500], shift=1.0).tolist() == [1.0, 0.5, 0.0]


def test_streaming_sampler_equals_the_joint_loop_with_the_step_distill_update():
    plan = plan_windows(13, window_frames=5, overlap=2, blend="uniform")
    sigmas = step_distill_sigmas()
    noise = torch.randn(1, 4, plan.latent_frames, 2, 3, generator=torch.Generator().manual_seed(1))
    mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))

    def denoise(window, step, x):
        return torch.tanh(torch.einsum("bcfhw,cd->bdfhw", x, mix)) * (1 + 0.1 * window.index) + 0.05 * step

    calls = []

    def update(sample, velocity, sigma, sigma_next):
        calls.append((sigma, sigma_next))
        return step_distill_step(sample, velocity, sigma, sigma_next)

    joint = sample_joint(plan, sigmas, noise, denoise, update=update)
    streamed = torch.cat([c.latents for c in sample_streaming(plan, sigmas, lambda s, e: noise[:, :, s:e], denoise,
                                                               update=update)], dim=2)
    assert torch.equal(streamed, joint)
    pairs = list(zip(sigmas[:-1].tolist(), sigmas[1:].tolist()))
    assert sorted(calls) == sorted(pairs * len(plan.windows) * 2)  # every window-step of both orders used it


def test_schedule_choice_is_one_call():
    sigmas, update = schedule_for("step_distill", 4)
    assert update is step_distill_step and torch.equal(sigmas, step_distill_sigmas())
    sigmas, update = schedule_for("flow", 30)
    assert update is euler_step and torch.equal(sigmas, flow_sigmas(30))
    with pytest.raises(ValueError, match="4 steps"):
        schedule_for("step_distill", 8)
    with pytest.raises(ValueError, match="flow, step_distill"):
        schedule_for("lcm", 4)
