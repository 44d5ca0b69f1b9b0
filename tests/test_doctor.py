"""doctor_report: findings as data, never printed, never raised."""

from __future__ import annotations

from pathlib import Path

import imageio_ffmpeg
import pytest
import torch

from avatarcli import doctor, hub


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def by_check(findings: list[tuple[str, str, str]]) -> dict[str, tuple[str, str]]:
    return {check: (status, detail) for check, status, detail in findings}


def test_report_covers_every_check_and_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    findings = doctor.doctor_report()

    assert capsys.readouterr() == ("", "")
    assert all(status in ("ok", "warn", "fail") for _, status, _ in findings)
    checks = by_check(findings)
    for name in ("python", "torch", "device", "bf16", "ffmpeg", "h264 encoder", "aac encoder", "disk"):
        assert name in checks
    assert checks["torch"][1].startswith(torch.__version__)
    assert checks["weights stableavatar"] == ("warn", "not downloaded (run `avatarcli download stableavatar`)")


def test_bundled_ffmpeg_has_the_encoders_the_sink_needs() -> None:
    checks = by_check(doctor.doctor_report())

    assert checks["ffmpeg"][0] == "ok"
    assert imageio_ffmpeg.get_ffmpeg_exe() in checks["ffmpeg"][1]
    assert checks["h264 encoder"][0] == "ok"
    assert checks["aac encoder"] == ("ok", "aac")


def test_missing_ffmpeg_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_ffmpeg() -> str:
        raise RuntimeError("No ffmpeg exe could be found")

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", no_ffmpeg)

    status, detail = by_check(doctor.doctor_report())["ffmpeg"]
    assert status == "fail"
    assert "No ffmpeg exe could be found" in detail


def test_listed_encoders_include_the_bundled_h264_and_aac() -> None:
    encoders = doctor.ffmpeg_encoders(imageio_ffmpeg.get_ffmpeg_exe())

    assert "aac" in encoders
    assert "libx264" in encoders


def test_ffmpeg_without_h264_or_aac_fails_those_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "ffmpeg_encoders", lambda exe: {"mpeg4", "libopus"})

    checks = by_check(doctor.doctor_report())
    assert checks["h264 encoder"][0] == "fail"
    assert checks["aac encoder"][0] == "fail"


def test_a_crashing_check_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_driver() -> bool:
        raise RuntimeError("driver mismatch")

    monkeypatch.setattr(torch.cuda, "is_available", broken_driver)

    checks = by_check(doctor.doctor_report())
    assert checks["device"] == ("fail", "RuntimeError: driver mismatch")
    assert checks["python"][0] == "ok"


def test_complete_weights_folder_is_ok(tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    for path in hub.required_files("stableavatar") + [
        "wav2vec2-base-960h/pytorch_model.bin",
        "Wan2.1-Fun-V1.1-1.3B-InP/google/umt5-xxl/tokenizer.json",
    ]:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(b"x")

    checks = by_check(doctor.doctor_report(weights_dir=folder))

    assert checks["weights stableavatar"] == ("ok", str(folder))
    assert checks["weights folder"][0] == "ok"


def test_incomplete_weights_folder_fails_naming_a_missing_file(tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    (folder / "StableAvatar-1.3B").mkdir(parents=True)

    checks = by_check(doctor.doctor_report(weights_dir=folder))

    assert checks["weights folder"][0] == "fail"
    assert checks["weights stableavatar"][0] == "warn"
    assert "wav2vec2-base-960h/config.json" in checks["weights stableavatar"][1]


def test_disk_check_reports_free_space_of_the_hub_cache(tmp_path: Path) -> None:
    status, detail = by_check(doctor.doctor_report())["disk"]

    assert status in ("ok", "warn")
    assert str(tmp_path / "hf_home" / "hub") in detail


def test_memory_check_reports_free_ram_and_free_memory_of_every_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    gib = 1024**3
    free = {0: (30 * gib, 80 * gib), 1: (79 * gib, 80 * gib)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: free[index])

    checks = by_check(doctor._memory())

    assert checks["gpu memory cuda:0"] == ("ok", "30.0 GiB free of 80.0 GiB")
    assert checks["gpu memory cuda:1"] == ("ok", "79.0 GiB free of 80.0 GiB")
    status, detail = checks["memory"]
    available, total = doctor.host_memory()
    assert status == "ok" and total > 0 and detail.endswith(f"of {total / gib:.1f} GiB RAM")


def test_without_a_gpu_only_ram_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [check for check, _, _ in doctor._memory()] == ["memory"]
