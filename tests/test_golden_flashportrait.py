"""Numerical parity with the FlashPortrait reference implementation (golden vectors, see their README).

The fixture root is AVATARCLI_GOLDEN (default: tests/golden). Every size and setting is read from the fixture's
config.json and tensor shapes. The weights go through the real loading path: the fixture's state dict is written in
the published layout (transformer.pt overlay with the fine-tuned attention weights and the expression projections,
the rest in 7 base shards that hold different values for the attention weights) and loaded from there.
The face-geometry cases (`align.*`) belong to the driving-video front end and are tested there.
"""

from __future__ import annotations

import json
import re

import pytest
from golden_root import golden_root
import torch
from safetensors.torch import load_file

from avatarcli.loading.flashportrait import load_flashportrait_transformer, load_portrait_encoder
from avatarcli.models.flashportrait import ExpressionConditioning, group_index, group_tokens
from avatarcli.sampling.flashportrait import (
    ExpressionGuidance,
    FlashPortraitDenoiser,
    plan_flashportrait_windows,
    window_expression_tokens,
)
from avatarcli.sampling.sampler import sample_joint, sample_streaming
from avatarcli.sampling.schedule import euler_step, flow_sigmas, timesteps
from avatarcli.testing.flashportrait import write_flashportrait_weights

GOLDEN = golden_root()
ROOT = GOLDEN / "flashportrait"
ATOL = 1e-4
E2E_ATOL = 1e-3


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> bool:
    return torch.allclose(actual.double(), expected.double(), atol=atol, rtol=atol)


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


@pytest.fixture(scope="module")
def golden():
    assert ROOT.is_dir(), f"golden fixtures not found at {ROOT} (set AVATARCLI_GOLDEN)"
    return dict(
        config=json.loads((ROOT / "config.json").read_text()),
        state=load_file(str(ROOT / "state_dict.safetensors")),
        inputs=load_file(str(ROOT / "inputs.safetensors")),
        outputs=load_file(str(ROOT / "outputs.safetensors")),
    )


@pytest.fixture(scope="module")
def weights_dir(golden, tmp_path_factory):
    c = golden["config"]["transformer"]
    wan_config = {"_class_name": "WanModel", "model_type": c["model_type"], "dim": c["dim"], "eps": c["eps"],
                  "ffn_dim": c["ffn_dim"], "freq_dim": c["freq_dim"], "in_dim": c["in_dim"],
                  "num_heads": c["num_heads"], "num_layers": c["num_layers"], "out_dim": c["out_dim"],
                  "text_len": c["text_len"]}
    state = golden["state"]
    transformer = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
    encoder = {k.removeprefix("portrait_encoder."): v for k, v in state.items() if k.startswith("portrait_encoder.")}
    return write_flashportrait_weights(tmp_path_factory.mktemp("flashportrait"), transformer, encoder, wan_config)


@pytest.fixture(scope="module")
def model(weights_dir):
    return load_flashportrait_transformer(weights_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def encoder(golden, weights_dir):
    heads = golden["config"]["portrait_encoder"]["mouth_proj_model"]["heads"]
    assert heads == golden["config"]["portrait_encoder"]["emo_proj_model"]["heads"]
    return load_portrait_encoder(weights_dir, resampler_heads=heads)


def test_loaded_model_has_the_fixture_configuration(golden, model, encoder):
    c, pe = golden["config"]["transformer"], golden["config"]["portrait_encoder"]
    assert model.config.num_layers == c["num_layers"]
    assert model.config.num_attention_heads * model.config.attention_head_dim == c["dim"]
    assert model.config.text_len == c["text_len"]
    assert model.config.emo_token_dim == pe["token_dim"]
    assert encoder.tokens_per_frame == pe["tokens_per_pixel_frame"]


# ---- portrait encoder + grouping ----------------------------------------------------------------------------------


def test_group_index_matches_reference(golden):
    o, pe = golden["outputs"], golden["config"]["portrait_encoder"]
    expected = o["pe.group_index"]
    index = group_index(expected.shape[0], pe["tokens_per_pixel_frame"])
    assert index.shape[1] == pe["tokens_per_latent_frame"]
    assert torch.equal(index, expected)
    assert torch.equal((index >= 0).sum(1), o["pe.k_lens"])


def test_encoder_and_grouping_match_reference(golden, encoder):
    feats = golden["inputs"]["pe.head_emo_feat"]
    expected = golden["outputs"]["pe.emo_proj"]
    with torch.no_grad():
        tokens = encoder(feats)
    assert tokens.shape[1] == feats.shape[1] * encoder.tokens_per_frame
    grouped = group_tokens(tokens, expected.shape[1], encoder.tokens_per_frame)
    assert close(grouped, expected), max_err(grouped, expected)


# ---- one transformer forward: both branches, the optional third, guided, Euler step ---------------------------------


@pytest.fixture(scope="module")
def forward(golden, model):
    """One batched forward of the three branches [emo on, emo off, negative text emo off] with hooks on block 0."""
    i, o, cfg = golden["inputs"], golden["outputs"], golden["config"]["pipeline"]
    guidance = ExpressionGuidance(emo_scale=cfg["emo_cfg_scale"], text_scale=2.0, ip_scale=cfg["ip_scale"])
    texts = {"positive": i["dit.context"][None], "negative": i["dit.context_neg"][None]}
    text = torch.cat([model.pad_text(texts[b.prompt]) for b in guidance.branches])
    n = len(guidance.branches)
    x = torch.cat([i["dit.x"], i["dit.y"]], 1).expand(n, -1, -1, -1, -1)
    captured = {}
    block = model.blocks[0]
    hooks = [
        block.register_forward_pre_hook(lambda m, a: captured.update(block_in=a[0], context=a[1])),
        block.register_forward_hook(lambda m, a, out: captured.__setitem__("block_out", out)),
        model.condition_embedder.time_proj.register_forward_hook(lambda m, a, out: captured.__setitem__("e0", out)),
        block.attn2.register_forward_pre_hook(lambda m, a: captured.__setitem__("cross_in", a[0])),
    ]
    expression = ExpressionConditioning(o["pe.emo_proj"], tuple(b.ip_scale for b in guidance.branches))
    with torch.no_grad():
        out = model(x, i["dit.t"].expand(n), text, i["dit.clip_fea"].expand(n, -1, -1), expression)
    for h in hooks:
        h.remove()
    return out, captured


def test_transformer_emo_on_matches_reference(golden, forward):
    expected = golden["outputs"]["dit.out.emo_on"]
    assert close(forward[0][0:1], expected), max_err(forward[0][0:1], expected)


def test_transformer_emo_off_matches_reference(golden, forward):
    expected = golden["outputs"]["dit.out.emo_off"]
    assert close(forward[0][1:2], expected), max_err(forward[0][1:2], expected)


def test_transformer_negative_text_branch_matches_reference(golden, forward):
    expected = golden["outputs"]["dit.out.neg_text_emo_off"]
    assert close(forward[0][2:3], expected), max_err(forward[0][2:3], expected)


def test_expression_branch_changes_the_output(forward):
    assert max_err(forward[0][0], forward[0][1]) > 0.1


def test_guided_prediction_and_euler_step_match_reference(golden, forward):
    o, cfg = golden["outputs"], golden["config"]["pipeline"]
    guided = ExpressionGuidance(emo_scale=cfg["emo_cfg_scale"], text_scale=cfg["text_cfg_scale"]).combine(
        forward[0][:2])
    assert close(guided, o["dit.guided"]), max_err(guided, o["dit.guided"])
    step = golden["config"]["forward_test"]["step_index"]
    sigmas = flow_sigmas(cfg["num_inference_steps"], cfg["scheduler"]["shift"])
    x_prev = euler_step(golden["inputs"]["dit.x"], guided, float(sigmas[step]), float(sigmas[step + 1]))
    assert close(x_prev, o["dit.x_prev"]), max_err(x_prev, o["dit.x_prev"])


def test_three_branch_guidance_formula(golden, forward):
    cfg = golden["config"]["pipeline"]
    g = ExpressionGuidance(emo_scale=cfg["emo_cfg_scale"], text_scale=2.0)
    on, off, neg = forward[0][0:1], forward[0][1:2], forward[0][2:3]
    expected = neg + 2.0 * (off - neg) + cfg["emo_cfg_scale"] * (on - off)
    assert torch.allclose(g.combine(forward[0]), expected, atol=1e-6)


# ---- dbg.*: block 0 intermediates -----------------------------------------------------------------------------------


def test_block0_input_time_projection_and_context_match_reference(golden, forward):
    _, cap = forward
    o = golden["outputs"]
    assert close(cap["block_in"][0:1], o["dbg.block0.in"])
    assert close(cap["e0"][0:1].unflatten(1, (6, -1)), o["dbg.e0"])
    assert close(cap["context"][0:1], o["dbg.context_embedded"])


def test_block0_outputs_match_reference(golden, forward):
    _, cap = forward
    o = golden["outputs"]
    assert close(cap["block_out"][0:1], o["dbg.block0.out_emo_on"])
    assert close(cap["block_out"][1:2], o["dbg.block0.out_emo_off"])


def test_block0_nfeb_intermediates_match_reference(golden, model, forward):
    _, cap = forward
    o = golden["outputs"]
    attn = model.blocks[0].attn2
    proc = attn.processor
    with torch.no_grad():
        hidden, context = cap["cross_in"][0:1], cap["context"][0:1]
        q = proc.query(attn, hidden)
        h = proc.text_and_image(attn, q, context)
        k, v = proc.expression_kv(attn, o["pe.emo_proj"])
        e = proc.expression(attn, q, o["pe.emo_proj"])
        from avatarcli.models.flashportrait import normalise_expression

        e_norm = normalise_expression(e, h)
        out = attn.to_out[0](h + golden["config"]["pipeline"]["ip_scale"] * e_norm)
    assert close(q, o["dbg.block0.cross.q"])
    assert close(h, o["dbg.block0.cross.h_text_plus_img"])
    assert close(k, o["dbg.block0.cross.emo_k"]) and close(v, o["dbg.block0.cross.emo_v"])
    assert close(e, o["dbg.block0.cross.emo_attn_raw"])
    stats = torch.stack([h.mean(), h.std(), e.mean(), e.std()])
    assert close(stats, o["dbg.block0.cross.stats"])
    assert close(e_norm, o["dbg.block0.cross.emo_attn_normalised"])
    assert close(out, o["dbg.block0.cross.out_emo_on"])


# ---- windows and schedule -----------------------------------------------------------------------------------------


def window_lengths(outputs) -> list[int]:
    return sorted({int(m.group(1)) for k in outputs if (m := re.fullmatch(r"win\.L(\d+)\.windows", k))})


def test_fixture_has_window_cases(golden):
    assert window_lengths(golden["outputs"])


def test_window_plans_match_reference(golden):
    o, cfg = golden["outputs"], golden["config"]["pipeline"]
    for length in window_lengths(o):
        plan = plan_flashportrait_windows(length, cfg["context_size"], cfg["context_overlap"])
        p = f"win.L{length}."
        assert len(plan.windows) == o[p + "windows"].shape[0], length
        windows = torch.stack([torch.arange(w.start, w.end) for w in plan.windows])
        assert torch.equal(windows, o[p + "windows"]), length
        assert torch.equal(torch.tensor([w.overlap for w in plan.windows]), o[p + "overlap"]), length
        assert torch.equal(torch.tensor([list(w.video_frames) for w in plan.windows]), o[p + "pixel_range"]), length
        for k, w in enumerate(plan.windows):
            prev = torch.full((w.latent_frames,), -1, dtype=torch.int64)
            prev[: w.overlap] = torch.arange(w.start, w.start + w.overlap)
            assert torch.equal(prev, o[p + "prev_frame"][k]), (length, k)
            weights = torch.ones(w.latent_frames)
            weights[: w.overlap] = plan.weights(w)
            assert torch.equal(weights, o[p + "weights"][k]), (length, k)
            assert torch.equal(weights.to(torch.bfloat16), o[p + "weights_bf16"][k]), (length, k)


def test_e2e_windows_match_config(golden):
    e2e, cfg = golden["config"]["e2e_test"], golden["config"]["pipeline"]
    plan = plan_flashportrait_windows(e2e["latent_frames"], cfg["context_size"], cfg["context_overlap"])
    assert [[w.start, w.end] for w in plan.windows] == e2e["window_ranges"]


def test_schedule_matches_reference(golden):
    o, cfg = golden["outputs"], golden["config"]["pipeline"]
    sigmas = flow_sigmas(cfg["num_inference_steps"], cfg["scheduler"]["shift"],
                         cfg["scheduler"]["num_train_timesteps"])
    assert torch.allclose(sigmas, o["sched.sigmas"], atol=1e-6)
    assert torch.allclose(timesteps(sigmas), o["sched.timesteps"], atol=1e-3)


# ---- end to end: 30 steps over the windows -----------------------------------------------------------------------


class Recorder:
    """Wraps a denoiser and keeps one (window, step)'s input latents and guided velocity."""

    def __init__(self, denoise, window: int, step: int):
        self.denoise, self.window, self.step, self.seen = denoise, window, step, None

    def __call__(self, window, step, latents):
        v = self.denoise(window, step, latents)
        if (window.index, step) == (self.window, self.step):
            self.seen = (latents.clone(), v.clone())
        return v


@pytest.fixture(scope="module")
def e2e(golden, model, encoder):
    i, cfg = golden["inputs"], golden["config"]["pipeline"]
    plan = plan_flashportrait_windows(golden["config"]["e2e_test"]["latent_frames"], cfg["context_size"],
                                      cfg["context_overlap"])
    sigmas = flow_sigmas(cfg["num_inference_steps"], cfg["scheduler"]["shift"])
    feats = i["e2e.head_emo_feat"]

    def denoiser(steps):
        return FlashPortraitDenoiser(
            model, ExpressionGuidance(cfg["emo_cfg_scale"], cfg["text_cfg_scale"], cfg["ip_scale"]),
            positive_text=i["dit.context"][None], negative_text=None, image_tokens=i["dit.clip_fea"],
            condition=i["e2e.y"], window_tokens=lambda w: window_expression_tokens(encoder, feats, w), sigmas=sigmas,
            steps=steps)

    return plan, sigmas, denoiser


def test_e2e_first_two_steps_match_reference(golden, e2e, one_thread):
    plan, sigmas, denoiser = e2e
    i, o = golden["inputs"], golden["outputs"]
    with torch.no_grad():
        step0 = sample_joint(plan, sigmas[:2], i["e2e.latents_init"], denoiser(1))
        rec = Recorder(denoiser(2), window=1, step=1)
        step1 = sample_joint(plan, sigmas[:3], i["e2e.latents_init"], rec)
    assert close(step0, o["e2e.latents_after_step0"]), max_err(step0, o["e2e.latents_after_step0"])
    latents, guided = rec.seen
    assert close(guided, o["e2e.step1_window1_guided"]), max_err(guided, o["e2e.step1_window1_guided"])
    stepped = euler_step(latents, guided, float(sigmas[1]), float(sigmas[2]))
    assert close(stepped, o["e2e.step1_window1_stepped"])
    assert close(step1, o["e2e.latents_after_step1"]), max_err(step1, o["e2e.latents_after_step1"])


def test_e2e_joint_loop_matches_reference(golden, e2e, one_thread):
    plan, sigmas, denoiser = e2e
    with torch.no_grad():
        final = sample_joint(plan, sigmas, golden["inputs"]["e2e.latents_init"], denoiser(None))
    expected = golden["outputs"]["e2e.latents_final"]
    assert close(final, expected, E2E_ATOL), max_err(final, expected)


def test_e2e_streaming_matches_reference(golden, e2e, one_thread):
    plan, sigmas, denoiser = e2e
    init = golden["inputs"]["e2e.latents_init"]
    with torch.no_grad():
        chunks = list(sample_streaming(plan, sigmas, lambda s, e: init[:, :, s:e], denoiser(None)))
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)
    final = torch.cat([c.latents for c in chunks], dim=2)
    expected = golden["outputs"]["e2e.latents_final"]
    assert final.shape == expected.shape
    assert close(final, expected, E2E_ATOL), max_err(final, expected)
