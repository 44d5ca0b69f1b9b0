"""The driver layer: `animate` picks its driver from the job's driving input; the pipeline knows no driver."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from avatarcli.drivers import DRIVER_MODULES, driver_name
from avatarcli.errors import AvatarError
from avatarcli.pipeline import AnimateJob
from avatarcli.presets import load_preset

PACKAGE = Path(__file__).resolve().parents[1] / "avatarcli"


def job(**inputs) -> AnimateJob:
    return AnimateJob(portrait=Path("p.png"), output=Path("o.mp4"), preset=load_preset("fast"), **inputs)


def test_audio_picks_the_audio_driver():
    assert driver_name(job(audio=Path("a.wav"))) == "audio"


def test_driving_video_picks_the_driving_video_driver():
    assert driver_name(job(driving=Path("d.mp4"))) == "driving"


@pytest.mark.parametrize("inputs", [{}, {"audio": Path("a.wav"), "driving": Path("d.mp4")}])
def test_both_or_neither_driving_input_is_a_user_error(inputs):
    with pytest.raises(AvatarError, match="exactly one of --audio or --driving"):
        driver_name(job(**inputs))


def test_every_driver_module_lives_under_drivers():
    assert all(module.startswith("avatarcli.drivers.") for module in DRIVER_MODULES.values())


@pytest.mark.parametrize("shared", ["pipeline.py", "sampling/sampler.py", "decode/stream.py", "sink/ffmpeg.py"])
def test_shared_stages_import_no_driver_or_model(shared):
    tree = ast.parse((PACKAGE / shared).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    private = [name for name in imported if name.startswith(("avatarcli.drivers.", "avatarcli.models",
                                                             "avatarcli.features.audio", "avatarcli.loading"))]
    assert not private, f"{shared} imports driver-specific modules: {private}"
