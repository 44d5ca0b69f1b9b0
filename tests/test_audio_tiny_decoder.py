"""`animate --audio --decoder tiny`: the StableAvatar latents decoded by the tiny Wan2.1 decoder (TAEHV, FlashPortrait's
`fast_vae.pth`), found in the --weights folder or fetched alone as the `taehv` download."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from avatarcli import hub
from avatarcli.cli import main
from avatarcli.media.video import iter_video_frames, probe_video
from avatarcli.testing import make_tiny_weights
from avatarcli.testing.flashportrait_turbo import write_tiny_fast_vae

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = ["--size", "64x64", "--steps", "2", "--crf", "0"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    folder = make_tiny_weights(tmp_path_factory.mktemp("weights"), model="stableavatar")
    write_tiny_fast_vae(folder / "fast_vae.pth")
    return folder


def run(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_tiny_decoder_gives_as_many_frames_as_the_full_one_and_other_pixels(tmp_path, weights, capsys, one_thread):
    videos = {}
    for decoder in ("tiny", "full"):
        out = tmp_path / f"{decoder}.mp4"
        code, stdout, stderr = run(["animate", EXAMPLES / "portrait.png", "--audio", EXAMPLES / "speech.wav", "-o",
                                    out, "--weights", weights, "--decoder", decoder, "--json", *FAST], capsys)
        assert code == 0, stderr
        summary = json.loads(stdout.strip().splitlines()[-1])
        videos[decoder] = np.stack(list(iter_video_frames(out)))
        assert probe_video(out)["frames"] == summary["frames"] == len(videos[decoder])
    assert videos["tiny"].shape == videos["full"].shape
    assert np.abs(videos["tiny"].astype(int) - videos["full"].astype(int)).mean() > 1.0


def test_the_demo_model_has_no_tiny_decoder(tmp_path, capsys):
    out = tmp_path / "o.mp4"
    code, _, stderr = run(["animate", EXAMPLES / "portrait.png", "--audio", EXAMPLES / "speech.wav", "-o", out,
                           "--model", "demo", "--decoder", "tiny"], capsys)
    assert code == 2 and "demo" in stderr and "--decoder full" in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_without_the_file_and_offline_it_exits_3_naming_the_download(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = make_tiny_weights(tmp_path / "w", model="stableavatar")  # no fast_vae.pth
    out = tmp_path / "o.mp4"
    code, _, stderr = run(["animate", EXAMPLES / "portrait.png", "--audio", EXAMPLES / "speech.wav", "-o", out,
                           "--weights", folder, "--decoder", "tiny", *FAST], capsys)
    assert code == 3, stderr
    assert "taehv" in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_taehv_downloads_the_one_file():
    assert hub.required_files("taehv") == ["fast_vae.pth"]
    assert hub.model_spec("taehv").repo_id == "FrancisRing/FlashPortrait"
