"""A regular install (a wheel, as `pip install .` builds it) carries everything the CLI reads from the source tree:
the presets of the top-level presets/ folder and the demo model's weights, and nothing of tests/ or benchmarks/.

The wheel is built offline from a copy of the repository (no build/ or egg-info left in the checkout), installed
without dependencies into a fresh venv that sees this environment's packages through a .pth file, and run from a
folder outside the repository, so neither the checkout nor this environment's editable install can stand in for it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "avatarcli"
DEMO_WEIGHTS = PACKAGE / "demo" / "weights"
# What a checkout may hold that is not source: build output, environments, caches, local results.
NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".venv",
                                    ".ci-venv", ".bench", ".whl", "*.mp4", "*.pyc")


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source") / "avatarcli"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--wheel-dir", out, source])
    (built,) = out.glob("avatarcli-*.whl")
    return built


def test_the_wheel_holds_the_package_the_presets_and_the_demo_weights_only(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())

    modules = {path.relative_to(ROOT).as_posix() for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts}
    assert modules and modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
    presets = {f"avatarcli/_presets/{path.name}" for path in (ROOT / "presets").glob("*.yaml")}
    assert len(presets) >= 5 and presets <= names, f"presets missing: {sorted(presets - names)}"
    weights = {path.relative_to(ROOT).as_posix() for path in DEMO_WEIGHTS.rglob("*") if path.is_file()}
    assert any(name.endswith(".safetensors") for name in weights)
    assert weights <= names, f"demo weights missing: {sorted(weights - names)}"
    top = {name.split("/")[0] for name in names}
    assert top == {"avatarcli", wheel.name.split("-py")[0] + ".dist-info"}, top  # no tests/, benchmarks/, presets/


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A venv with the wheel installed, this environment's dependencies visible, and nothing of the checkout."""
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    scripts = Path(sysconfig.get_path("scripts", vars={"base": str(venv), "platbase": str(venv)}))
    python = scripts / ("python.exe" if os.name == "nt" else "python")
    # This environment's pip installs into the venv (--python): no copy of pip, no index.
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel])
    # Only now the dependencies: before, pip would see this environment's (editable) avatarcli as installed. A path
    # added by a .pth line does not have its own .pth files run, so the editable finder stays out of the venv.
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "_outer_dependencies.pth").write_text("".join(f"{path}\n" for path in sorted(ours)), encoding="utf-8")
    return scripts


@pytest.fixture
def isolated_env() -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "AVATARCLI_PRESETS_DIR", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # the demo model needs no download; one thread: tiny model
    return env


def test_the_installed_package_imports_from_the_venv_not_the_checkout(installed, isolated_env, tmp_path):
    python = installed / ("python.exe" if os.name == "nt" else "python")
    out = run([python, "-c", "import avatarcli, avatarcli.presets as p; print(avatarcli.__file__); "
               "print(p.presets_dir())"], cwd=tmp_path, env=isolated_env).stdout.split("\n")
    package, presets = Path(out[0]).resolve().parent, Path(out[1]).resolve()
    assert package.is_relative_to(installed.parent.resolve()) and not package.is_relative_to(ROOT), package
    assert presets == package / "_presets"


def test_the_installed_cli_lists_the_presets_and_animates_the_demo_model(installed, isolated_env, tmp_path):
    from avatarcli.media.audio import SAMPLE_RATE, load_audio, write_wav
    from avatarcli.media.video import probe_video

    avatarcli = installed / ("avatarcli.exe" if os.name == "nt" else "avatarcli")
    listing = run([avatarcli, "presets"], cwd=tmp_path, env=isolated_env).stdout
    for name in ("balanced", "fast", "quality", "reference", "turbo"):
        assert name in listing

    speech = tmp_path / "speech.wav"
    write_wav(speech, load_audio(ROOT / "examples" / "speech.wav")[:SAMPLE_RATE])  # 1 s: 25 frames
    out = tmp_path / "out.mp4"
    run([avatarcli, "animate", ROOT / "examples" / "portrait.png", "--audio", speech, "--model", "demo", "-o", out,
         "--device", "cpu", "--steps", 2, "--size", "64x64", "--quiet"], cwd=tmp_path, env=isolated_env)
    info = probe_video(out, "output")
    assert (info.width, info.height, info.frame_count) == (64, 64, 25)
