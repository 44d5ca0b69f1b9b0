"""`avatarcli animate PORTRAIT --driving VIDEO` end to end on tiny FlashPortrait weights in the published layout:
the real face front end (ONNX detector and landmarks, PD-FGC), the real DiT with the expression block, the shared
wavefront sampler, streaming decode and the mp4 sink."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from avatarcli.cli import main
from avatarcli.media.audio import ffmpeg_exe
from avatarcli.media.video import probe_video
from avatarcli.testing import make_tiny_weights
from avatarcli.testing.flashportrait_face import synthetic_driving_frames, write_driving_clip

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = ["--size", "64x64", "--steps", "2", "--quiet"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("fp-weights"), model="flashportrait")


def run(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("frames,faceless,with_audio", [(7, (), True), (13, (3, 4), False)])
def test_driving_video_gives_a_video_of_its_frame_count_and_rate(tmp_path, weights, capsys, one_thread, frames,
                                                                   faceless, with_audio):
    clip = write_driving_clip(tmp_path / "drive.mp4", synthetic_driving_frames(frames, faceless=faceless), fps=20.0,
                              with_audio=with_audio)
    out = tmp_path / "out.mp4"
    code, stdout, stderr = run(["animate", EXAMPLES / "portrait.png", "--driving", clip, "-o", out, "--weights",
                                weights, *FAST, "--json"], capsys)
    assert code == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["driver"] == "driving" and summary["frames"] == frames and summary["steps"] == 2
    info = probe_video(out)
    assert info["frames"] == frames and abs(info["fps"] - 20.0) < 1e-6
    assert info["width"] == 64 and info["height"] == 64
    assert (info["audio_codec"] is not None) == with_audio


def test_no_audio_flag_writes_a_silent_video(tmp_path, weights, capsys, one_thread):
    clip = write_driving_clip(tmp_path / "drive.mp4", synthetic_driving_frames(5), with_audio=True)
    out = tmp_path / "out.mp4"
    code, _, stderr = run(["animate", EXAMPLES / "portrait.png", "--driving", clip, "-o", out, "--weights", weights,
                           *FAST, "--no-audio"], capsys)
    assert code == 0, stderr
    assert probe_video(out)["audio_codec"] is None


def bad_driving_cases(tmp_path: Path) -> dict[str, tuple[list, str]]:
    audio_only = tmp_path / "tone.m4a"
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=300:duration=1",
                    "-c:a", "aac", str(audio_only)], check=True)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01junk" * 500)
    faceless = write_driving_clip(tmp_path / "empty.mp4", [np.full((192, 192, 3), 8, np.uint8)] * 5)
    clip = write_driving_clip(tmp_path / "ok.mp4", synthetic_driving_frames(5))
    return {
        "no video stream": ([audio_only], "tone.m4a"),
        "unreadable file": ([garbage], "garbage.mp4"),
        "missing file": ([tmp_path / "nope.mp4"], "nope.mp4"),
        "no face at all": ([faceless], "empty.mp4"),
        "fps with driving": ([clip, "--fps", "30"], "--fps"),
        "audio guidance with driving": ([clip, "--guidance", "cfg"], "guidance"),
    }


@pytest.mark.parametrize("case", ["no video stream", "unreadable file", "missing file", "no face at all",
                                  "fps with driving", "audio guidance with driving"])
def test_bad_driving_input_exits_2_and_writes_nothing(tmp_path, weights, capsys, one_thread, case):
    extra, named = bad_driving_cases(tmp_path)[case]
    out = tmp_path / "result.mp4"
    code, _, stderr = run(["animate", EXAMPLES / "portrait.png", "-o", out, "--weights", weights, *FAST,
                           "--driving", *extra], capsys)
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and named in stderr and "Traceback" not in stderr
    assert not out.exists() and not list(tmp_path.glob(".result*"))


def test_turbo_runs_the_four_step_path_with_the_tiny_decoder(tmp_path, weights, capsys, one_thread):
    clip = write_driving_clip(tmp_path / "drive.mp4", synthetic_driving_frames(9))
    out = tmp_path / "turbo.mp4"
    code, stdout, stderr = run(["animate", EXAMPLES / "portrait.png", "--driving", clip, "-o", out, "--weights",
                                weights, "--size", "64x64", "--preset", "turbo", "--json"], capsys)
    assert code == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    windows = summary["windows"]
    assert summary["steps"] == 4 and summary["nfe"] == 4 * windows  # one batched guided forward per window-step
    assert summary["encode_mode"] == "whole"  # the reference clip's encode plan (features/image.py), as --audio's
    assert probe_video(out)["frames"] == 9


def test_turbo_decodes_differently_from_the_full_decoder(tmp_path, weights, capsys, one_thread):
    from avatarcli.media.video import iter_video_frames as read_frames

    clip = write_driving_clip(tmp_path / "drive.mp4", synthetic_driving_frames(5))
    videos = {}
    for decoder in ("tiny", "full"):
        out = tmp_path / f"{decoder}.mp4"
        code, _, stderr = run(["animate", EXAMPLES / "portrait.png", "--driving", clip, "-o", out, "--weights",
                               weights, "--size", "64x64", "--preset", "turbo", "--decoder", decoder, "--crf", "0",
                               "--quiet"], capsys)
        assert code == 0, stderr
        videos[decoder] = np.stack(list(read_frames(out)))
    assert videos["tiny"].shape == videos["full"].shape
    assert np.abs(videos["tiny"].astype(int) - videos["full"].astype(int)).mean() > 1.0


def test_turbo_with_audio_is_refused(tmp_path, weights, capsys):
    code, _, stderr = run(["animate", EXAMPLES / "portrait.png", "--audio", EXAMPLES / "speech.wav", "-o",
                           tmp_path / "o.mp4", "--preset", "turbo", *FAST], capsys)
    assert code == 2 and "turbo" in stderr and "--driving" in stderr
