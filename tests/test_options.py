"""One job builder for the CLI and for manifests: every `animate` option is declared once (avatarcli/options.py),
works in a manifest, and the README's manifest table is generated from the same declarations."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from avatarcli.errors import AvatarError
from avatarcli.options import OPTIONS, build_job, check_job, manifest_name, manifest_table

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CLI_ONLY = {"quiet", "as_json", "resume", "gpus", "overwrite", "trace"}  # how the command runs, not what the job is


def animate_parameters() -> set[str]:
    from avatarcli.cli import app

    command = typer.main.get_command(app).commands["animate"]
    return {param.name for param in command.params}


def test_every_animate_option_is_declared_once_and_nothing_else():
    assert animate_parameters() - CLI_ONLY == set(OPTIONS)


def test_cli_help_texts_come_from_the_declarations():
    from avatarcli.cli import app

    command = typer.main.get_command(app).commands["animate"]
    helps = {param.name: param.help for param in command.params if param.name in OPTIONS}
    assert all(helps[name] == option.help for name, option in OPTIONS.items() if name not in ("portrait", "predict"))


def test_readme_manifest_table_is_generated_from_the_declarations():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- manifest-options:start -->\n", "\n<!-- manifest-options:end -->"
    assert text[text.index(start) + len(start) : text.index(end)] == manifest_table()


def test_a_manifest_sets_every_job_option(tmp_path):
    from avatarcli.batch import build_job as build_manifest_job

    options = {"portrait": "portrait.png", "audio": "speech.wav", "precision": "fp8", "overlap_decode": "off",
               "predict": True, "predict_order": 3, "predict_max": 5, "predict_tolerance": 0.05,
               "predict_layer_ratio": 2.0, "offload": "none", "crf": 0, "compile": True, "audio_scale": 2.5,
               "model": "demo", "no_audio": True, "vae_dtype": "fp32", "prompt": "hello"}
    job = build_manifest_job(options, EXAMPLES, resume=False)
    assert (job.precision, job.overlap_decode, job.crf, job.compile, job.model) == ("fp8", "off", 0, "on", "demo")
    assert job.preset.prediction.order == 3 and job.preset.prediction.max_predicted == 5
    assert job.preset.audio_scale == 2.5 and job.preset.size == "128x128"  # the demo's own size
    assert job.output == EXAMPLES / "portrait_speech.mp4" and not job.mux_audio and job.prompt == "hello"


def test_the_cli_and_a_manifest_build_the_same_job():
    from avatarcli.batch import build_job as build_manifest_job

    values = {"portrait": str(EXAMPLES / "portrait.png"), "audio": str(EXAMPLES / "speech.wav"),
              "output": str(EXAMPLES / "out.mp4"), "steps": 7, "seed": 3, "predict": False, "guidance": "ang"}
    assert build_job(values) == build_manifest_job(values, EXAMPLES, resume=False)


@pytest.mark.parametrize("values,message", [
    ({"crf": 99}, "'crf' must be between 0 and 51, got 99"),
    ({"overlap_decode": "sometimes"}, "'overlap_decode' must be auto, on or off"),
    ({"precision": "int4"}, "'precision' must be auto or fp8"),
    ({"numerics": "quick"}, "'numerics' must be reference or fast, got 'quick'"),
    ({"context_parallel": 2}, "'context_parallel' 2 must divide the 1 processes"),
    ({"driving": "speech.wav"}, "give exactly one of 'audio' or 'driving' (got both)"),
    ({"predict": False, "predict_order": 2}, "prediction setting 'order' was given with prediction off"),
])
def test_bad_values_name_the_option_the_way_the_source_spells_it(values, message):
    base = {"portrait": str(EXAMPLES / "portrait.png"), "audio": str(EXAMPLES / "speech.wav")}
    with pytest.raises(AvatarError) as error:
        build_job({**base, **values}, name=manifest_name)
    assert message in str(error.value)


def test_numerics_come_from_the_preset_unless_the_option_sets_them():
    base = {"portrait": "p.png", "audio": "a.wav"}
    assert build_job(base).preset.numerics == "reference"
    assert build_job({**base, "numerics": "fast"}).preset.numerics == "fast"
    assert build_job({**base, "numerics": "fast", "preset": "reference"}).preset.numerics == "fast"


def test_a_job_is_checked_against_the_processes_that_share_it():
    job = build_job({"portrait": "p.png", "audio": "a.wav", "context_parallel": 2}, processes=2)
    check_job(job, processes=2)
    with pytest.raises(AvatarError, match="--resume works with one process"):
        build_job({"portrait": "p.png", "audio": "a.wav"}, resume=True, processes=2)
    with pytest.raises(AvatarError, match="--context-parallel runs on GPUs"):
        build_job({"portrait": "p.png", "audio": "a.wav", "context_parallel": 2, "device": "cpu"}, processes=2)


def test_a_model_carries_its_own_defaults_between_the_preset_and_the_flags(tmp_path):
    base = {"portrait": "p.png", "audio": "a.wav", "model": "demo"}
    job = build_job(base)  # the demo's avatarcli-defaults.yaml: its native size and audio CFG scale
    assert (job.preset.size, job.preset.audio_scale) == ("128x128", 4.0)
    live = build_job({**base, "preset": "live"})  # its `presets: live:` section: gentler guidance for one step
    assert (live.preset.size, live.preset.audio_scale, live.preset.steps) == ("128x128", 3.0, 1)
    assert build_job({**base, "preset": "live", "audio_scale": 6.0}).preset.audio_scale == 6.0
    job = build_job({**base, "audio_scale": 2.5, "size": "64x64"})  # the user's flags win
    assert (job.preset.size, job.preset.audio_scale) == ("64x64", 2.5)
    assert build_job({**base, "guidance": "ang"}).preset.guidance == "ang"  # a cfg scale default does not get in the way
    assert build_job({"portrait": "p.png", "audio": "a.wav"}).preset.audio_scale == 5.0  # the published model: none

    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "avatarcli-defaults.yaml").write_text("text_scale: 4.5\nsteps: 12\n")
    job = build_job({**base, "weights": str(folder)})
    assert (job.preset.text_scale, job.preset.steps, job.preset.audio_scale) == (4.5, 12, 5.0)
    (folder / "avatarcli-defaults.yaml").write_text("text_scale: 4.5\npresets:\n  fast: {text_scale: 2.0}\n")
    assert build_job({**base, "weights": str(folder), "preset": "fast"}).preset.text_scale == 2.0
    assert build_job({**base, "weights": str(folder), "preset": "quality"}).preset.text_scale == 4.5
    refused = [("presets:\n  fast: {stepz: 2}\n", "unknown setting 'stepz'"),
               ("presets: [fast]\n", "'presets' must map preset names"),
               ("stepz: 12\n", "unknown setting 'stepz'"), ("steps: 0\n", "avatarcli-defaults.yaml")]
    for text, message in refused:
        (folder / "avatarcli-defaults.yaml").write_text(text)
        with pytest.raises(AvatarError, match=message):
            build_job({**base, "weights": str(folder)})
