"""What a first run shows: fast help and rejection (no torch imported), help texts, preset display, an honest
progress bar, a quiet make_tiny_weights. Everything runs the installed console script or a fresh interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avatarcli.media.audio import SAMPLE_RATE, write_wav
from avatarcli.testing import make_tiny_weights
from avatarcli.testing.console import CLI

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HEAVY = ("torch", "diffusers", "transformers", "onnxruntime", "cv2")


def cli(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def heavy_modules_after(code: str) -> list[str]:
    probe = code + f"\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return eval(result.stdout.strip().splitlines()[-1])


def test_importing_the_cli_imports_no_model_library():
    assert heavy_modules_after("import avatarcli.cli") == []


def rejected_inputs(folder: Path) -> dict[str, list[str]]:
    unreadable = folder / "notes.wav"
    unreadable.write_text("not audio\n" * 100)
    portrait, speech, out = EXAMPLES / "portrait.png", EXAMPLES / "speech.wav", folder / "o.mp4"
    return {
        "--help": ["--help"],
        "animate --help": ["animate", "--help"],
        "--version": ["--version"],
        "download --help": ["download", "--help"],
        "missing portrait": ["animate", str(folder / "nope.png"), "--audio", str(speech), "-o", str(out)],
        "unreadable audio": ["animate", str(portrait), "--audio", str(unreadable), "-o", str(out)],
        "bad flag": ["animate", str(portrait), "--audio", str(speech), "--no-such-flag"],
        "no weights folder": ["animate", str(portrait), "--audio", str(speech), "-o", str(out), "--weights",
                              str(folder / "nowhere")],
    }


EXPECTED_CODE = {"--help": 0, "animate --help": 0, "--version": 0, "download --help": 0, "missing portrait": 2, "unreadable audio": 2,
                 "bad flag": 2, "no weights folder": 3}


@pytest.mark.parametrize("case", sorted(EXPECTED_CODE))
def test_help_and_rejected_input_never_import_torch(tmp_path, case):
    args = rejected_inputs(tmp_path)[case]
    code = f"from avatarcli.cli import main\nrc = main({args!r})\nassert rc == {EXPECTED_CODE[case]}, rc"
    assert heavy_modules_after(code) == []


def test_download_help_lists_every_model():
    from avatarcli.hub import MODELS

    result = cli("download", "--help")
    assert result.returncode == 0
    listed = result.stdout.split("Models:", 1)[1]
    for name in MODELS:
        assert re.search(rf"^\s+{re.escape(name)}\s", listed, re.M), name


def option_descriptions(help_text: str) -> dict[str, str]:
    """{option: its description without the [default: ...] / [required] notes} from click's Options section."""
    blocks: dict[str, str] = {}
    current = None
    for line in help_text.split("Options:", 1)[1].splitlines():
        entry = re.match(r"^  (?:-\w, )?(--[\w-]+)(?: (?:<[^>]+>|[A-Z]+))?(.*)$", line)
        if entry:
            current = entry.group(1)
            blocks[current] = entry.group(2)
        elif current and line.startswith(" " * 6):
            blocks[current] += " " + line.strip()
    return {name: re.sub(r"\[(default: [^\]]*|required)\]", "", text).strip() for name, text in blocks.items()}


def test_sfd_help_has_a_class_metavar_and_help_for_every_option():
    result = cli("sfd", "--help")
    assert result.returncode == 0
    assert "<list[str]>" not in result.stdout and "--class ID" in result.stdout
    described = option_descriptions(result.stdout)
    assert {"--seed", "--batch-size", "--class", "--weights"} <= set(described)
    assert [name for name, text in described.items() if not text] == []


def test_presets_show_never_prints_none():
    result = cli("presets", "quality")
    assert result.returncode == 0
    assert "None" not in result.stdout
    assert re.search(r"^seed: not set", result.stdout, re.M)


def test_make_tiny_weights_is_quiet(tmp_path):
    code = ("from avatarcli.testing import make_tiny_weights\n"
            f"make_tiny_weights({str(tmp_path / 'sa')!r})\n"
            f"make_tiny_weights({str(tmp_path / 'sfd')!r}, model='sfd')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


def test_progress_counts_window_steps_and_silent_audio_still_runs(tmp_path):
    from avatarcli.presets import load_preset
    from avatarcli.sampling.windows import latent_frames_for, plan_windows

    seconds, steps = 3.8, 2
    audio = tmp_path / "silence.wav"
    write_wav(audio, np.zeros(int(seconds * SAMPLE_RATE)))
    weights = make_tiny_weights(tmp_path / "weights")
    out = tmp_path / "o.mp4"
    result = cli("animate", EXAMPLES / "portrait.png", "--audio", audio, "-o", out, "--weights", weights,
                 "--size", "64x64", "--steps", steps)
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    preset = load_preset("balanced")
    frames = round(seconds * preset.fps)
    windows = len(plan_windows(latent_frames_for(frames), 21, preset.overlap, preset.blend).windows)
    assert windows >= 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "warning: the audio is silent: the portrait will not speak"
    final = [line for line in lines if "window-steps" in line][-1]
    assert f"windows {windows}/{windows}" in final and f"window-steps {windows * steps}/{windows * steps}" in final
    assert not re.search(r"(?<!window-)steps \d", result.stderr)
