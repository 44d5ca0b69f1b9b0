"""Numerical parity with FlashPortrait's 4-step path (golden vectors, see the fixture's README.md).

Tiny video decoder (TAEHV, built from the fixture's weight recipe and loaded through the strict loader), the
step-distill schedule and update, and the step-distill LoRA merge. The fixture root is AVATARCLI_GOLDEN (default:
tests/golden); every size is read from config.json and the tensors, so any fixture set in this format works.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from golden_root import golden_root
import torch
from safetensors.torch import load_file

from avatarcli.decode.stream import video_to_uint8
from avatarcli.decode.tiny import TinyStreamingDecoder
from avatarcli.errors import CheckpointError
from avatarcli.loading.lora import merge_lora, parse_lora
from avatarcli.loading.taehv import config_from_state_dict, load_tiny_decoder
from avatarcli.sampling.sampler import sample_joint, sample_streaming
from avatarcli.sampling.schedule import timesteps
from avatarcli.sampling.step_distill import step_distill_sigmas, step_distill_step
from avatarcli.sampling.windows import plan_windows
from avatarcli.testing.flashportrait_turbo import tae_key_shapes

GOLDEN = golden_root()
ROOT = GOLDEN / "flashportrait_turbo"
TAE_ATOL = 1e-5
STEP_ATOL = 1e-6
LORA_ATOL = 1e-6


def splitmix64_uniform(stream: int, count: int) -> np.ndarray:
    """u_i = splitmix64((stream << 32) + i) >> 11, scaled to [0, 1) (flashportrait_face/README.md), in float64."""
    with np.errstate(over="ignore"):
        z = (np.uint64(stream) << np.uint64(32)) + np.arange(count, dtype=np.uint64)
        z = z * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def tae_weights(config: dict) -> dict[str, torch.Tensor]:
    """The fixture's TAEHV weights (README: biases 0.1 s, weights s sqrt(3/fan_in); last layer kept off the clamp)."""
    state = {}
    keys = config["tae_state_dict_keys_sorted"]
    last = max((k for k in keys if k.startswith("decoder.")), key=lambda k: int(k.split(".")[1])).rsplit(".", 1)[0]
    for j, key in enumerate(sorted(keys)):
        shape = tuple(keys[key])
        s = 2 * splitmix64_uniform(config["tae_weight_stream_base"] + j, int(np.prod(shape))).reshape(shape) - 1
        fan_in = int(np.prod(shape[1:]))
        if key.endswith("bias"):
            value = 0.1 * s + (0.5 if key.startswith(last + ".") else 0.0)
        else:
            value = s * np.sqrt(3 / fan_in) * (0.25 if key.startswith(last + ".") else 1.0)
        state[key] = torch.from_numpy(value.astype(np.float32))
    return state


@pytest.fixture(scope="module")
def golden():
    assert ROOT.is_dir(), f"golden fixtures not found at {ROOT} (set AVATARCLI_GOLDEN)"
    return dict(
        config=json.loads((ROOT / "config.json").read_text()),
        inputs=load_file(str(ROOT / "inputs.safetensors")),
        outputs=load_file(str(ROOT / "outputs.safetensors")),
        lora=load_file(str(ROOT / "lora.safetensors")),
    )


@pytest.fixture(scope="module")
def fast_vae_file(golden, tmp_path_factory) -> Path:
    """The recipe's weights written as the published file is: one pickled state dict, encoder and decoder."""
    path = tmp_path_factory.mktemp("turbo") / "fast_vae.pth"
    torch.save(tae_weights(golden["config"]), path)
    return path


@pytest.fixture(scope="module")
def tiny_decoder(fast_vae_file):
    return load_tiny_decoder(fast_vae_file)


def tae_cases(golden) -> list[tuple[torch.Tensor, torch.Tensor]]:
    i, o = golden["inputs"], golden["outputs"]
    names = sorted(k.removeprefix("tae.latents_") for k in i if k.startswith("tae.latents_"))
    assert names, "fixture has no tae.latents_* inputs"
    return [(i[f"tae.latents_{n}"], o[f"tae.frames_{n}"]) for n in names]


# ---- tiny video decoder -----------------------------------------------------------------------------------------


def test_tiny_decoder_reproduces_the_reference_frames(golden, tiny_decoder, one_thread):
    for latents, frames in tae_cases(golden):
        decoded = tiny_decoder.decode_video(latents)
        assert decoded.shape == frames.shape
        torch.testing.assert_close(decoded, frames, atol=TAE_ATOL, rtol=0)


@pytest.mark.parametrize("split", ["ones", "first-alone", "uneven", "halves"])
def test_tiny_decoder_streamed_in_chunks_reproduces_the_reference_frames(golden, tiny_decoder, split, one_thread):
    for latents, frames in tae_cases(golden):
        count = latents.shape[2]
        sizes = {"ones": [1] * count, "first-alone": [1, count - 1], "uneven": [2, 1, count - 3],
                 "halves": [count // 2, count - count // 2]}[split]
        sizes = [s for s in sizes if s > 0]
        decoder, pieces, start = TinyStreamingDecoder(tiny_decoder), [], 0
        for size in sizes:
            pieces.append(decoder.push_video(latents[:, :, start : start + size]))
            start += size
        expected_counts = [4 * s for s in sizes]
        expected_counts[0] -= 3  # the video's first latent frame gives one frame
        assert [p.shape[2] for p in pieces] == expected_counts
        torch.testing.assert_close(torch.cat(pieces, dim=2), frames, atol=TAE_ATOL, rtol=0)


def test_tiny_decoder_uint8_stream_matches_the_reference_frames(golden, tiny_decoder, one_thread):
    latents, frames = tae_cases(golden)[-1]
    decoder = TinyStreamingDecoder(tiny_decoder)
    streamed = np.concatenate([decoder.push(latents[:, :, :1]), decoder.push(latents[:, :, 1:])])
    expected = video_to_uint8(frames)
    assert streamed.shape == expected.shape and streamed.dtype == np.uint8
    # Rounding to 8 bits may differ by one step where a float sits on a .5 boundary; nowhere more.
    assert np.abs(streamed.astype(int) - expected.astype(int)).max() <= 1
    assert len(np.unique(streamed)) > 20


def test_tiny_file_layout_is_the_reference_module_layout(golden):
    # avatarcli.testing writes tiny fast_vae.pth files from this key list; at the fixture's sizes it is the reference's.
    expected = {k: tuple(v) for k, v in golden["config"]["tae_state_dict_keys_sorted"].items()}
    decoder = {k: v for k, v in expected.items() if k.startswith("decoder.")}
    config = config_from_state_dict({k: torch.empty(v, device="meta") for k, v in decoder.items()})
    encoder_width = expected["encoder.0.weight"][0]
    assert tae_key_shapes(config, encoder_width) == expected


def test_strict_loader_drops_only_the_encoder(golden, fast_vae_file, tmp_path):
    state = torch.load(fast_vae_file, weights_only=True)
    decoder_only = {k: v for k, v in state.items() if k.startswith("decoder.")}
    torch.save(decoder_only, tmp_path / "decoder_only.pth")
    loaded = load_tiny_decoder(tmp_path / "decoder_only.pth")
    assert set(loaded.state_dict()) == set(decoder_only)


def test_strict_loader_names_a_missing_decoder_key(fast_vae_file, tmp_path):
    state = torch.load(fast_vae_file, weights_only=True)
    del state["decoder.10.conv.2.bias"]
    torch.save(state, tmp_path / "fast_vae.pth")
    with pytest.raises(CheckpointError, match=r"1 missing: decoder\.10\.conv\.2\.bias"):
        load_tiny_decoder(tmp_path / "fast_vae.pth")


def test_strict_loader_names_an_unexpected_key(fast_vae_file, tmp_path):
    state = torch.load(fast_vae_file, weights_only=True)
    state["decoder.3.skip.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "fast_vae.pth")
    with pytest.raises(CheckpointError, match=r"1 unexpected: decoder\.3\.skip\.weight"):
        load_tiny_decoder(tmp_path / "fast_vae.pth")


def test_strict_loader_names_a_mis_shaped_key(fast_vae_file, tmp_path):
    state = torch.load(fast_vae_file, weights_only=True)
    state["decoder.9.conv.4.weight"] = state["decoder.9.conv.4.weight"][:, :, :1]
    torch.save(state, tmp_path / "fast_vae.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatch: decoder\.9\.conv\.4\.weight"):
        load_tiny_decoder(tmp_path / "fast_vae.pth")


def test_strict_loader_rejects_a_file_without_a_decoder(fast_vae_file, tmp_path):
    state = torch.load(fast_vae_file, weights_only=True)
    torch.save({k: v for k, v in state.items() if k.startswith("encoder.")}, tmp_path / "encoder_only.pth")
    with pytest.raises(CheckpointError, match="decoder.1.weight"):
        load_tiny_decoder(tmp_path / "encoder_only.pth")


def test_strict_loader_refuses_a_pickle_that_is_not_weights_only(tmp_path):
    torch.save({"decoder.1.weight": torch.zeros(1), "hook": print}, tmp_path / "fast_vae.pth")
    with pytest.raises(CheckpointError, match="refusing to read .*builtins.print"):
        load_tiny_decoder(tmp_path / "fast_vae.pth")


# ---- step-distill schedule and update ---------------------------------------------------------------------------


def test_step_distill_sigmas_and_timesteps_are_exact(golden):
    config, o = golden["config"], golden["outputs"]
    sigmas = step_distill_sigmas(config["denoising_step_list"], shift=config["shift"])
    assert sigmas.dtype == torch.float32
    assert torch.equal(sigmas, o["sched.sigmas"])
    assert torch.equal(timesteps(sigmas), o["sched.timesteps"])


def test_step_distill_steps_match_the_reference(golden):
    config, i, o = golden["config"], golden["inputs"], golden["outputs"]
    sigmas = step_distill_sigmas(config["denoising_step_list"], shift=config["shift"])
    x = i["sched.x0"]
    for step in range(len(sigmas) - 1):
        x = step_distill_step(x, i[f"sched.v{step}"], float(sigmas[step]), float(sigmas[step + 1]))
        torch.testing.assert_close(x, o[f"sched.x_after_step{step}"], atol=STEP_ATOL, rtol=0)


@pytest.mark.parametrize("order", ["joint", "streaming"])
def test_samplers_take_the_step_distill_update(golden, order):
    # One window over the fixture's latent frames, the reference velocities as the "denoiser".
    config, i, o = golden["config"], golden["inputs"], golden["outputs"]
    sigmas = step_distill_sigmas(config["denoising_step_list"], shift=config["shift"])
    x0 = i["sched.x0"]
    frames = x0.shape[2]
    plan = plan_windows(frames, window_frames=frames, overlap=1)

    def denoise(window, step, latents):
        return i[f"sched.v{step}"][:, :, window.start : window.end]

    if order == "joint":
        result = sample_joint(plan, sigmas, x0, denoise, update=step_distill_step)
    else:
        chunks = sample_streaming(plan, sigmas, lambda s, e: x0[:, :, s:e], denoise, update=step_distill_step)
        result = torch.cat([c.latents for c in chunks], dim=2)
    final = o[f"sched.x_after_step{len(sigmas) - 2}"]
    torch.testing.assert_close(result, final, atol=STEP_ATOL, rtol=0)


# ---- step-distill LoRA merge ------------------------------------------------------------------------------------


def _strengths() -> list[float]:
    config = ROOT / "config.json"
    return json.loads(config.read_text())["lora_strengths"] if config.is_file() else [1.0, 0.7]


def lora_case(golden, strength: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    inputs, outputs = golden["inputs"], golden["outputs"]
    before = {k.removeprefix("lora.before."): v for k, v in inputs.items() if k.startswith("lora.before.")}
    prefix = f"lora.after_s{strength}."
    after = {k.removeprefix(prefix): v for k, v in outputs.items() if k.startswith(prefix)}
    assert before and set(after) == set(before)
    return before, after


def lora_targets(golden) -> set[str]:
    """The parameters a LoRA term names (pairs -> .weight, diff -> .weight, diff_b -> .bias, diff_m -> .modulation)."""
    pairs, diffs = parse_lora(golden["lora"])
    return {f"{p.layer}.weight" for p in pairs} | {d.targets[0] for d in diffs}


def consistent(golden, before, after) -> bool:
    """Whether a stored case was made from `lora.before`: a merge changes no parameter that no LoRA key names."""
    return all(torch.equal(after[k], before[k]) for k in set(before) - lora_targets(golden))


@pytest.mark.parametrize("strength", _strengths())
def test_lora_merge_matches_the_reference(golden, strength):
    """Our merge equals the reference's output at every stored strength. The public set's 0.7 case was not made from
    its stored `lora.before` (a bias no LoRA key names differs, and so does every other tensor), so for a case like
    that the reference's own update at a consistent strength, scaled, is the expectation instead."""
    before, after = lora_case(golden, strength)
    merged = merge_lora(before, golden["lora"], strength)
    if consistent(golden, before, after):
        for key in before:
            torch.testing.assert_close(merged[key], after[key], atol=LORA_ATOL, rtol=0, msg=key)
        return
    usable = [s for s in _strengths() if consistent(golden, *lora_case(golden, s))]
    assert usable, "no stored LoRA case was made from lora.before"
    _, reference = lora_case(golden, usable[0])
    for key in before:
        expected = before[key] + (strength / usable[0]) * (reference[key] - before[key])
        torch.testing.assert_close(merged[key], expected, atol=LORA_ATOL * 10, rtol=0, msg=key)


def test_lora_merge_scales_the_reference_update_by_strength(golden):
    # The reference update at strength 1 (after_s1.0 - before), scaled: W + s * delta for every strength.
    before, after_1 = lora_case(golden, 1.0)
    for strength in (0.7, 0.25, -1.0):
        merged = merge_lora(before, golden["lora"], strength)
        for key in before:
            expected = before[key] + strength * (after_1[key] - before[key])
            torch.testing.assert_close(merged[key], expected, atol=LORA_ATOL * 10, rtol=0, msg=key)


def test_lora_merge_leaves_the_input_state_untouched(golden):
    before, _ = lora_case(golden, 1.0)
    copies = {k: v.clone() for k, v in before.items()}
    merge_lora(before, golden["lora"], 1.0)
    assert all(torch.equal(before[k], copies[k]) for k in before)


@pytest.mark.parametrize("key", ["diffusion_model.blocks.0.self_attn.q.lora_mid.weight",
                                 "diffusion_model.blocks.0.self_attn.q.scale",
                                 "blocks.0.self_attn.q.diff_b"])
def test_unknown_lora_key_fails_naming_it(golden, key):
    before, _ = lora_case(golden, 1.0)
    lora = {**golden["lora"], key: torch.zeros(8)}
    with pytest.raises(CheckpointError, match=re.escape(key)):
        merge_lora(before, lora, 1.0)


@pytest.mark.parametrize("key", ["diffusion_model.blocks.7.ffn.2.diff_b", "diffusion_model.blocks.0.cross_attn.q.diff",
                                 "diffusion_model.blocks.1.diff_m"])
def test_lora_key_without_a_target_fails_naming_it(golden, key):
    # The reference skips these silently.
    before, _ = lora_case(golden, 1.0)
    lora = {**golden["lora"], key: torch.zeros(8)}
    with pytest.raises(CheckpointError, match=re.escape(key)):
        merge_lora(before, lora, 1.0)


def test_half_a_lora_pair_fails_naming_it(golden):
    before, _ = lora_case(golden, 1.0)
    lora = {k: v for k, v in golden["lora"].items() if not k.endswith("head.head.lora_up.weight")}
    with pytest.raises(CheckpointError, match=re.escape("diffusion_model.head.head.lora_down.weight")):
        merge_lora(before, lora, 1.0)


def test_lora_diff_of_the_wrong_shape_fails_naming_it(golden):
    before, _ = lora_case(golden, 1.0)
    lora = {**golden["lora"], "diffusion_model.blocks.0.norm3.diff": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=re.escape("diffusion_model.blocks.0.norm3.diff")):
        merge_lora(before, lora, 1.0)
