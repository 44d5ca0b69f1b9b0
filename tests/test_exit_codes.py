"""Exit codes and failure messages as a shell script meets them: every case runs the installed console script in a
subprocess (0 ok, 1 bug, 2 bad input or usage, 3 environment, 130 interrupted; one line on stderr). The failures at
the model load run in one fresh interpreter, command after command, as the console script runs each (below)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import avatarcli
from avatarcli.testing import make_tiny_weights
from avatarcli.testing.console import CLI, tone

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def cli(*args, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=full_env, timeout=timeout)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("weights"), model="stableavatar")


def test_version_prints_the_package_version():
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"avatarcli {avatarcli.__version__}"


def test_unknown_flag_is_usage_exit_2():
    result = cli("animate", EXAMPLES / "portrait.png", "--audio", EXAMPLES / "speech.wav", "--no-such-flag")
    assert result.returncode == 2
    assert "--no-such-flag" in one_line(result.stderr)


def test_a_bad_flag_value_is_usage_exit_2(tmp_path):
    result = cli("animate", EXAMPLES / "portrait.png", "--audio", EXAMPLES / "speech.wav", "--crf", "99")
    assert result.returncode == 2
    assert one_line(result.stderr) == "error: --crf must be between 0 and 51, got 99"


@pytest.mark.parametrize("env,args", [
    ({}, ["doctor", "--weights", "/no/such/dir"]),
    ({"IMAGEIO_FFMPEG_EXE": "/nonexistent/ffmpeg"}, ["doctor"]),
])
def test_doctor_with_a_failing_check_exits_3(tmp_path, env, args):
    result = cli(*args, env={"HF_HOME": str(tmp_path / "hf"), **env})
    assert result.returncode == 3, result.stdout + result.stderr
    assert "fail" in result.stdout


def test_doctor_shows_free_memory(tmp_path):
    result = cli("doctor", env={"HF_HOME": str(tmp_path / "hf")})
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") >= 3}
    assert "GiB free of" in rows["memory"] and "RAM" in rows["memory"]


# ---- failures at the model load: one fresh interpreter runs them all ---------------------------------------------
# Each of these commands imports torch and diffusers before it fails (about 8 s of CPU a process on 2 cores), so one
# interpreter runs them one after the other, each as the console script does (sys.argv, then `main()`), its stderr
# (file descriptor 2, C libraries' too) kept apart per command. Every case keeps its own test and assertions.

LOAD_FAILURES = textwrap.dedent('''
    import json, os, sys, tempfile
    from avatarcli.cli import main
    results = {}
    for name, args in json.loads(sys.argv[1]).items():
        sys.argv = ["avatarcli", *args]
        with tempfile.TemporaryFile("w+") as err:
            sys.stderr.flush()
            kept = os.dup(2)
            os.dup2(err.fileno(), 2)
            try:
                code = main()
            finally:
                sys.stderr.flush()
                os.dup2(kept, 2)
                os.close(kept)
            err.seek(0)
            results[name] = [code, err.read()]
    print(json.dumps(results))
''')


@pytest.fixture(scope="module")
def load_failures(tmp_path_factory, weights) -> dict:
    """{case: (CompletedProcess of that command, its folder)} for the commands that fail while loading models."""
    import json
    import shutil

    folders = {name: tmp_path_factory.mktemp(name.replace(" ", "-")) for name in
               ("sfd missing file", "missing weight files", "corrupt weight file", "offline", "fp8")}
    empty = folders["missing weight files"] / "weights"
    empty.mkdir()
    broken = folders["corrupt weight file"] / "weights"
    shutil.copytree(weights, broken)
    transformer = broken / "StableAvatar-1.3B" / "transformer3d-square.pt"
    transformer.write_bytes(transformer.read_bytes()[:1000])  # a truncated download
    animate = ["animate", EXAMPLES / "portrait.png", "--audio", EXAMPLES / "speech.wav", "-o"]
    cases = {
        "sfd missing file": ["sfd", "--weights", folders["sfd missing file"], "--class", "1", "-o",
                             folders["sfd missing file"] / "grid.png"],
        "missing weight files": [*animate, folders["missing weight files"] / "out.mp4", "--weights", empty, "--quiet"],
        "corrupt weight file": [*animate, folders["corrupt weight file"] / "o.mp4", "--weights", broken, "--size",
                                "64x64", "--quiet"],
        "offline": [*animate, folders["offline"] / "o.mp4", "--quiet"],  # no --weights: the Hub cache, offline
        "fp8": ["animate", EXAMPLES / "portrait.png", "--audio", tone(folders["fp8"] / "a.wav", 1.0), "-o",
                folders["fp8"] / "o.mp4", "--weights", folders["fp8"], "--device", "cpu", "--precision", "fp8",
                "--quiet"],
    }
    hub = tmp_path_factory.mktemp("hf")  # an empty Hub cache, offline (the other commands name their weights)
    result = subprocess.run([sys.executable, "-c", LOAD_FAILURES,
                             json.dumps({name: [str(a) for a in args] for name, args in cases.items()})],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(hub), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    return {name: (subprocess.CompletedProcess(cases[name], code, "", err), folders[name])
            for name, (code, err) in outcome.items()}


def test_sfd_with_a_missing_weight_file_exits_3_naming_the_download(load_failures):
    result, folder = load_failures["sfd missing file"]
    assert result.returncode == 3
    assert "avatarcli download sfd-xl" in one_line(result.stderr)
    assert not (folder / "grid.png").exists()


def test_missing_weight_files_exit_3(load_failures):
    result, folder = load_failures["missing weight files"]
    assert result.returncode == 3
    assert "avatarcli download stableavatar" in one_line(result.stderr)
    assert not (folder / "out.mp4").exists()


def test_corrupt_weight_file_exits_3(load_failures):
    result, _ = load_failures["corrupt weight file"]
    assert result.returncode == 3
    assert "transformer3d-square.pt" in one_line(result.stderr)


def test_offline_without_weights_exits_3(load_failures):
    result, _ = load_failures["offline"]
    assert result.returncode == 3
    line = one_line(result.stderr)
    assert "avatarcli download" in line and "--weights" in line


def test_network_failure_exits_3(tmp_path):
    # Nothing listens on port 9 of the loopback interface: the connection is refused at once.
    result = cli("download", "stableavatar", "--dir", tmp_path / "dl",
                 env={"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 3
    assert "rerun `avatarcli download stableavatar`" in one_line(result.stderr)


# ---- failures injected into the real console script (a sitecustomize on PYTHONPATH patches one function) --------

FAULTS = textwrap.dedent('''
    import errno, os
    fault = os.environ.get("AVATARCLI_TEST_FAULT")
    if fault == "bug":
        import avatarcli.presets
        def list_presets():
            return 1 / 0
        avatarcli.presets.list_presets = list_presets
    elif fault == "disk-full":
        import avatarcli.sink.ffmpeg
        def check_writable_output(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        avatarcli.sink.ffmpeg.check_writable_output = check_writable_output
    elif fault == "decode-oom":
        import torch
        import avatarcli.decode.stream
        def push(self, latents):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        avatarcli.decode.stream.StreamingDecoder.push = push
    elif fault == "cuda-oom":
        import torch
        import avatarcli.pipeline
        def animate(job, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        avatarcli.pipeline.animate = animate
    elif fault == "no-imageio-ffmpeg":
        import sys
        sys.modules["imageio_ffmpeg"] = None  # `import imageio_ffmpeg` raises ModuleNotFoundError, as if uninstalled
''')


@pytest.fixture
def fault_env(tmp_path) -> callable:
    (tmp_path / "sitecustomize.py").write_text(FAULTS)

    def env(fault: str) -> dict:
        return {"PYTHONPATH": str(tmp_path), "AVATARCLI_TEST_FAULT": fault}

    return env


def test_a_bug_exits_1_with_one_line_and_the_debug_hint(fault_env):
    result = cli("presets", env=fault_env("bug"))
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "ZeroDivisionError" in line and "run with --debug for the traceback" in line


@pytest.mark.parametrize("where", ["first", "last"])
def test_debug_shows_the_traceback(fault_env, where):
    args = ["--debug", "presets"] if where == "first" else ["presets", "--debug"]
    result = cli(*args, env=fault_env("bug"))
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "1 / 0" in result.stderr


def test_disk_full_exits_3(fault_env, tmp_path):
    out = tmp_path / "o.mp4"
    result = cli("animate", EXAMPLES / "portrait.png", "--audio", EXAMPLES / "speech.wav", "-o", out,
                 env=fault_env("disk-full"))
    assert result.returncode == 3
    assert "disk is full" in one_line(result.stderr)


def test_a_missing_required_package_exits_3_naming_it(fault_env, tmp_path, weights):
    out = tmp_path / "o.mp4"
    result = cli("animate", EXAMPLES / "portrait.png", "--audio", tone(tmp_path / "a.wav", 1.0), "-o", out,
                 "--weights", weights, "--size", "64x64", "--steps", "2", "--quiet",
                 env=fault_env("no-imageio-ffmpeg"))
    assert result.returncode == 3
    line = one_line(result.stderr)
    assert "imageio-ffmpeg" in line and "Traceback" not in result.stderr
    assert list(tmp_path.glob("o*")) == [] and list(tmp_path.glob(".o*")) == []


def test_an_unknown_missing_module_is_still_a_bug():
    from avatarcli.errors import as_environment_problem

    assert as_environment_problem(ModuleNotFoundError("No module named 'nowhere'", name="nowhere")) is None
    problem = as_environment_problem(ModuleNotFoundError("No module named 'cv2'", name="cv2"))
    assert problem is not None and "opencv-python-headless" in str(problem)
    problem = as_environment_problem(ModuleNotFoundError("No module named 'diffusers.x'", name="diffusers.x"))
    assert problem is not None and "has no module diffusers.x" in str(problem)


def test_cuda_out_of_memory_exits_3(fault_env, tmp_path):
    result = cli("animate", EXAMPLES / "portrait.png", "--audio", EXAMPLES / "speech.wav", "-o", tmp_path / "o.mp4",
                 "--quiet", env=fault_env("cuda-oom"))
    assert result.returncode == 3
    line = one_line(result.stderr)
    assert "out of memory" in line and "--size" in line


def test_a_failure_on_the_decode_worker_exits_with_its_own_code(fault_env, tmp_path, weights):
    out = tmp_path / "o.mp4"
    result = cli("animate", EXAMPLES / "portrait.png", "--audio", tone(tmp_path / "a.wav", 1.0), "-o", out,
                 "--weights", weights, "--size", "64x64", "--steps", "2", "--overlap-decode", "on", "--quiet",
                 env=fault_env("decode-oom"))
    assert result.returncode == 3
    assert "out of memory" in one_line(result.stderr)
    assert list(tmp_path.glob("o*")) == [] and list(tmp_path.glob(".o*")) == []


def test_fp8_precision_without_a_cuda_gpu_exits_3_before_loading(load_failures):
    result, _ = load_failures["fp8"]
    assert result.returncode == 3
    assert "--precision fp8 needs a CUDA GPU" in one_line(result.stderr)


# ---- Ctrl-C ---------------------------------------------------------------------------------------------------------
# A SIGINT during animate (exit 130, one line naming --resume, nothing on stdout, nothing under the output name, the
# resume state beside it) is run by tests/test_resume.py::test_sigint_saves_and_exits_130_then_resume_gives_identical_
# frames, which resumes that same stopped run, and at every stage by tests/test_failure_paths.py.
