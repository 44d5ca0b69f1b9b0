"""`--compile auto|on|off` (avatarcli/compilation.py): auto compiles on CUDA once the planned window-steps reach the
break-even, never on the CPU; true/false still mean on/off; a batch decides once for the jobs sharing a model set."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from avatarcli.batch import BatchEntry, BatchReport, ModelSets
from avatarcli.batch import build_job as build_manifest_job
from avatarcli.cli import _bare_compile
from avatarcli.compilation import BREAK_EVEN_WINDOW_STEPS, compile_blocks, compiles, computed_steps_per_window, \
    decided, planned_window_steps
from avatarcli.drivers.stableavatar import DRIVER
from avatarcli.errors import AvatarError
from avatarcli.job import AnimateJob
from avatarcli.presets import load_preset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CUDA, CPU = SimpleNamespace(type="cuda"), SimpleNamespace(type="cpu")


def test_auto_compiles_on_cuda_from_the_break_even_and_never_on_the_cpu():
    below, at = BREAK_EVEN_WINDOW_STEPS - 1, BREAK_EVEN_WINDOW_STEPS
    assert (compiles("auto", CUDA, below), compiles("auto", CUDA, at), compiles("auto", CUDA, 10 * at)) == (
        False, True, True)
    assert not any(compiles(mode, CPU, 10 * at) for mode in ("auto", "on", "off"))
    assert compiles("on", CUDA, 1) and not compiles("off", CUDA, 10 * at)


def test_auto_never_compiles_the_demo_model_and_on_still_does():
    many = 100 * BREAK_EVEN_WINDOW_STEPS
    job = AnimateJob(portrait=EXAMPLES / "portrait.png", audio=EXAMPLES / "speech.wav", output=Path("o.mp4"),
                     preset=load_preset("balanced"), model="demo")
    published = dataclasses.replace(job, model="stableavatar")
    assert DRIVER.compile_break_even(job) is None and DRIVER.compile_break_even(published) == BREAK_EVEN_WINDOW_STEPS
    assert not compiles("auto", CUDA, many, None) and compiles("auto", CUDA, many, BREAK_EVEN_WINDOW_STEPS)
    assert compiles("on", CUDA, 1, None)
    assert decided(job, CUDA, many, DRIVER.compile_break_even(job)).compile == "off"
    assert decided(published, CUDA, many, DRIVER.compile_break_even(published)).compile == "on"
    assert decided(dataclasses.replace(job, compile="on"), CUDA, 1, None).compile == "on"


def test_each_driver_gives_its_own_model_s_break_even():
    from avatarcli.drivers.flashportrait import DRIVER as DRIVING

    job = AnimateJob(portrait=EXAMPLES / "portrait.png", audio=None, driving=EXAMPLES / "portrait.png",
                     output=Path("o.mp4"), preset=load_preset("reference"))
    break_even = DRIVING.compile_break_even(job)
    assert break_even == 20  # the 14B DiT saves 2.49 s a window-step for 48 s of compiling
    assert (compiles("auto", CUDA, break_even - 1, break_even), compiles("auto", CUDA, break_even, break_even)) == (
        False, True)


def test_the_window_steps_are_the_plan_times_the_fewest_steps_the_preset_computes():
    reference, fast = load_preset("reference"), load_preset("fast")
    assert computed_steps_per_window(reference) == 50
    assert computed_steps_per_window(fast) == 2 + 3 // 2  # warmup, then one in every max_predicted + 1 of the rest
    assert computed_steps_per_window(load_preset("balanced")) == 2 + 48 // 7
    job = AnimateJob(portrait=EXAMPLES / "portrait.png", audio=EXAMPLES / "speech.wav", output=Path("o.mp4"),
                     preset=fast)
    assert planned_window_steps(DRIVER, job, 60 * 25) == 24 * 3  # a minute at 25 fps: 24 windows


@pytest.mark.parametrize("given, mode", [(True, "on"), (False, "off"), ("auto", "auto"), ("off", "off"),
                                         (None, "auto")])
def test_a_manifest_takes_auto_on_off_and_true_false(given, mode):
    options = {"portrait": "portrait.png", "audio": "speech.wav", **({} if given is None else {"compile": given})}
    assert build_manifest_job(options, EXAMPLES, resume=False).compile == mode
    assert AnimateJob(portrait=Path("p.png"), output=Path("o.mp4"), preset=load_preset("fast"),
                      **({} if given is None else {"compile": given})).compile == mode


def test_a_manifest_refuses_another_compile_value():
    from avatarcli.batch import _normalise

    with pytest.raises(AvatarError, match="'compile' must be auto, on or off, got 'maybe'"):
        build_manifest_job(_normalise({"portrait": "portrait.png", "audio": "speech.wav", "compile": "maybe"}),
                           EXAMPLES, resume=False)
    with pytest.raises(AvatarError, match="'compile' must be str or bool, got 1"):
        _normalise({"compile": 1})


def test_a_bare_compile_flag_means_on_for_animate_only():
    assert _bare_compile(["animate", "p.png", "--compile"]) == ["animate", "p.png", "--compile", "on"]
    assert _bare_compile(["--debug", "animate", "--compile", "-a", "t.wav"])[3] == "on"
    assert _bare_compile(["animate", "p.png", "--compile", "off"]) == ["animate", "p.png", "--compile", "off"]
    assert _bare_compile(["sfd", "--compile"]) == ["sfd", "--compile"]


def test_a_batch_decides_once_for_the_jobs_that_share_a_model_set():
    """Each job alone is below the break-even; together they repay one compile, which all of them then use."""
    preset = load_preset("reference").with_overrides(steps=5)
    one_window = 8  # frames: one window of 5 computed steps
    jobs = math.ceil(BREAK_EVEN_WINDOW_STEPS / preset.steps)
    entries = [BatchEntry(i, f"job {i}", frames=one_window,
                          job=AnimateJob(portrait=EXAMPLES / "portrait.png", audio=EXAMPLES / "speech.wav",
                                         output=Path(f"{i}.mp4"), preset=preset)) for i in range(jobs)]
    sets = ModelSets(BatchReport("jobs.yaml", []))
    assert sets._compile_decided(entries[0], DRIVER, CUDA).compile == "off"  # no group given: the job alone
    sets.begin_group(entries)
    decided = sets._compile_decided(entries[0], DRIVER, CUDA)
    assert decided.compile == "on" and decided.output == entries[0].job.output
    sets.begin_group(entries[:-1])
    assert sets._compile_decided(entries[0], DRIVER, CUDA).compile == "off"
    assert sets._compile_decided(entries[0], DRIVER, CPU).compile == "off"


def test_compile_blocks_compiles_each_block_as_a_full_graph_and_restores_the_log_level():
    from diffusers.utils import logging as diffusers_logging

    calls = []
    transformer = SimpleNamespace(compile_repeated_blocks=lambda **kwargs: calls.append(
        (kwargs, diffusers_logging.get_verbosity())))
    before = diffusers_logging.get_verbosity()
    compile_blocks(transformer)
    assert calls == [({"fullgraph": True}, diffusers_logging.ERROR)]  # quiet while it compiles
    assert diffusers_logging.get_verbosity() == before
