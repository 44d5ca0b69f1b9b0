"""`avatarcli animate` end to end on tiny random weights in the published layout: real loading, sampling, decoding,
H.264 + AAC muxing. Runs the CLI's own entry point in-process (one test runs the installed console script)."""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from avatarcli.cli import main
from avatarcli.media.audio import ffmpeg_exe
from avatarcli.media.video import probe_video
from avatarcli.testing import make_tiny_weights

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = ["--size", "64x64", "--steps", "2", "--quiet"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("weights"), model="stableavatar")


def speech(path: Path, seconds: float, sample_rate: int = 16000) -> Path:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    voice = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes((voice * 32767).astype(np.int16).tobytes())
    return path


def to_mp3(wav: Path) -> Path:
    mp3 = wav.with_suffix(".mp3")
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(wav), "-c:a", "libmp3lame", str(mp3)],
                   check=True)
    return mp3


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# 10 s is several windows; it runs once, from mp3 (decoded to the same samples a wav gives, then the same path; the
# wav reader has the 0.5 s case), where a second 10 s run from wav only repeated the sampling and decoding.
@pytest.mark.parametrize("seconds,fmt", [(0.5, "wav"), (3.3, "mp3"), (10.0, "mp3")])
def test_animate_writes_h264_aac_mp4_as_long_as_the_audio(tmp_path, weights, capsys, seconds, fmt):
    audio = speech(tmp_path / "talk.wav", seconds)
    if fmt == "mp3":
        audio = to_mp3(audio)
    out = tmp_path / "out.mp4"
    code, stdout, stderr = run(["animate", EXAMPLES / "portrait.png", "--audio", audio, "-o", out,
                                "--weights", weights, *FAST], capsys)
    assert code == 0, stderr
    info = probe_video(out)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac"
    assert (info["width"], info["height"]) == (64, 64)
    assert abs(info["frames"] - seconds * 25) <= 1
    assert abs(info["audio_seconds"] - seconds) < 0.1  # mp3 encoder padding stays well under a frame pair
    assert not list(tmp_path.glob(".*partial*"))


def test_json_summary_is_one_machine_readable_line(tmp_path, weights, capsys):
    out = tmp_path / "o.mp4"
    code, stdout, _ = run(["animate", EXAMPLES / "portrait.png", "--audio", speech(tmp_path / "a.wav", 1.0), "-o",
                           out, "--weights", weights, "--size", "64x64", "--steps", "1", "--json"], capsys)
    assert code == 0
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["output"] == str(out) and summary["frames"] == probe_video(out)["frames"]
    assert {"features", "dit", "decode", "encode"} <= set(summary["timings"])
    assert summary["peak_rss_bytes"] > 0


def test_flags_override_the_preset(tmp_path, weights, capsys):
    out = tmp_path / "o.mp4"
    code, stdout, _ = run(["animate", EXAMPLES / "portrait.png", "--audio", speech(tmp_path / "a.wav", 1.0),
                           "-o", out, "--weights", weights, "--preset", "reference", "--size", "80x64",
                           "--fps", "20", "--steps", "1", "--guidance", "ang", "--json"], capsys)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["size"] == "80x64" and summary["fps"] == 20 and summary["steps"] == 1
    assert abs(probe_video(out)["frames"] - 20) <= 1


def test_cfg_scale_flags_reach_the_guidance(tmp_path, weights, capsys, monkeypatch):
    from avatarcli.sampling.guidance import Guidance

    seen = set()
    combine = Guidance.combine

    def recording(self, *args, **kwargs):
        seen.add((self.mode, self.text_scale, self.audio_scale))
        return combine(self, *args, **kwargs)

    monkeypatch.setattr(Guidance, "combine", recording)
    code, _, _ = run(["animate", EXAMPLES / "portrait.png", "--audio", speech(tmp_path / "a.wav", 0.5), "-o",
                      tmp_path / "o.mp4", "--weights", weights, *FAST, "--guidance", "cfg", "--text-scale", "2",
                      "--audio-scale", "7.5"], capsys)
    assert code == 0
    assert seen == {("cfg", 2.0, 7.5)}


def test_installed_console_script_runs():
    """The console script is installed and starts the CLI. Whole `animate` runs through it (exit 0, the video
    written) are tests/test_cli_surface.py::test_progress_counts_window_steps_and_silent_audio_still_runs and
    tests/test_failure_paths.py, which run this same script: no third run of the models here."""
    import avatarcli

    script = Path(sys.executable).parent / "avatarcli"
    assert script.is_file()
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"avatarcli {avatarcli.__version__}"


# ---- bad input: exit 2, one line, nothing under the output name ---------------------------------------------------


def bad_input_cases(tmp_path: Path) -> dict[str, tuple[list, str]]:
    good_audio = speech(tmp_path / "ok.wav", 0.5)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    empty = tmp_path / "empty.wav"
    speech(empty, 0.0)
    text = tmp_path / "notes.txt"
    text.write_text("this is not audio\n" * 20)
    portrait = EXAMPLES / "portrait.png"
    return {
        "missing portrait": ([tmp_path / "nope.png", "--audio", good_audio], "nope.png"),
        "missing audio": ([portrait, "--audio", tmp_path / "nope.wav"], "nope.wav"),
        "corrupt image": ([corrupt, "--audio", good_audio], "corrupt.png"),
        "empty audio": ([portrait, "--audio", empty], "empty.wav"),
        "text file as audio": ([portrait, "--audio", text], "notes.txt"),
        "bad size": ([portrait, "--audio", good_audio, "--size", "100x7"], "size"),
        "unknown preset": ([portrait, "--audio", good_audio, "--preset", "no-such-preset"], "no-such-preset"),
        "both drivers": ([portrait, "--audio", good_audio, "--driving", good_audio], "--driving"),
        "audio scale without cfg": ([portrait, "--audio", good_audio, "--guidance", "ang", "--audio-scale", "4"],
                                    "audio_scale"),
    }


@pytest.mark.parametrize("case", ["missing portrait", "missing audio", "corrupt image", "empty audio",
                                  "text file as audio", "bad size", "unknown preset", "both drivers",
                                  "audio scale without cfg"])
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, weights, capsys, case):
    args, named = bad_input_cases(tmp_path)[case]
    out = tmp_path / "result.mp4"
    code, stdout, stderr = run(["animate", "-o", out, "--weights", weights, *FAST, *args], capsys)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ")
    assert named in stderr
    assert "Traceback" not in stderr
    assert not out.exists() and not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*.mp4"))


def test_unwritable_output_folder_exits_2(tmp_path, weights, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    out = blocker / "out.mp4"
    code, _, stderr = run(["animate", EXAMPLES / "portrait.png", "--audio", EXAMPLES / "speech.wav", "-o", out,
                           "--weights", weights, *FAST], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_no_driving_input_is_a_one_line_usage_error(capsys):
    code, _, stderr = run(["animate", EXAMPLES / "portrait.png"], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "--audio" in stderr and "--driving" in stderr


def test_offline_without_weights_names_download_and_weights_flag(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, _, stderr = run(["animate", EXAMPLES / "portrait.png", "--audio", EXAMPLES / "speech.wav", "-o",
                           tmp_path / "o.mp4", *FAST], capsys)
    assert code == 3 and len(stderr.strip().splitlines()) == 1  # an environment problem, not bad input
    assert "avatarcli download" in stderr and "--weights" in stderr
    assert not (tmp_path / "o.mp4").exists()


def test_presets_command_lists_the_four_presets(capsys):
    code, stdout, _ = run(["presets"], capsys)
    assert code == 0
    for name in ("reference", "quality", "balanced", "fast"):
        assert name in stdout
