"""Exit codes and failure messages as a shell script meets them: every case runs the installed console script in a
subprocess (0 ok, 1 bug, 2 bad input or usage, 3 environment, 130 interrupted; one line on stderr)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import avatarcli
from avatarcli.media.audio import write_wav
from avatarcli.testing import make_tiny_weights

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPT = Path(sys.executable).parent / "avatarcli"
CLI = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "avatarcli"]


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


def tone(path: Path, seconds: float) -> Path:
    t = np.arange(int(seconds * 16000)) / 16000
    write_wav(path, 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)))
    return path


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


def test_sfd_with_a_missing_weight_file_exits_3_naming_the_download(tmp_path):
    result = cli("sfd", "--weights", tmp_path, "--class", "1", "-o", tmp_path / "grid.png")
    assert result.returncode == 3
    assert "avatarcli download sfd-xl" in one_line(result.stderr)
    assert not (tmp_path / "grid.png").exists()


def test_missing_weight_files_exit_3(tmp_path):
    empty = tmp_path / "weights"
    empty.mkdir()
    out = tmp_path / "out.mp4"
    result = cli("animate", EXAMPLES / "portrait.png", "--audio", EXAMPLES / "speech.wav", "-o", out, "--weights",
                 empty, "--quiet")
    assert result.returncode == 3
    assert "avatarcli download stableavatar" in one_line(result.stderr)
    assert not out.exists()


def test_corrupt_weight_file_exits_3(tmp_path, weights):
    import shutil

    broken = tmp_path / "weights"
    shutil.copytree(weights, broken)
    transformer = broken / "StableAvatar-1.3B" / "transformer3d-square.pt"
    transformer.write_bytes(transformer.read_bytes()[:1000])  # a truncated download
    result = cli("animate", EXAMPLES / "portrait.png", "--audio", EXAMPLES / "speech.wav", "-o", tmp_path / "o.mp4",
                 "--weights", broken, "--size", "64x64", "--quiet")
    assert result.returncode == 3
    assert "transformer3d-square.pt" in one_line(result.stderr)


def test_offline_without_weights_exits_3(tmp_path):
    result = cli("animate", EXAMPLES / "portrait.png", "--audio", EXAMPLES / "speech.wav", "-o", tmp_path / "o.mp4",
                 "--quiet", env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
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


def test_fp8_precision_without_a_cuda_gpu_exits_3_before_loading(tmp_path):
    result = cli("animate", EXAMPLES / "portrait.png", "--audio", tone(tmp_path / "a.wav", 1.0), "-o",
                 tmp_path / "o.mp4", "--weights", tmp_path, "--device", "cpu", "--precision", "fp8", "--quiet")
    assert result.returncode == 3
    assert "--precision fp8 needs a CUDA GPU" in one_line(result.stderr)


# ---- Ctrl-C ---------------------------------------------------------------------------------------------------------


def default_sigint() -> None:
    """In the child: SIGINT as at a terminal. A test run started in the background of a non-interactive shell
    inherits SIGINT ignored, and Python then never turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_during_animate_exits_130_and_writes_nothing_under_the_output_name(tmp_path, weights):
    """Ctrl-C: the current window-step finishes, the resume state is kept beside the output (see test_resume.py),
    one line on stderr, exit 130, and no file under the output name."""
    from avatarcli.resume import resume_dir

    audio = tone(tmp_path / "long.wav", 12.0)  # several windows, so generation is still running when interrupted
    out = tmp_path / "out.mp4"
    state = resume_dir(out) / "state.json"
    proc = subprocess.Popen([*CLI, "animate", str(EXAMPLES / "portrait.png"), "--audio", str(audio), "-o", str(out),
                             "--weights", str(weights), "--size", "64x64", "--steps", "2", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "AVATARCLI_SAVE_EVERY": "0"},
                            preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 300
        while not state.exists():  # a window-step has run: the models are loaded and generation is under way
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "animate never started generating"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    line = one_line(stderr)
    assert line.startswith("interrupted") and "--resume" in line and "Traceback" not in stderr
    assert stdout == ""
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["long.wav", resume_dir(out).name])
