"""Resumable `animate`: SIGINT and SIGKILL of a running subprocess, then --resume, give the frames of an
uninterrupted run (compared on a lossless --crf 0 encode); a resume with other inputs or settings is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from avatarcli.cli import main
from avatarcli.resume import resume_dir
from avatarcli.sampling.sampler import StreamState, sample_streaming
from avatarcli.sampling.schedule import flow_sigmas
from avatarcli.sampling.windows import plan_windows
from avatarcli.testing import make_tiny_weights

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Many short windows (overlap 18 of 21 latent frames) and 3 steps: several saves before the end, yet a short video.
SETTINGS = ["--size", "64x64", "--steps", "3", "--overlap", "18", "--crf", "0", "--quiet"]
SECONDS = 4.4


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("weights"), model="stableavatar")


@pytest.fixture(scope="module")
def talk(tmp_path_factory) -> Path:
    return speech(tmp_path_factory.mktemp("audio") / "talk.wav", SECONDS)


def speech(path: Path, seconds: float, pitch: float = 175.0, sample_rate: int = 16000) -> Path:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    voice = 0.3 * np.sin(2 * np.pi * pitch * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes((voice * 32767).astype(np.int16).tobytes())
    return path


def frames(path: Path) -> np.ndarray:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return np.stack([np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader])


def args(audio: Path, output: Path, weights: Path, *extra: str) -> list[str]:
    return ["animate", str(EXAMPLES / "portrait.png"), "--audio", str(audio), "-o", str(output), "--weights",
            str(weights), *SETTINGS, *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, weights, talk) -> np.ndarray:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    output = tmp_path_factory.mktemp("reference") / "reference.mp4"
    try:
        assert main(args(talk, output, weights)) == 0  # default save interval: one segment, never saved
    finally:
        torch.set_num_threads(threads)
    return frames(output)


def start_and_stop(output: Path, audio: Path, weights: Path, sig: int, *extra: str) -> subprocess.CompletedProcess:
    """Run animate in a subprocess saving its state after every window-step; send `sig` once frames are saved."""
    env = dict(os.environ, OMP_NUM_THREADS="1", AVATARCLI_SAVE_EVERY="0")
    process = subprocess.Popen([sys.executable, "-m", "avatarcli", *args(audio, output, weights, *extra)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    meta = resume_dir(output) / "state.json"
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if json.loads(meta.read_text())["frames"] > 0:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    process.send_signal(sig)
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def resume(audio: Path, output: Path, weights: Path, capsys, *extra) -> tuple[int, str, str]:
    code = main([*args(audio, output, weights), "--resume", "--json", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sigint_saves_and_exits_130_then_resume_gives_identical_frames(tmp_path, weights, talk, uninterrupted,
                                                                       capsys, one_thread):
    output = tmp_path / "talk.mp4"
    stopped = start_and_stop(output, talk, weights, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr
    lines = stopped.stderr.strip().splitlines()
    assert len(lines) == 1 and "SIGINT" in lines[0] and "--resume" in lines[0]
    assert lines[0].startswith("interrupted") and "Traceback" not in stopped.stderr and stopped.stdout == ""
    assert not output.exists() and (resume_dir(output) / "state.pt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [resume_dir(output).name]  # nothing under the output name
    saved = json.loads((resume_dir(output) / "state.json").read_text())["frames"]
    assert 0 < saved < len(uninterrupted)

    code, out, err = resume(talk, output, weights, capsys)
    assert code == 0, err
    assert json.loads(out)["resumed_from_frame"] == saved
    assert np.array_equal(frames(output), uninterrupted)
    assert not resume_dir(output).exists()


def test_overlapped_decode_saves_a_consistent_state_and_gives_the_frames_of_the_inline_decode(
        tmp_path, weights, talk, uninterrupted, capsys, one_thread):
    """The decode worker is drained before every save: frames, segments and decoder cache of the saved state agree."""
    output = tmp_path / "talk.mp4"
    stopped = start_and_stop(output, talk, weights, signal.SIGINT, "--overlap-decode", "on")
    assert stopped.returncode == 130, stopped.stderr
    meta = json.loads((resume_dir(output) / "state.json").read_text())
    segment_frames = sum(frames(resume_dir(output) / name).shape[0] for name in meta["segments"])
    assert 0 < meta["frames"] == segment_frames < len(uninterrupted)

    code, out, err = resume(talk, output, weights, capsys, "--overlap-decode", "on")
    assert code == 0, err
    assert json.loads(out)["resumed_from_frame"] == meta["frames"]
    assert np.array_equal(frames(output), uninterrupted)


def test_sigkill_then_resume_gives_identical_frames_and_a_changed_run_is_refused(tmp_path, weights, talk,
                                                                                 uninterrupted, capsys, one_thread):
    audio = tmp_path / "talk.wav"
    audio.write_bytes(talk.read_bytes())
    output = tmp_path / "talk.mp4"
    stopped = start_and_stop(output, audio, weights, signal.SIGKILL)
    assert stopped.returncode == -signal.SIGKILL
    saved = json.loads((resume_dir(output) / "state.json").read_text())["frames"]
    assert saved > 0 and not output.exists()

    # Without --resume, or with other settings or another input file content: exit 2, naming what differs.
    assert main(args(audio, output, weights)) == 2
    assert "--resume" in capsys.readouterr().err
    code, _, err = resume(audio, output, weights, capsys, "--seed", "7")
    assert code == 2 and "seed (42 -> 7)" in err
    original = audio.read_bytes()
    speech(audio, SECONDS, pitch=220.0)
    code, _, err = resume(audio, output, weights, capsys)
    assert code == 2 and "audio (file content changed)" in err and len(err.strip().splitlines()) == 1
    assert (resume_dir(output) / "state.pt").is_file() and not output.exists()

    audio.write_bytes(original)
    # A state of an earlier format (version 1 kept the decoder's cache, not its last latent frames): exit 2.
    meta_file = resume_dir(output) / "state.json"
    meta = meta_file.read_text()
    meta_file.write_text(json.dumps(dict(json.loads(meta), version=1)))
    code, _, err = resume(audio, output, weights, capsys)
    assert code == 2 and "another avatarcli version" in err and len(err.strip().splitlines()) == 1
    meta_file.write_text(meta)

    code, out, err = resume(audio, output, weights, capsys)
    assert code == 0, err
    assert json.loads(out)["resumed_from_frame"] == saved
    assert np.array_equal(frames(output), uninterrupted)
    assert not resume_dir(output).exists()


def test_stream_state_round_trip_continues_the_sampler_exactly(tmp_path):
    """Stop the wavefront after every possible window-step, save through torch.save/weights_only load, continue:
    the yielded latents equal one uninterrupted pass (extras of add-ons survive the round trip)."""
    plan = plan_windows(50, 21, 8, "log")
    sigmas = flow_sigmas(4)
    noise = torch.randn(1, 4, plan.latent_frames, 2, 3, generator=torch.Generator().manual_seed(3))
    mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(4))

    def denoise(window, step, x):
        return torch.tanh(torch.einsum("bcfhw,cd->bdfhw", x, mix)) + 0.1 * step + 0.01 * window.index

    def noise_of(s, e):
        return noise[:, :, s:e]

    whole = torch.cat([c.latents for c in sample_streaming(plan, sigmas, noise_of, denoise)], dim=2)
    total = len(plan.windows) * 4

    class Stop(Exception):
        pass

    for stop_at in range(1, total):
        chunks, kept = [], {}

        def after(live, stop_at=stop_at):
            live.extras.setdefault(0, {})["seen"] = torch.tensor(live.window_steps)
            if live.window_steps == stop_at:
                kept["state"] = live.state_dict()
                raise Stop

        try:
            for chunk in sample_streaming(plan, sigmas, noise_of, denoise, after_step=after):
                chunks.append(chunk.latents)
        except Stop:
            pass
        torch.save(kept["state"], tmp_path / "s.pt")
        state = StreamState.from_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
        assert int(state.extras[0]["seen"]) == stop_at and state.window_steps == stop_at
        rest = [c.latents for c in sample_streaming(plan, sigmas, noise_of, denoise, state=state)]
        assert torch.equal(torch.cat(chunks + rest, dim=2), whole), stop_at


def test_sigterm_finishes_the_window_step_saves_and_exits_130(tmp_path, weights, capsys, monkeypatch, one_thread):
    from avatarcli.drivers import stableavatar

    real_build = stableavatar.DRIVER.build

    def build_then_terminate(*a):
        generation = real_build(*a)
        signal.raise_signal(signal.SIGTERM)  # arrives before the first window-step
        return generation

    monkeypatch.setattr(stableavatar.DRIVER, "build", build_then_terminate)
    audio, output = speech(tmp_path / "a.wav", 0.4), tmp_path / "a.mp4"
    settings = ["--size", "64x64", "--steps", "2", "--quiet", "--json"]
    command = ["animate", EXAMPLES / "portrait.png", "--audio", audio, "-o", output, "--weights", weights, *settings]
    code = main([str(a) for a in command])
    err = capsys.readouterr().err
    assert code == 130 and len(err.strip().splitlines()) == 1 and "SIGTERM" in err
    assert (resume_dir(output) / "state.pt").is_file() and not output.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the CLI's handlers are gone again

    monkeypatch.setattr(stableavatar.DRIVER, "build", real_build)
    assert main([str(a) for a in command] + ["--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == 10 and not resume_dir(output).exists()


def test_resume_with_step_prediction_continues_the_predictor_exactly(tmp_path):
    """With step prediction on, the per-window stored velocities are part of the saved state: stopping after any
    window-step and continuing from a weights_only round trip gives the uninterrupted latents and NFE."""
    from avatarcli.sampling.predict import Prediction

    plan = plan_windows(40, 21, 8, "log")
    sigmas = flow_sigmas(12)
    steps = len(sigmas) - 1
    noise = torch.randn(1, 4, plan.latent_frames, 2, 3, generator=torch.Generator().manual_seed(5))
    mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(6))
    settings = Prediction(order=2, max_predicted=4, tolerance=0.5, warmup=2)

    def denoise(window, step, x):
        return torch.tanh(torch.einsum("bcfhw,cd->bdfhw", x, mix)) * (1 + 0.05 * float(sigmas[step]))

    def noise_of(s, e):
        return noise[:, :, s:e]

    predictor = settings.bind(denoise, sigmas)
    whole = torch.cat([c.latents for c in sample_streaming(plan, sigmas, noise_of, predictor)], dim=2)
    assert predictor.predicted_steps > 0  # the test needs skipped steps to mean anything
    full_calls = predictor.full_steps

    class Stop(Exception):
        pass

    for stop_at in range(3, len(plan.windows) * steps, 5):
        first = settings.bind(denoise, sigmas)
        chunks, kept = [], {}

        def after(live, stop_at=stop_at, first=first):
            if live.window_steps == stop_at:
                live.extras = first.extras()
                kept["state"] = live.state_dict()
                raise Stop

        try:
            for chunk in sample_streaming(plan, sigmas, noise_of, first, after_step=after):
                chunks.append(chunk.latents)
        except Stop:
            pass
        torch.save(kept["state"], tmp_path / "s.pt")
        state = StreamState.from_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
        second = settings.bind(denoise, sigmas)
        second.load_extras(state.extras)
        rest = [c.latents for c in sample_streaming(plan, sigmas, noise_of, second, state=state)]
        assert torch.equal(torch.cat(chunks + rest, dim=2), whole), stop_at
        assert first.full_steps + second.full_steps == full_calls, stop_at
