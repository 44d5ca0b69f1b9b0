"""Issue 27's input limits and small fixes: bounded sizes and lengths (checked before torch is imported), an existing
output refused unless --overwrite, `.mp4` added to a bare output name, `presets NAME --yaml` loading back, and the
small ones (sfd's download hint, --weights FILE, a typo'd manifest key, doctor's disk check, --crf 0, the usage line,
.gitignore).

Bad input runs through `main` in a fresh Python process that reports whether torch was imported: a refusal that
comes before any model loads leaves it unimported. An accepted input is shown by the run getting past every input
check to the --weights folder that does not exist (exit 3).
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from avatarcli import doctor, limits
from avatarcli.cli import main
from avatarcli.media.audio import ffmpeg_exe, write_wav
from avatarcli.options import HELP, build_job
from avatarcli.presets import list_presets, load_preset, preset_yaml
from avatarcli.resume import resume_dir
from avatarcli.testing.console import CLI
from test_input_edges import png_header_only

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PORTRAIT, SPEECH = EXAMPLES / "portrait.png", EXAMPLES / "speech.wav"
NO_WEIGHTS = "/no/such/weights/folder"
PROBE = ("import sys; from avatarcli.cli import main; code = main(sys.argv[1:]); "
         "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); sys.exit(code)")


def probe(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`avatarcli ARGS` through main() in a fresh process; stdout ends with whether torch was imported."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def refused(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one stderr line of a refusal that came before torch was imported."""
    assert result.returncode == code, result.stderr
    assert result.stdout.strip().endswith("torch not imported"), result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def accepted(result: subprocess.CompletedProcess) -> None:
    """Every input check passed: the run stopped at the missing --weights folder (exit 3)."""
    assert result.returncode == 3, result.stderr
    assert NO_WEIGHTS in result.stderr.strip().splitlines()[-1]


def run(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def wav_header_only(path: Path, seconds: float, rate: int = 16000) -> Path:
    """A mono 16-bit WAV whose header declares `seconds` of audio but which holds 0.1 s."""
    data = int(seconds * rate) * 2
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", data) + bytes(rate // 5)
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + data) + body)
    return path


@pytest.fixture(scope="module")
def driving_video(tmp_path_factory) -> Path:
    """1 s of a 64x64 test pattern at 25 fps (25 frames)."""
    path = tmp_path_factory.mktemp("driving") / "face.mp4"
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=25",
                    "-t", "1", "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


# ---- 1. bounded sizes ------------------------------------------------------------------------------------------


def test_the_limits_follow_from_the_stated_memory_rule_and_help_states_them(capsys):
    gib = 1024**3
    assert limits.max_pixels("audio") == (80 * gib - round(4.4 * gib)) // limits.FRAME_MEMORY["audio"][1]
    assert 2.9e6 < limits.max_pixels("audio") < 3.0e6 and 1.6e6 < limits.max_pixels("driving") < 1.75e6
    assert limits.MAX_AUDIO_SECONDS * limits.AUDIO_BYTES_PER_SECOND <= limits.HOST_BUDGET
    code, stdout, _ = run(["animate", "--help"], capsys)
    text = " ".join(stdout.split())
    assert code == 0
    for number in (f"{limits.max_pixels('audio') / 1e6:.2f}", f"{limits.max_pixels('driving') / 1e6:.2f}",
                   f"{limits.MAX_AUDIO_SECONDS} s", f"{limits.MAX_DRIVING_FRAMES:,} frames", "268 megapixels",
                   "80 GiB", "kB of GPU memory per pixel"):
        assert number in text, number


@pytest.mark.parametrize("size,allowed,named", [
    ("100000x100000", False, "at most 4096 px"),  # once accepted: the kernel killed it after 107 s
    ("1728x1728", False, "2.99 megapixels"),  # just over --audio's 2.97
    ("1712x1712", True, ""),
])
def test_an_audio_size_over_the_limit_exits_2_before_torch(tmp_path, size, allowed, named):
    result = probe("animate", PORTRAIT, "--audio", SPEECH, "--size", size, "-o", tmp_path / "o.mp4", "--weights",
                   NO_WEIGHTS)
    if allowed:
        accepted(result)
    else:
        assert named in refused(result) and f"--size {size}" in result.stderr


@pytest.mark.parametrize("size,allowed", [("1312x1312", False), ("1296x1296", True)])  # --driving: 1.69 megapixels
def test_a_driving_size_over_the_limit_exits_2_before_torch(tmp_path, driving_video, size, allowed):
    result = probe("animate", PORTRAIT, "--driving", driving_video, "--size", size, "-o", tmp_path / "o.mp4",
                   "--weights", NO_WEIGHTS)
    if allowed:
        accepted(result)
    else:
        assert "with --driving at most 1.69" in refused(result)


def test_an_auto_driving_size_over_the_limit_exits_2(tmp_path, driving_video, capsys):
    preset = tmp_path / "big.yaml"  # the portrait's longer side scaled to 4096: 4096x4096
    preset.write_text(preset_yaml(load_preset("balanced")).replace("max_size: 720", "max_size: 4096"))
    code, _, stderr = run(["animate", PORTRAIT, "--driving", driving_video, "--preset", preset, "-o",
                           tmp_path / "o.mp4", "--weights", NO_WEIGHTS], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "the output size 4096x4096" in stderr and "max_size 4096" in stderr


def test_portrait_pixels_and_audio_length_over_the_limits_exit_2_before_torch(tmp_path):
    huge = png_header_only(tmp_path / "huge.png", 20000, 20000)
    out = tmp_path / "o.mp4"
    assert "268 megapixels" in refused(probe("animate", huge, "--audio", SPEECH, "-o", out, "--weights", NO_WEIGHTS))
    long = wav_header_only(tmp_path / "long.wav", limits.MAX_AUDIO_SECONDS + 1)
    line = refused(probe("animate", PORTRAIT, "--audio", long, "-o", out, "--weights", NO_WEIGHTS))
    assert "long.wav" in line and f"the limit is {limits.MAX_AUDIO_SECONDS} s" in line
    accepted(probe("animate", PORTRAIT, "--audio", wav_header_only(tmp_path / "ok.wav", 60), "-o", out, "--weights",
                   NO_WEIGHTS))


def test_compressed_audio_and_driving_video_lengths_are_bounded(tmp_path, driving_video, capsys, monkeypatch):
    mp3 = tmp_path / "talk.mp3"
    write_wav(tmp_path / "talk.wav", 0.3 * np.sin(np.linspace(0, 2000, 3 * 16000)))
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(tmp_path / "talk.wav"), str(mp3)], check=True)
    monkeypatch.setattr(limits, "MAX_AUDIO_SECONDS", 2)  # decoded by ffmpeg: its stated length, then a capped decode
    code, _, stderr = run(["animate", PORTRAIT, "--audio", mp3, "-o", tmp_path / "o.mp4", "--weights", NO_WEIGHTS],
                          capsys)
    assert code == 2 and "the limit is 2 s" in stderr and len(stderr.strip().splitlines()) == 1
    monkeypatch.setattr(limits, "MAX_DRIVING_FRAMES", 24)  # the video has 25
    code, _, stderr = run(["animate", PORTRAIT, "--driving", driving_video, "-o", tmp_path / "o.mp4", "--weights",
                           NO_WEIGHTS], capsys)
    assert code == 2 and "has 25 frames" in stderr and "the limit is 24 frames" in stderr


def test_a_manifest_gets_the_same_size_check(tmp_path):
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text(f"- {{portrait: {PORTRAIT}, audio: {SPEECH}, size: 100000x100000}}\n"
                        f"- {{portrait: {PORTRAIT}, audio: {SPEECH}, size: 1728x1728, output: b.mp4}}\n")
    result = probe("batch", manifest)
    assert result.returncode == 2 and result.stdout.strip().endswith("torch not imported"), result.stderr
    lines = result.stderr.strip().splitlines()
    assert "job 1: 'size' 100000x100000 is too large" in lines[0]
    assert "job 2: 'size' 1728x1728 is 2.99 megapixels" in lines[1]


# ---- 2. overwrite and names ------------------------------------------------------------------------------------


def test_animate_refuses_an_existing_output_unless_overwrite(tmp_path):
    out = tmp_path / "talk.mp4"
    out.write_bytes(b"an earlier video")
    line = refused(probe("animate", PORTRAIT, "--audio", SPEECH, "-o", out, "--weights", NO_WEIGHTS))
    assert f"{out} exists" in line and "--overwrite" in line
    assert out.read_bytes() == b"an earlier video"
    accepted(probe("animate", PORTRAIT, "--audio", SPEECH, "-o", out, "--weights", NO_WEIGHTS, "--overwrite"))


def test_a_resume_of_the_run_saved_beside_an_existing_output_is_not_refused(tmp_path):
    out = tmp_path / "talk.mp4"
    out.write_bytes(b"the video an --overwrite run is replacing")
    saved = resume_dir(out)
    saved.mkdir()
    (saved / "state.pt").write_bytes(b"")
    (saved / "state.json").write_text('{"version": 0}')  # read after the output check: an old format, exit 2
    line = refused(probe("animate", PORTRAIT, "--audio", SPEECH, "-o", out, "--weights", NO_WEIGHTS, "--resume"))
    assert "exists" not in line and str(saved) in line
    assert "exists: add --overwrite" in refused(probe("animate", PORTRAIT, "--audio", SPEECH, "-o", out, "--weights",
                                                      NO_WEIGHTS))


def test_an_output_name_without_mp4_gets_it_and_other_video_suffixes_are_refused(tmp_path):
    job = build_job({"portrait": str(PORTRAIT), "audio": str(SPEECH), "output": str(tmp_path / "take.2")})
    assert job.output == tmp_path / "take.2.mp4"
    assert build_job({"portrait": str(PORTRAIT), "audio": str(SPEECH), "output": "A.MP4"}).output == Path("A.MP4")
    line = refused(probe("animate", PORTRAIT, "--audio", SPEECH, "-o", tmp_path / "take.mov"))
    assert "writes MP4" in line and "take.mp4" in line
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text(f"- {{portrait: {PORTRAIT}, audio: {SPEECH}, output: take}}\n")
    from avatarcli.batch import validate

    assert validate(manifest)[0].output == tmp_path / "take.mp4"


def test_the_summary_says_mp4_was_added(tmp_path, capsys, one_thread):
    from avatarcli.testing import make_tiny_weights

    weights = make_tiny_weights(tmp_path / "weights", model="stableavatar")
    write_wav(tmp_path / "talk.wav", 0.3 * np.sin(np.linspace(0, 900, 8000)))
    code, _, stderr = run(["animate", PORTRAIT, "--audio", tmp_path / "talk.wav", "-o", tmp_path / "take", "--weights",
                           weights, "--size", "64x64", "--steps", "2"], capsys)
    assert code == 0, stderr
    assert (tmp_path / "take.mp4").is_file() and not (tmp_path / "take").exists()
    assert f"wrote {tmp_path / 'take.mp4'} (.mp4 added to the name given):" in stderr


# ---- 3. presets NAME --yaml ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [preset.name for preset in list_presets()])
def test_presets_yaml_loads_back_as_the_same_preset(tmp_path, capsys, name):
    code, stdout, _ = run(["presets", name, "--yaml"], capsys)
    assert code == 0
    assert not re.search(r"^name:", stdout, re.M) and "Prediction(" not in stdout and "('" not in stdout
    path = tmp_path / "mine.yaml"
    path.write_text(stdout)
    loaded = load_preset(path)  # the preset loader, with its schema
    assert dataclasses.replace(loaded, name=name) == load_preset(name)


# ---- 4. the small ones -----------------------------------------------------------------------------------------


def test_sfd_missing_file_hint_names_the_dir_its_weights_need(tmp_path, capsys):
    code, _, stderr = run(["sfd", "--weights", tmp_path, "--class", "1", "-o", tmp_path / "grid.png"], capsys)
    assert code == 3 and len(stderr.strip().splitlines()) == 1
    assert f"avatarcli download sfd-xl --dir {tmp_path}" in stderr


def test_weights_given_a_file_says_a_folder_is_needed(tmp_path):
    line = refused(probe("animate", PORTRAIT, "--audio", SPEECH, "-o", tmp_path / "o.mp4", "--weights", SPEECH))
    assert "is a file" in line and "folder" in line and "does not exist" not in line


def test_a_typo_in_a_manifest_key_names_the_job_once_and_suggests_the_key(tmp_path):
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text(f"- {{portrait: {PORTRAIT}, audio: {SPEECH}, sed: 3}}\n")
    result = subprocess.run([*CLI, "batch", str(manifest)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[0]
    assert "did you mean 'seed'?" in line and line.count("job 1") == 1, line


def test_doctor_compares_free_disk_with_the_models_asked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing downloaded
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: usage(500 * 1024**3, 0, 50 * 1024**3))

    def disk(models):
        return next((status, detail) for check, status, detail in doctor.doctor_report(models=models)
                    if check == "disk")

    assert disk(["stableavatar"])[0] == "ok"  # ~24 GiB of 50: was a warning against all models' 145
    status, detail = disk(["stableavatar", "flashportrait"])
    assert status == "warn" and "145 GiB" in detail


def test_crf_0_keeps_4_2_0_and_help_says_which_profile_it_needs(tmp_path):
    from avatarcli.sink.ffmpeg import Mp4Sink

    path = tmp_path / "lossless.mp4"
    with Mp4Sink(path, 64, 64, 25, crf=0) as sink:
        sink.write(np.zeros((3, 64, 64, 3), np.uint8))
    stream = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    video = next(line for line in stream.splitlines() if "Video:" in line)
    assert "yuv420p" in video
    if "High 4:4:4" in video:  # lossless H.264 exists only in this profile: the help must say so
        assert "High 4:4:4 Predictive" in HELP["crf"] and "cannot play" in HELP["crf"]


@pytest.mark.parametrize("command,usage", [("animate", "[OPTIONS] PORTRAIT"), ("batch", "[OPTIONS] MANIFEST"),
                                           ("eval", "[OPTIONS] VIDEO"), ("presets", "[OPTIONS] [NAME]")])
def test_the_usage_line_names_arguments_in_capitals(capsys, command, usage):
    code, stdout, _ = run([command, "--help"], capsys)
    assert code == 0
    assert stdout.splitlines()[0] == f"Usage: avatarcli {command} {usage}"


def readme_outputs() -> set[str]:
    """What the README's commands write in the folder they run in (not their inputs under examples/)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    written = set()
    for line in "\n".join(blocks).splitlines():
        written |= set(re.findall(r"(?:-o|--speech|--video|--plot|--out|--report) (\S+)", line))
        written |= set(re.findall(r"make_tiny_weights\('([^']+)'\)", line))
        if line.startswith("avatarcli animate") and " -o " not in line:  # -> PORTRAIT.mp4 where it runs
            written.add(Path(line.split()[2]).stem + ".mp4")
    return {name for name in written if not name.startswith("examples/")}


def test_gitignore_covers_what_the_readme_commands_create():
    written = readme_outputs()
    assert {"face.png", "talk.wav", "truth.mp4", "curves.png", "tiny-weights", "example.mp4"} <= written
    paths = [f"{name}/a-file" if "." not in name else name for name in written]
    paths += [".face.resume/state.pt", ".face.partial.mp4"]  # beside an output: the resume state, the partial file
    result = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert set(result.stdout.split()) == set(paths)
