"""Numerical parity with the SFD reference implementation (golden vectors, see their README).

The fixture root is tests/golden/ (AVATARCLI_GOLDEN overrides it, see golden_root.py). Sizes, delta_t, scales and
step counts are read from the fixture's config.json, tensor shapes and output names, so any tiny configuration written
in the same format works. Everything goes through the package's loaders.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from golden_root import golden_root

from avatarcli.loading.sfd import (
    infer_decoder_config, infer_lightningdit_config, lightningdit_state_dict, load_latent_stats, load_lightningdit,
    load_texture_vae,
)
from avatarcli.models.ldm_vae import LDMDecoderConfig, to_uint8_nhwc
from avatarcli.models.sfd import LightningDiTConfig
from avatarcli.sampling import sfd as sampling

ROOT = golden_root() / "sfd"
REL_TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def golden():
    assert ROOT.is_dir(), f"golden fixtures not found at {ROOT} (set AVATARCLI_GOLDEN)"
    config = json.loads((ROOT / "config.json").read_text())
    main = load_lightningdit(ROOT / "state_dict.safetensors", LightningDiTConfig.from_reference_kwargs(config["model"]))
    weak = load_lightningdit(ROOT / "guidance_state_dict.safetensors",
                             LightningDiTConfig.from_reference_kwargs(config["guidance_model"]))
    return dict(
        config=config,
        main=main,
        weak=weak,
        vae=load_texture_vae(ROOT / "vae_decoder_state_dict.safetensors"),
        inputs=load_file(str(ROOT / "inputs.safetensors")),
        outputs=load_file(str(ROOT / "outputs.safetensors")),
        delta_t=float(config["model"]["semfirst_delta_t"]),
        texture_chans=main.config.texture_chans,
        scale=float(config["sample"]["cfg_scale"]),
    )


def guidance_for(kind: str, scale: float) -> sampling.Guidance:
    return {"ag": sampling.Guidance("autoguidance", scale, scale), "cfg": sampling.Guidance("cfg", scale, scale),
            "noguide": sampling.Guidance("none")}[kind]


def velocity_for(golden, y: torch.Tensor, guidance: sampling.Guidance) -> sampling.Velocity:
    null_class = int(golden["config"]["data"]["null_class"])
    return sampling.guided_velocity(golden["main"], y, guidance, texture_chans=golden["texture_chans"],
                                    null_class=null_class, guidance_model=golden["weak"])


def euler_runs(outputs) -> list[tuple[str, int, str]]:
    """(prefix, steps, guidance kind) of every stored fixed-step Euler run, e.g. ("euler20_ag", 20, "ag")."""
    found = {m.group(1) for k in outputs if (m := re.fullmatch(r"(euler\d+_\w+)\.x_final", k))}
    return [(p, int(re.match(r"euler(\d+)_", p).group(1)), p.split("_", 1)[1]) for p in sorted(found)]


def run_euler(golden, steps: int, kind: str, callback=None) -> torch.Tensor:
    grid = sampling.reference_grid(steps + 1, golden["delta_t"])
    plan = sampling.plan_steps(grid, golden["delta_t"], masks="left")
    velocity = velocity_for(golden, golden["inputs"]["sample.y"], guidance_for(kind, golden["scale"]))
    return sampling.euler(velocity, golden["inputs"]["sample.noise"], plan, delta_t=golden["delta_t"],
                          texture_chans=golden["texture_chans"], callback=callback).x


# ---- loading ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, file", [("model", "state_dict"), ("guidance_model", "guidance_state_dict")])
def test_config_inferred_from_the_state_dict_equals_config_json(golden, name, file):
    reference = LightningDiTConfig.from_reference_kwargs(golden["config"][name])
    state = lightningdit_state_dict(ROOT / f"{file}.safetensors")
    inferred = infer_lightningdit_config(state, semantic_chans=reference.semantic_chans,
                                         semfirst_delta_t=reference.semfirst_delta_t)
    assert inferred == reference


def test_decoder_config_inferred_from_the_state_dict_equals_config_json(golden):
    vae = golden["config"]["vae"]
    state = load_file(str(ROOT / "vae_decoder_state_dict.safetensors"))
    assert infer_decoder_config(state) == LDMDecoderConfig.from_ddconfig(vae["ddconfig"], vae["embed_dim"])


def test_fixed_position_tables_equal_the_recomputed_ones(golden):
    for model, file in ((golden["main"], "state_dict"), (golden["weak"], "guidance_state_dict")):
        stored = load_file(str(ROOT / f"{file}.safetensors"))
        fresh = type(model)(model.config).state_dict()
        for key in ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin"):
            assert rel_err(fresh[key], stored[key]) <= REL_TOL, key


# ---- single network evaluations --------------------------------------------------------------------------------


@pytest.mark.parametrize("which, key", [("main", "forward.v_main"), ("weak", "forward.v_guidance_model")])
def test_forward_matches(golden, which, key):
    x = golden["inputs"]
    v = golden[which](x["forward.x"], x["forward.t_tex"], x["forward.t_sem"], x["forward.y"])
    assert rel_err(v, golden["outputs"][key]) <= REL_TOL


def test_guided_velocities_match(golden):
    x, scale = golden["inputs"], golden["scale"]
    split = golden["config"]["sample"].get("autoguidance_split_scales_in_forward_test", {})
    cases = {
        "forward.v_cfg": sampling.Guidance("cfg", scale, scale),
        "forward.v_autoguidance": sampling.Guidance("autoguidance", scale, scale),
    }
    if split:
        cases["forward.v_autoguidance_split"] = sampling.Guidance(
            "autoguidance", float(split["cfg_scale_tex"]), float(split["cfg_scale_sem"]))
    for key, guidance in cases.items():
        velocity = velocity_for(golden, x["guided.y"], guidance)
        v = velocity(x["forward.x"], x["forward.t_tex"], x["forward.t_sem"])
        assert rel_err(v, golden["outputs"][key]) <= REL_TOL, key


# ---- sampling --------------------------------------------------------------------------------------------------


def test_step_plan_matches_the_reference_grid_times_and_masks(golden):
    out = golden["outputs"]
    runs = {steps: prefix for prefix, steps, _ in euler_runs(out) if f"{prefix}.tau_grid" in out}
    assert runs
    for steps, prefix in runs.items():
        grid = sampling.reference_grid(steps + 1, golden["delta_t"])
        assert torch.equal(torch.tensor(grid, dtype=torch.float32), out[f"{prefix}.tau_grid"])
        plan = sampling.plan_steps(grid, golden["delta_t"], masks="left")
        taus = torch.tensor([s.tau for s in plan], dtype=torch.float32)
        t_tex, t_sem = sampling.stream_times(taus, golden["delta_t"])
        assert torch.equal(t_tex, out[f"{prefix}.t_tex"]) and torch.equal(t_sem, out[f"{prefix}.t_sem"])
        assert torch.equal(torch.tensor([s.mask_tex for s in plan]), out[f"{prefix}.mask_tex"])
        assert torch.equal(torch.tensor([s.mask_sem for s in plan]), out[f"{prefix}.mask_sem"])


def test_euler_trajectory_matches(golden):
    out = golden["outputs"]
    runs = [(p, n, kind) for p, n, kind in euler_runs(out) if f"{p}.trajectory" in out]
    assert runs
    for prefix, steps, kind in runs:
        states = [golden["inputs"]["sample.noise"]]
        run_euler(golden, steps, kind, callback=lambda i, x: states.append(x))
        assert rel_err(torch.stack(states), out[f"{prefix}.trajectory"]) <= REL_TOL, prefix


def test_euler_final_latents_match(golden):
    runs = euler_runs(golden["outputs"])
    assert {kind for _, _, kind in runs} >= {"ag"}
    for prefix, steps, kind in runs:
        x = run_euler(golden, steps, kind)
        assert rel_err(x, golden["outputs"][f"{prefix}.x_final"]) <= REL_TOL, prefix


def test_texture_latent_and_image_from_our_sampling_run_match(golden, tmp_path):
    inputs, out = golden["inputs"], golden["outputs"]
    stats_file = tmp_path / "latents_stats.pt"  # the reference's stats file layout
    torch.save({"mean": inputs["latent_stats.mean"], "std": inputs["latent_stats.std"]}, stats_file)
    stats = load_latent_stats(stats_file, float(golden["config"]["data"]["latent_multiplier"]))
    runs = [(p, n, kind) for p, n, kind in euler_runs(out) if f"{p}.texture_latent_denorm" in out]
    assert runs
    for prefix, steps, kind in runs:
        texture = stats.denormalize(run_euler(golden, steps, kind)[:, : golden["texture_chans"]])
        assert rel_err(texture, out[f"{prefix}.texture_latent_denorm"]) <= REL_TOL
        if f"{prefix}.image" in out:
            image = golden["vae"](texture)
            assert rel_err(image, out[f"{prefix}.image"]) <= REL_TOL
            assert_uint8_close(to_uint8_nhwc(image), out[f"{prefix}.image_uint8"])


def test_decoder_matches(golden):
    image = golden["vae"](golden["inputs"]["vae_decoder.z"])
    assert rel_err(image, golden["outputs"]["vae_decoder.image"]) <= REL_TOL
    assert_uint8_close(to_uint8_nhwc(image), golden["outputs"]["vae_decoder.image_uint8"])


def assert_uint8_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    # Truncation to uint8 turns float noise at a .0 boundary into a 1-level step (README tolerance).
    diff = (ours.int() - reference.int()).abs()
    assert ours.shape == reference.shape
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-3


def test_dopri5_lands_near_the_reference_with_a_similar_evaluation_count(golden):
    out = golden["outputs"]
    settings = golden["config"]["sample"]["dopri5"]
    velocity = velocity_for(golden, golden["inputs"]["sample.y"], guidance_for("ag", golden["scale"]))
    drift = sampling.semantic_first_drift(velocity, golden["delta_t"], golden["texture_chans"])
    result = sampling.dopri5(drift, golden["inputs"]["sample.noise"], 0.0, 1.0 + golden["delta_t"],
                             rtol=settings["rtol"], atol=settings["atol"])
    # Not a sharp target (README): the masks make the drift discontinuous, so step choices follow float rounding.
    assert (result.x - out["dopri5_ag.x_final"]).abs().max() <= 0.5
    assert 0.5 <= result.nfe / int(out["dopri5_ag.nfe"]) <= 1.5
