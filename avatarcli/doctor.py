"""Environment checks behind `avatarcli doctor`: returns findings, prints nothing."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch

from avatarcli import hub

Status = Literal["ok", "warn", "fail"]
Finding = tuple[str, Status, str]

# Any of these can encode the H.264 stream; aac is the audio codec the mp4 sink uses.
H264_ENCODERS = ("libx264", "libopenh264", "h264_nvenc")
AUDIO_ENCODER = "aac"
_GIB = 1024**3


DEFAULT_MODELS = ("stableavatar",)  # what `animate` and `download` use by default


def doctor_report(weights_dir: Path | None = None, models: Sequence[str] = DEFAULT_MODELS) -> list[Finding]:
    """(check, status, detail) for each check. A check that crashes is reported as "fail". `models`: the models the
    disk check compares free space with (those not yet downloaded)."""
    for name in models:
        hub.model_spec(name)  # an unknown name is the caller's mistake (AvatarError), not a failed check
    checks: list[tuple[str, Callable[[], list[Finding]]]] = [
        ("python", _python),
        ("torch", _torch),
        ("device", _device),
        ("bf16", _bf16),
        ("memory", _memory),
        ("memory plan", _memory_plan),
        ("ffmpeg", _ffmpeg),
        ("weights", lambda: _weights(weights_dir)),
        ("disk", lambda: _disk(models, weights_dir)),
    ]
    findings: list[Finding] = []
    for name, check in checks:
        try:
            findings.extend(check())
        except Exception as error:  # a broken environment is what doctor reports, not a crash
            findings.append((name, "fail", f"{type(error).__name__}: {error}"))
    return findings


def _python() -> list[Finding]:
    version = platform.python_version()
    status: Status = "ok" if sys.version_info >= (3, 10) else "fail"
    return [("python", status, version if status == "ok" else f"{version} (3.10 or newer is required)")]


def _torch() -> list[Finding]:
    cuda = torch.version.cuda or "none"
    return [("torch", "ok", f"{torch.__version__} (CUDA build: {cuda})")]


def _device() -> list[Finding]:
    if not torch.cuda.is_available():
        return [("device", "warn", "cpu only: no CUDA GPU found, generation will be very slow")]
    index = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    name = torch.cuda.get_device_name(index)
    return [("device", "ok", f"cuda:{index} {name}, {free / _GIB:.1f} GiB free of {total / _GIB:.1f} GiB")]


def _memory() -> list[Finding]:
    """Free host memory, and free memory on every visible CUDA GPU (what a job can still allocate there)."""
    findings: list[Finding] = []
    available, total = host_memory()
    if total:
        findings.append(("memory", "ok", f"{available / _GIB:.1f} GiB free of {total / _GIB:.1f} GiB RAM"))
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total_gpu = torch.cuda.mem_get_info(index)
            findings.append((f"gpu memory cuda:{index}", "ok",
                             f"{free / _GIB:.1f} GiB free of {total_gpu / _GIB:.1f} GiB"))
    return findings


def _memory_plan() -> list[Finding]:
    """Per GPU, what an --audio run at 480x832 would choose from the memory free now: offload, decode mode, where
    umT5 runs (a forecast from avatarcli/budget.py's estimates; `animate --json` says what a run chose)."""
    from avatarcli.budget import audio_memory_plan, device_budget

    if not torch.cuda.is_available():
        return [("memory plan", "ok", "cpu: no GPU memory to budget; the frames decode inline")]
    findings: list[Finding] = []
    for index in range(torch.cuda.device_count()):
        plan = audio_memory_plan(device_budget(torch.device("cuda", index)))
        offload = "no offload needed" if plan.offload == "none" else f"needs --offload {plan.offload}"
        umt5 = "umT5 offloaded" if plan.text_encoder_offloaded else "umT5 on the GPU"
        detail = f"--audio at 480x832: {offload}, decode {plan.decode}, {umt5}"
        if not plan.fits:
            detail += "; a window-step does not fit even so: use a smaller --size"
        status: Status = "ok" if plan.offload == "none" else "warn" if plan.fits else "fail"
        findings.append((f"memory plan cuda:{index}", status, detail))
    return findings


def host_memory() -> tuple[int, int]:
    """(available, total) bytes of RAM; (0, 0) where the platform does not say."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        import os

        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return 0, 0


def _bf16() -> list[Finding]:
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return [("bf16", "ok", "supported on the GPU")]
        return [("bf16", "warn", "the GPU has no bf16 support; the transformer runs in a wider dtype")]
    try:
        probe = torch.ones(2, 2, dtype=torch.bfloat16)
        (probe @ probe).sum().item()
    except RuntimeError as error:
        return [("bf16", "warn", f"bf16 matmul fails on cpu: {error}")]
    return [("bf16", "ok", "supported on cpu")]


def _ffmpeg() -> list[Finding]:
    import imageio_ffmpeg

    try:
        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as error:
        return [("ffmpeg", "fail", f"no ffmpeg found ({error}); reinstall imageio-ffmpeg or set IMAGEIO_FFMPEG_EXE")]
    findings: list[Finding] = [("ffmpeg", "ok", f"{exe} (version {imageio_ffmpeg.get_ffmpeg_version()})")]
    encoders = ffmpeg_encoders(exe)
    h264 = [name for name in H264_ENCODERS if name in encoders]
    if h264:
        findings.append(("h264 encoder", "ok", ", ".join(h264)))
    else:
        findings.append(("h264 encoder", "fail", f"ffmpeg has none of {', '.join(H264_ENCODERS)}"))
    if AUDIO_ENCODER in encoders:
        findings.append(("aac encoder", "ok", AUDIO_ENCODER))
    else:
        findings.append(("aac encoder", "fail", "ffmpeg has no aac encoder; the video would have no sound"))
    return findings


def ffmpeg_encoders(exe: str) -> set[str]:
    """Names in the `ffmpeg -encoders` listing (lines like " V....D libx264  libx264 H.264 ...")."""
    listing = subprocess.run(
        [exe, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    return {line.split()[1] for line in listing.splitlines() if len(line.split()) >= 2}


def _weights(weights_dir: Path | None) -> list[Finding]:
    if weights_dir is not None:
        return _weights_folder(Path(weights_dir))
    findings: list[Finding] = []
    for name in sorted(hub.MODELS):
        folder = hub.cached_weights(name)
        if folder is not None:
            findings.append((f"weights {name}", "ok", str(folder)))
        else:
            findings.append((f"weights {name}", "warn", f"not downloaded (run `avatarcli download {name}`)"))
    return findings


def _weights_folder(folder: Path) -> list[Finding]:
    """A --weights folder is meant for one model; it fails only if it is a complete copy of none."""
    if not folder.is_dir():
        what = "is a file, not a folder of model files" if folder.exists() else "does not exist"
        return [("weights folder", "fail", f"{folder} {what}")]
    findings: list[Finding] = []
    complete: list[str] = []
    for name in sorted(hub.MODELS):
        missing = hub.missing_files(name, folder)
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            findings.append((f"weights {name}", "warn", f"{folder} lacks {missing[0]}{more}"))
        else:
            complete.append(name)
            findings.append((f"weights {name}", "ok", str(folder)))
    if complete:
        findings.append(("weights folder", "ok", f"{folder} holds {', '.join(complete)}"))
    else:
        findings.append(("weights folder", "fail", f"{folder} is not a complete copy of any known model"))
    return findings


def _disk(models: Sequence[str], weights_dir: Path | None = None) -> list[Finding]:
    """Free space in the Hub cache against the selected models that are neither there nor in `weights_dir`."""
    cache = hub.hub_cache_dir()
    existing = cache
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free_gb = shutil.disk_usage(existing).free / _GIB
    local = Path(weights_dir) if weights_dir is not None and Path(weights_dir).is_dir() else None
    missing = [name for name in models if hub.cached_weights(name) is None
               and (local is None or hub.missing_files(name, local))]
    needed_gb = sum(hub.model_spec(name).approx_size_gb for name in missing)
    detail = f"{free_gb:.1f} GiB free in the Hub cache at {cache}"
    if missing:
        detail += f"; {', '.join(missing)}, not downloaded, needs about {needed_gb:.0f} GiB"
    return [("disk", "warn" if free_gb < needed_gb else "ok", detail)]
