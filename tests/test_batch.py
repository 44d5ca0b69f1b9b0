"""`avatarcli batch`: manifest validation before any model loads, continue-on-error, the JSON report, models loaded
once for the jobs that share them. Real runs on tiny random weights in the published layout."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest

from avatarcli.cli import main
from avatarcli.drivers import stableavatar
from avatarcli.media.video import probe_video
from avatarcli.testing import make_tiny_weights

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("weights"), model="stableavatar")


def speech(path: Path, seconds: float, sample_rate: int = 16000) -> Path:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    voice = 0.3 * np.sin(2 * np.pi * 170 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes((voice * 32767).astype(np.int16).tobytes())
    return path


@pytest.fixture
def count_loads(monkeypatch):
    loads = []
    real = stableavatar.DRIVER.load

    def counting(job, inputs, device, dtype):
        loads.append(job.output.name)
        return real(job, inputs, device, dtype)

    monkeypatch.setattr(stableavatar.DRIVER, "load", counting)
    return loads


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def three_jobs(folder: Path, weights: Path) -> Path:
    """Jobs 1 and 3 share their models (different prompts); job 2's audio is not audio."""
    speech(folder / "one.wav", 0.4)
    speech(folder / "three.wav", 0.6)
    (folder / "broken.wav").write_text("not a sound\n" * 50)
    (folder / "portrait.png").write_bytes((EXAMPLES / "portrait.png").read_bytes())
    manifest = folder / "jobs.yaml"
    manifest.write_text(f"""
defaults:
  weights: {weights}
  size: 64x64
  steps: 2
  preset: fast
jobs:
  - {{portrait: portrait.png, audio: one.wav, output: one.mp4, prompt: A person is talking.}}
  - {{portrait: portrait.png, audio: broken.wav, output: two.mp4}}
  - {{portrait: portrait.png, audio: three.wav, output: three.mp4, prompt: A person is singing., vae-dtype: fp32}}
""")
    return manifest


def test_manifest_with_a_broken_input(tmp_path, weights, capsys, count_loads, one_thread):
    manifest = three_jobs(tmp_path, weights)

    # Without --continue-on-error: the whole manifest is refused before any model loads.
    code, out, err = run(["batch", manifest], capsys)
    assert code == 2
    assert "job 2" in err and "broken.wav" in err
    assert count_loads == [] and not list(tmp_path.glob("*.mp4"))

    # With it: the two good jobs run on one load of the models, the report lists the failure.
    report = tmp_path / "report.json"
    code, out, err = run(["batch", manifest, "--continue-on-error", "--report", report, "--json"], capsys)
    assert code == 2, err
    assert count_loads == ["one.mp4"]
    data = json.loads(report.read_text())
    assert json.loads(out.strip().splitlines()[-1]) == data
    assert [job["status"] for job in data["jobs"]] == ["ok", "invalid", "ok"]
    assert data["model_loads"] == 1
    assert "broken.wav" in data["jobs"][1]["error"] and data["jobs"][1]["exit_code"] == 2
    for job, seconds in ((data["jobs"][0], 0.4), (data["jobs"][2], 0.6)):
        info = probe_video(job["output"])
        assert info["frames"] == job["frames"] == round(seconds * 25)
        assert job["nfe"] == 2 and job["seconds"] > 0 and job["error"] is None
    assert not (tmp_path / "two.mp4").exists()
    assert not [p for p in tmp_path.glob(".*") if p.name != ".pytest_cache"]  # no temp or resume leftovers

    # Again: finished outputs are skipped, nothing is loaded.
    code, out, err = run(["batch", manifest, "--continue-on-error", "--json"], capsys)
    assert [job["status"] for job in json.loads(out)["jobs"]] == ["skipped", "invalid", "skipped"]
    assert code == 2 and count_loads == ["one.mp4"]


def test_every_manifest_error_is_listed_before_anything_runs(tmp_path, capsys, count_loads):
    speech(tmp_path / "a.wav", 0.3)
    lines = [
        {"portrait": str(EXAMPLES / "portrait.png"), "audio": "a.wav", "output": "x.mp4", "stepz": 3},
        {"portrait": str(EXAMPLES / "portrait.png"), "audio": "missing.wav", "output": "y.mp4"},
        {"portrait": str(EXAMPLES / "portrait.png"), "audio": "a.wav", "output": "z.mp4", "steps": "many"},
        {"portrait": str(EXAMPLES / "portrait.png"), "audio": "a.wav", "output": "y.mp4", "vae-dtype": "fp32"},
        {"portrait": str(EXAMPLES / "portrait.png"), "audio": "a.wav", "driving": "a.wav", "output": "w.mp4"},
    ]
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n{broken json\n")
    code, out, err = run(["batch", manifest], capsys)
    assert code == 2 and count_loads == []
    errors = err.strip().splitlines()
    assert len(errors) == 7  # six invalid lines, then the count
    for where, what in [("line 1", "stepz"), ("line 2", "missing.wav"), ("line 3", "'steps'"), ("line 4", "y.mp4"),
                        ("line 5", "exactly one"), ("line 7", "JSON")]:
        assert any(where in line and what in line for line in errors), (where, errors)


@pytest.mark.parametrize("reusable", [False, True])
def test_jobs_are_grouped_by_models_key_and_keep_the_text_encoder_while_needed(tmp_path, monkeypatch, reusable):
    """Scheduling only: the driver's load, reuse and `animate` are replaced, so no model runs."""
    from avatarcli import batch
    from avatarcli.pipeline import AnimateResult

    speech(tmp_path / "a.wav", 0.3)
    manifest = tmp_path / "jobs.yaml"
    jobs = [("square", "p1"), ("rec-vec", "p1"), ("square", "p2"), ("square", "p1"), ("rec-vec", "p1")]
    manifest.write_text("\n".join(f"- {{portrait: {EXAMPLES / 'portrait.png'}, audio: a.wav, output: o{i}.mp4, "
                                  f"checkpoint: {c}, prompt: {p}}}" for i, (c, p) in enumerate(jobs)))
    loads, ran = [], []
    monkeypatch.setattr(stableavatar.DRIVER, "load", lambda job, inputs, device, dtype: loads.append(
        inputs.checkpoint) or object())
    reused = []

    def reuse(models, previous_key, job, inputs, device, dtype):
        reused.append((previous_key[2], inputs.checkpoint))
        return models if reusable else None

    monkeypatch.setattr(stableavatar.DRIVER, "reuse", reuse)

    def fake_animate(job, models=None, prepared=None, stop=None):
        ran.append((job.output.name, job.keep_text_encoder))
        return AnimateResult(job.output, "audio", 8, 25, 64, 64, 0.3, 0.0, 1, 2, nfe=2)

    monkeypatch.setattr("avatarcli.pipeline.animate", fake_animate)
    entries = batch.validate(manifest)
    report = batch.run_batch(manifest, entries)
    assert reused == [("square", "rec-vec")]
    assert loads == (["square"] if reusable else ["square", "rec-vec"])
    assert (report.model_loads, report.partial_loads) == ((1, 1) if reusable else (2, 0))
    assert ran == [("o0.mp4", True), ("o2.mp4", False), ("o3.mp4", False), ("o1.mp4", False), ("o4.mp4", False)]
    assert [job.status for job in report.jobs] == ["ok"] * 5 and report.exit_code == 0


def test_switching_checkpoint_reloads_only_the_transformer(tmp_path, weights, one_thread):
    from avatarcli.pipeline import AnimateJob, prepare
    from avatarcli.presets import load_preset
    from avatarcli.runtime import resolve_device

    audio = speech(tmp_path / "a.wav", 0.3)

    def job(checkpoint, name, numerics="fast"):
        preset = load_preset("fast").with_overrides(size="64x64", steps=1, checkpoint=checkpoint, numerics=numerics)
        return AnimateJob(portrait=EXAMPLES / "portrait.png", audio=audio, output=tmp_path / name, preset=preset,
                          weights=weights, device="cpu")

    import torch

    from avatarcli.models.wan import FastNumerics

    device = resolve_device("cpu")
    square = job("square", "s.mp4")
    driver, inputs = prepare(square)
    models = driver.load(square, inputs, device, torch.float32)
    vae, old = models.vae, models.transformer
    assert old.numerics is FastNumerics and old.blocks[0].numerics is FastNumerics  # the preset's numerics reach it
    rec_vec = job("rec-vec", "r.mp4")
    _, rec_inputs = prepare(rec_vec)
    assert driver.reuse(models, driver.models_key(square, inputs), rec_vec, rec_inputs, device, torch.float32) is models
    assert models.vae is vae and models.transformer is not old
    assert models.transformer.blocks[-1].numerics is FastNumerics
    assert driver.reuse(models, driver.models_key(square, inputs), job("square", "n.mp4", "reference"), inputs,
                        device, torch.float32) is None  # other numerics: other models
    new = dict(models.transformer.named_parameters())
    assert any(not torch.equal(p, new[n]) for n, p in old.named_parameters())  # the rec-vec weights are in
    other = job("square", "o.mp4")
    other.weights = tmp_path / "elsewhere"
    assert driver.reuse(models, driver.models_key(square, inputs), other, inputs, device, torch.float32) is None


def test_interrupted_batch_exits_130_and_resume_finishes_it(tmp_path, weights, capsys, monkeypatch, one_thread):
    """SIGINT (raised in-process while the first job starts) stops that job after its window-step with its state
    saved, the other job is not run, exit 130; `batch --resume` continues the first and runs the second."""
    import signal

    from avatarcli.resume import resume_dir

    speech(tmp_path / "a.wav", 0.4)
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text(f"""
defaults: {{weights: {weights}, size: 64x64, steps: 2, overlap: 20, crf: 0}}
jobs:
  - {{portrait: {EXAMPLES / 'portrait.png'}, audio: a.wav, output: first.mp4}}
  - {{portrait: {EXAMPLES / 'portrait.png'}, audio: a.wav, output: second.mp4, seed: 3}}
""")
    real_build = stableavatar.DRIVER.build
    calls = []

    def build_then_interrupt(job, *args):
        generation = real_build(job, *args)
        calls.append(job.output.name)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)  # the CLI's handler asks for a stop after the current window-step
        return generation

    monkeypatch.setattr(stableavatar.DRIVER, "build", build_then_interrupt)
    code, out, err = run(["batch", manifest, "--json"], capsys)
    assert code == 130
    report = json.loads(out)
    assert [job["status"] for job in report["jobs"]] == ["interrupted", "not run"]
    assert "SIGINT" in err.strip().splitlines()[-1]
    assert (resume_dir(tmp_path / "first.mp4") / "state.pt").is_file()
    assert not (tmp_path / "first.mp4").exists() and not (tmp_path / "second.mp4").exists()

    code, out, err = run(["batch", manifest], capsys)  # the saved state needs --resume
    assert code == 2 and "--resume" in err

    code, out, err = run(["batch", manifest, "--resume", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert [job["status"] for job in report["jobs"]] == ["ok", "ok"]
    assert report["jobs"][0]["nfe"] < report["jobs"][1]["nfe"]  # the first job's first window-step was not redone
    assert probe_video(tmp_path / "first.mp4")["frames"] == 10
    assert not resume_dir(tmp_path / "first.mp4").exists()
