"""Presets: the shipped YAML files, validation of user files, overrides, and the "auto" rules."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from avatarcli.errors import AvatarError
from avatarcli.presets import Preset, list_presets, load_preset, resolve_checkpoint, resolve_size

VALID_CFG = """\
description: a test preset
steps: 20
guidance: cfg
text_scale: 3
audio_scale: 5.5
overlap: 6
blend: log
size: auto
fps: 25
"""


@pytest.fixture
def preset_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AVATARCLI_PRESETS_DIR", str(tmp_path))
    return tmp_path


def write_preset(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_presets_are_the_six_documented_ones() -> None:
    presets = list_presets()

    assert [preset.name for preset in presets] == ["balanced", "fast", "live", "quality", "reference", "turbo"]
    for preset in presets:
        assert preset.description and "\n" not in preset.description


def test_reference_preset_matches_the_published_inference_script() -> None:
    preset = load_preset("reference")

    assert (preset.steps, preset.guidance, preset.text_scale, preset.audio_scale) == (50, "cfg", 3.0, 5.0)
    assert (preset.overlap, preset.blend, preset.size, preset.fps) == (5, "uniform", "512x512", 25)
    assert (preset.shift, preset.checkpoint, preset.seed) == (5.0, "square", 42)


def test_quality_preset_uses_audio_native_guidance_with_the_paper_values() -> None:
    preset = load_preset("quality")

    assert (preset.steps, preset.guidance, preset.ang_alpha, preset.ang_beta) == (50, "ang", 4.5, 3.0)
    assert (preset.overlap, preset.blend, preset.size) == (10, "log", "auto")


@pytest.mark.parametrize(
    "name, steps, overlap",
    [("balanced", 50, 5), ("fast", 5, 5)],
)
def test_cheaper_presets_use_cfg_with_log_blend(name: str, steps: int, overlap: int) -> None:
    preset = load_preset(name)

    assert (preset.steps, preset.overlap) == (steps, overlap)
    assert (preset.guidance, preset.text_scale, preset.audio_scale) == ("cfg", 3.0, 5.0)
    assert (preset.blend, preset.size) == ("log", "auto")


def test_a_preset_file_can_be_loaded_by_path_and_takes_its_name_from_the_file(tmp_path: Path) -> None:
    path = write_preset(tmp_path, "mine", VALID_CFG)

    preset = load_preset(path)

    assert preset.name == "mine"
    assert (preset.steps, preset.text_scale, preset.audio_scale) == (20, 3.0, 5.5)
    assert isinstance(preset.text_scale, float)
    assert (preset.shift, preset.checkpoint, preset.seed) == (5.0, "auto", None)
    assert load_preset(str(path)) == preset


def test_presets_dir_can_be_overridden_by_environment(preset_dir: Path) -> None:
    write_preset(preset_dir, "only", VALID_CFG)

    assert [preset.name for preset in list_presets()] == ["only"]
    assert load_preset("only").steps == 20


def test_unknown_preset_name_lists_the_available_ones(preset_dir: Path) -> None:
    write_preset(preset_dir, "only", VALID_CFG)

    with pytest.raises(AvatarError, match="unknown preset 'nope'.*only"):
        load_preset("nope")


def test_missing_preset_file_is_an_avatar_error(tmp_path: Path) -> None:
    with pytest.raises(AvatarError, match="does not exist"):
        load_preset(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    "replace, add, message",
    [
        (None, "stepz: 3\n", r"unknown key 'stepz' \(allowed keys: description, steps, guidance"),
        (None, "name: other\n", "unknown key 'name'"),
        (None, "prediction:\n  method: none\n", "unknown key 'prediction.method'"),
        (("steps: 20", "steps: ten"), None, "'steps' must be an integer >= 1, got 'ten'"),
        (("steps: 20", "steps: 20.0"), None, "'steps' must be an integer"),
        (("steps: 20", "steps: true"), None, "'steps' must be an integer"),
        (("steps: 20", "steps: 0"), None, "'steps' must be an integer >= 1, got 0"),
        (("overlap: 6", "overlap: 51"), None, "'overlap' must be an integer from 1 to 50, got 51"),
        (("overlap: 6", "overlap: 0"), None, "'overlap' must be an integer from 1 to 50"),
        (("fps: 25", "fps: 61"), None, "'fps' must be an integer from 1 to 60"),
        (("blend: log", "blend: cosine"), None, "'blend' must be one of log, uniform, linear, got 'cosine'"),
        (("guidance: cfg", "guidance: apg"), None, "'guidance' must be one of cfg, ang"),
        (None, "checkpoint: wide\n", "'checkpoint' must be one of auto, square, rec-vec"),
        (None, "numerics: bf16\n", "'numerics' must be one of reference, fast, got 'bf16'"),
        (("size: auto", "size: 500x500"), None, "'size' must be 'auto' or 'WxH' with W and H multiples of 16"),
        (("size: auto", "size: 48x48"), None, "at least 64"),
        (("size: auto", "size: big"), None, "'size' must be 'auto' or 'WxH'"),
        (("size: auto", "size: 512"), None, "'size' must be 'auto' or 'WxH'"),
        (None, "shift: 0\n", "'shift' must be a number > 0"),
        (("text_scale: 3", "text_scale: high"), None, "'text_scale' must be a number"),
        (("audio_scale: 5.5", "audio_scale: -1"), None, "'audio_scale' must be a number >= 0"),
        (None, "seed: -1\n", "'seed' must be an integer from 0"),
        (None, "seed: 1.5\n", "'seed' must be an integer .* or null"),
        (None, "ang_alpha: 4.5\n", "'ang_alpha' applies only to guidance 'ang', but guidance is 'cfg'"),
        (("fps: 25\n", ""), None, "missing key 'fps'"),
    ],
)
def test_invalid_preset_file_names_file_key_and_allowed_values(
    tmp_path: Path, replace: tuple[str, str] | None, add: str | None, message: str
) -> None:
    text = VALID_CFG
    if replace is not None:
        assert replace[0] in text
        text = text.replace(*replace)
    if add is not None:
        text += add
    path = write_preset(tmp_path, "broken", text)

    with pytest.raises(AvatarError, match=message) as caught:
        load_preset(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "steps: [unclosed\n", ""])
def test_preset_that_is_not_a_yaml_mapping_is_an_avatar_error(tmp_path: Path, text: str) -> None:
    path = write_preset(tmp_path, "odd", text)

    with pytest.raises(AvatarError, match=str(path)):
        load_preset(path)


def test_with_overrides_returns_a_changed_copy() -> None:
    base = load_preset("balanced")

    changed = base.with_overrides(steps=12, overlap=4, seed=7, size="832x480")

    assert (changed.steps, changed.overlap, changed.seed, changed.size) == (12, 4, 7, "832x480")
    assert base.steps == 50
    assert dataclasses.replace(changed, steps=50, overlap=5, seed=None, size="auto") == base


def test_with_overrides_treats_none_as_not_given() -> None:
    base = load_preset("reference")

    assert base.with_overrides(steps=None, seed=None, blend=None) == base


def test_with_overrides_can_switch_guidance_and_keeps_the_default_scales() -> None:
    preset = load_preset("fast").with_overrides(guidance="ang")

    assert (preset.guidance, preset.ang_alpha, preset.ang_beta) == ("ang", 4.5, 3.0)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"steps": 0}, "'steps' must be an integer >= 1"),
        ({"overlap": 55}, "'overlap' must be an integer from 1 to 50"),
        ({"blend": "cosine"}, "'blend' must be one of log, uniform, linear"),
        ({"size": "100x100"}, "'size' must be"),
        ({"text_scale": 4.0}, "'text_scale' applies only to guidance 'cfg', but guidance is 'ang'"),
        ({"colour": "red"}, "unknown key 'colour'"),
    ],
)
def test_with_overrides_validates_again(flags: dict, message: str) -> None:
    with pytest.raises(AvatarError, match=message):
        load_preset("quality").with_overrides(**flags)


def test_preset_is_frozen() -> None:
    preset = load_preset("fast")

    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.steps = 3  # type: ignore[misc]
    assert isinstance(preset, Preset)


@pytest.mark.parametrize(
    "image_size, expected",
    [
        ((720, 1280), (480, 832)),
        ((1920, 1080), (832, 480)),
        ((1000, 1000), (512, 512)),
        ((800, 1000), (512, 512)),
        ((790, 1000), (480, 832)),
        ((1250, 1000), (512, 512)),
        ((1260, 1000), (832, 480)),
    ],
)
def test_auto_size_picks_the_training_resolution_by_aspect(image_size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert resolve_size("auto", *image_size) == expected


def test_explicit_size_is_width_by_height() -> None:
    assert resolve_size("640x368", 1000, 1000) == (640, 368)


def test_invalid_explicit_size_is_an_avatar_error() -> None:
    with pytest.raises(AvatarError, match="multiples of 16"):
        resolve_size("650x368", 1000, 1000)


@pytest.mark.parametrize(
    "checkpoint, size, expected",
    [
        ("auto", (512, 512), "square"),
        ("auto", (480, 832), "rec-vec"),
        ("auto", (832, 480), "rec-vec"),
        ("square", (480, 832), "square"),
        ("rec-vec", (512, 512), "rec-vec"),
    ],
)
def test_checkpoint_choice(checkpoint: str, size: tuple[int, int], expected: str) -> None:
    assert resolve_checkpoint(checkpoint, *size) == expected


def test_unknown_checkpoint_is_an_avatar_error() -> None:
    with pytest.raises(AvatarError, match="auto, square, rec-vec"):
        resolve_checkpoint("wide", 512, 512)


# ---- the driving-video driver's section -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["reference", "quality", "balanced", "fast", "turbo"])
def test_every_preset_has_driving_video_settings_with_expression_guidance(name):
    driving = load_preset(name).for_driver("driving")
    assert driving.guidance == "expression" and driving.blend == "linear" and 1 <= driving.overlap < 51
    assert driving.emo_scale == 4.0 and driving.text_scale == 1.0


def test_reference_preset_with_a_driving_video_is_flashportraits_published_settings():
    driving = load_preset("reference").for_driver("driving")
    assert (driving.steps, driving.overlap, driving.shift, driving.size) == (30, 30, 5.0, "auto")


def test_audio_settings_are_untouched_by_the_driving_section():
    preset = load_preset("reference")
    assert preset.for_driver("audio") == preset


def test_unknown_key_in_the_driving_section_is_named(tmp_path):
    from avatarcli.presets import presets_dir

    text = (presets_dir() / "fast.yaml").read_text().replace("  emo_scale: 4.0", "  emo_scale: 4.0\n  audio_scale: 2.0")
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(AvatarError, match="driving.audio_scale"):
        load_preset(path)


def test_expression_guidance_with_audio_is_refused():
    with pytest.raises(AvatarError, match="expression"):
        load_preset("fast").with_overrides(guidance="expression").for_driver("audio")


def test_turbo_is_the_four_step_distilled_path_for_driving_videos_only():
    turbo = load_preset("turbo").for_driver("driving")
    assert (turbo.steps, turbo.schedule, turbo.lora_strength, turbo.decoder) == (4, "step_distill", 1.0, "tiny")
    with pytest.raises(AvatarError, match="not --audio"):
        load_preset("turbo").for_driver("audio")


# ---- live: toward real time ----------------------------------------------------------------------------------------


def test_live_is_an_audio_preset_checked_by_the_preset_schema(tmp_path):
    live = load_preset("live")
    assert live.for_driver("audio") is live and live.guidance == "cfg" and live.guidance_reuse is None
    with pytest.raises(AvatarError, match="not --driving"):
        live.for_driver("driving")
    text = (Path(__file__).parents[1] / "presets" / "live.yaml").read_text(encoding="utf-8")
    with pytest.raises(AvatarError, match="prediction.tolerance"):
        load_preset(write_preset(tmp_path, "broken", text.replace("tolerance: 1000", "tolerance: 1001")))


def test_presets_command_lists_live(capsys):
    from avatarcli.cli import main

    assert main(["presets"]) == 0
    assert "live" in capsys.readouterr().out


def test_live_plans_fewer_forwards_per_window_than_fast():
    from avatarcli.compilation import computed_steps_per_window

    assert computed_steps_per_window(load_preset("live")) < computed_steps_per_window(load_preset("fast"))


@pytest.mark.parametrize("steps,per_window", [(None, 1), (3, 2)])  # as shipped; the 3-step live of before
def test_live_computes_a_fixed_number_of_steps_in_every_window_whatever_the_velocity(steps, per_window):
    import torch

    from avatarcli.sampling.predict import CountedDenoiser
    from avatarcli.sampling.sampler import sample_joint
    from avatarcli.sampling.schedule import flow_sigmas
    from avatarcli.sampling.windows import plan_windows

    live = load_preset("live") if steps is None else load_preset("live").with_overrides(steps=steps)
    plan, sigmas = plan_windows(60, 21, live.overlap, live.blend), flow_sigmas(live.steps, live.shift)
    mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))

    def bent(window, step, x):  # nonlinear in the latents and erratic in the step: no error budget would pass it
        return torch.tanh(torch.einsum("bcfhw,cd->bdfhw", x, mix)) * (1 + 7 * step) ** 2

    counted = CountedDenoiser(bent)
    noise = torch.randn(1, 4, plan.latent_frames, 2, 3, generator=torch.Generator().manual_seed(1))
    sample_joint(plan, sigmas, noise, live.prediction.bind(counted, sigmas))
    assert counted.calls == per_window * len(plan.windows)


# ---- the schema: declared once on the fields -----------------------------------------------------------------------


def test_every_preset_field_declares_its_values_and_scales_name_known_guidance_rules():
    from avatarcli.sampling.guidance import PRESET_GUIDANCE
    from avatarcli.schema import RULE

    fields = {field.name: field for field in dataclasses.fields(Preset)}
    for name, field in fields.items():
        assert RULE in field.metadata, name
        assert set(field.metadata.get("guidance", ())) <= set(PRESET_GUIDANCE), name
    assert fields["guidance"].metadata["options"] == PRESET_GUIDANCE


def test_numerics_default_to_the_reference_and_a_preset_or_its_driving_section_may_set_them(tmp_path):
    assert {preset.numerics for preset in list_presets()} == {"reference"}
    path = write_preset(tmp_path, "quick", VALID_CFG + "numerics: fast\ndriving:\n  numerics: reference\n")
    preset = load_preset(path)
    assert preset.numerics == "fast" and preset.for_driver("driving").numerics == "reference"
    assert load_preset("fast").with_overrides(numerics="fast").numerics == "fast"
    with pytest.raises(AvatarError, match="'numerics' must be one of reference, fast"):
        load_preset("fast").with_overrides(numerics="half")


def test_the_guidance_rules_are_named_once():
    from avatarcli.sampling.guidance import AUDIO_GUIDANCE, GUIDANCE_MODES, PRESET_GUIDANCE, Guidance

    assert PRESET_GUIDANCE == ("cfg", "ang", "expression") and GUIDANCE_MODES == ("cfg", "ang", "none")
    assert set(AUDIO_GUIDANCE) == set(PRESET_GUIDANCE) & set(GUIDANCE_MODES)
    with pytest.raises(ValueError, match="choose one of cfg, ang, none"):
        Guidance("expression")


def test_prediction_limits_are_the_same_for_presets_flags_and_direct_construction():
    from avatarcli.sampling.predict import Prediction

    for knobs, message in [({"order": 4}, "'order' must be an integer from 1 to 3, got 4"),
                           ({"warmup": 1}, "'warmup' must be an integer from 2 to 20, got 1"),
                           ({"tolerance": 0}, r"'tolerance' must be a number in \(0, 1000\], got 0")]:
        with pytest.raises(ValueError, match=message):
            Prediction(**knobs)
        with pytest.raises(AvatarError, match="'prediction." + message[1:]):
            load_preset("balanced").with_prediction(None, **knobs)
    assert Prediction(tolerance=1000, layer_ratio=2).tolerance == 1000.0
    assert isinstance(Prediction(layer_ratio=2).layer_ratio, float)  # stored as the rule converts it
