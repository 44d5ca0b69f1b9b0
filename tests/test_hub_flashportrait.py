"""`avatarcli download flashportrait`: two Hub repos fetched into the two published subfolders (fake Hub)."""

from __future__ import annotations

from pathlib import Path

import pytest

from avatarcli import hub
from hub_server import FakeHub
from test_hub import files_under, hub_env  # noqa: F401  (fixture)

FP_REQUIRED = ["transformer.pt", "portrait_encoder.pt", "pd_fpg.pth", "face_det.onnx", "face_landmark.onnx"]
FP_TURBO = ["fast_lora_rank64.safetensors", "fast_vae.pth"]  # fetched, required only by the turbo path
FP_WANTED = FP_REQUIRED + FP_TURBO
FP_UNWANTED = ["README.md"]
WAN_WANTED = ["config.json", "diffusion_pytorch_model.safetensors.index.json", "Wan2.1_VAE.pth",
              "models_t5_umt5-xxl-enc-bf16.pth", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
              "google/umt5-xxl/tokenizer_config.json", "google/umt5-xxl/spiece.model",
              *(f"diffusion_pytorch_model-{n:05d}-of-00007.safetensors" for n in range(1, 8))]
WAN_UNWANTED = ["xlm-roberta-large/tokenizer.json", "examples/i2v_input.JPG", "README.md"]


def repo(paths: list[str]) -> dict[str, bytes]:
    return {p: f"content of {p}".encode() for p in paths}


@pytest.fixture
def fake_hub(hub_env: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    repos = {"FrancisRing/FlashPortrait": repo(FP_WANTED + FP_UNWANTED),
             "Wan-AI/Wan2.1-I2V-14B-720P": repo(WAN_WANTED + WAN_UNWANTED)}
    with FakeHub(repos) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


EXPECTED = sorted([f"FlashPortrait/{p}" for p in FP_WANTED] + [f"Wan2.1-I2V-14B-720P/{p}" for p in WAN_WANTED])


def test_download_into_a_folder_fetches_only_the_needed_files_in_the_published_layout(fake_hub, tmp_path):
    folder = hub.download("flashportrait", local_dir=tmp_path / "w", progress=False)
    assert files_under(folder) == EXPECTED
    assert hub.missing_files("flashportrait", folder) == []
    assert hub.resolve_weights("flashportrait", folder, allow_download=False) == folder


def test_download_to_the_cache_is_found_again_without_requests(fake_hub):
    folder = hub.download("flashportrait", progress=False)
    assert sorted(p for sub in ("FlashPortrait", "Wan2.1-I2V-14B-720P")
                  for p in (f"{sub}/{q}" for q in files_under((folder / sub).resolve()))) == EXPECTED
    fake_hub.clear()
    assert hub.cached_weights("flashportrait") == folder
    assert fake_hub.file_gets() == []


def test_weights_folder_missing_a_shard_names_it(tmp_path, hub_env):  # noqa: F811
    for path in EXPECTED:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"x")
    (tmp_path / "Wan2.1-I2V-14B-720P/diffusion_pytorch_model-00003-of-00007.safetensors").unlink()
    assert hub.missing_files("flashportrait", tmp_path) == [
        "Wan2.1-I2V-14B-720P/diffusion_pytorch_model-00003-of-00007.safetensors"]
    assert "FlashPortrait/transformer.pt" in hub.required_files("flashportrait")


TURBO = tuple(f"FlashPortrait/{name}" for name in FP_TURBO)


def test_only_a_job_on_the_4_step_path_requires_its_lora_and_tiny_vae(tmp_path, hub_env):  # noqa: F811
    for path in EXPECTED:
        if path not in TURBO:
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_bytes(b"x")
    assert hub.missing_files("flashportrait", tmp_path) == []
    assert hub.resolve_weights("flashportrait", tmp_path, allow_download=False) == tmp_path
    with pytest.raises(hub.EnvironmentProblem, match="lacks FlashPortrait/fast_lora_rank64.safetensors \\(and 1 more"):
        hub.resolve_weights("flashportrait", tmp_path, allow_download=False, also=TURBO)


def test_a_cached_copy_without_the_4_step_files_is_completed_when_a_job_needs_them(fake_hub):
    hub.download("flashportrait", progress=False)
    cached = hub.cached_weights("flashportrait")
    for path in TURBO:  # as a copy downloaded before they were fetched
        blob = (cached / path).resolve()
        (cached / path).unlink()
        blob.unlink()
    fake_hub.clear()
    assert hub.resolve_weights("flashportrait", None, allow_download=True) == cached  # not needed: no request
    assert fake_hub.requests == []
    folder = hub.resolve_weights("flashportrait", None, allow_download=True, also=TURBO)
    assert all((folder / path).is_file() for path in TURBO)
    assert sorted(path.rsplit("/", 1)[-1] for path in fake_hub.file_gets()) == sorted(FP_TURBO)


def test_the_turbo_preset_asks_for_both_files_and_the_default_for_none():
    from avatarcli.drivers.flashportrait import turbo_files
    from avatarcli.presets import load_preset

    assert turbo_files(load_preset("turbo").for_driver("driving")) == TURBO
    assert turbo_files(load_preset("reference").for_driver("driving")) == ()
