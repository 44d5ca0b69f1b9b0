"""Weight download and lookup against a local fake Hub (tests/hub_server.py); no internet needed."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants

from avatarcli import hub
from avatarcli.errors import AvatarError
from hub_server import FakeHub

WANTED = [
    "wav2vec2-base-960h/config.json",
    "wav2vec2-base-960h/preprocessor_config.json",
    "wav2vec2-base-960h/vocab.json",
    "wav2vec2-base-960h/model.safetensors",
    "Wan2.1-Fun-V1.1-1.3B-InP/config.json",
    "Wan2.1-Fun-V1.1-1.3B-InP/Wan2.1_VAE.pth",
    "Wan2.1-Fun-V1.1-1.3B-InP/models_t5_umt5-xxl-enc-bf16.pth",
    "Wan2.1-Fun-V1.1-1.3B-InP/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
    "Wan2.1-Fun-V1.1-1.3B-InP/google/umt5-xxl/tokenizer_config.json",
    "Wan2.1-Fun-V1.1-1.3B-InP/google/umt5-xxl/spiece.model",
    "StableAvatar-1.3B/transformer3d-square.pt",
    "StableAvatar-1.3B/transformer3d-rec-vec.pt",
]
UNWANTED = [
    "README.md",
    "Kim_Vocal_2.onnx",
    "Wan2.1-Fun-V1.1-1.3B-InP/diffusion_pytorch_model.safetensors",
    "Wan2.1-Fun-V1.1-1.3B-InP/xlm-roberta-large/tokenizer.json",
    "wav2vec2-base-960h/tf_model.h5",
    "wav2vec2-base-960h/flax_model.msgpack",
]
STABLEAVATAR_REPO = {path: f"content of {path}".encode() for path in WANTED + UNWANTED}


@pytest.fixture
def hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    hf_home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    return hf_home


@pytest.fixture
def fake_hub(hub_env: Path, monkeypatch: pytest.MonkeyPatch):
    with FakeHub({"FrancisRing/StableAvatar": dict(STABLEAVATAR_REPO)}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def files_under(folder: Path) -> list[str]:
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and ".cache" not in path.relative_to(folder).parts
    )


def write_complete_copy(folder: Path) -> None:
    for path in WANTED:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(b"x")


def test_download_fetches_exactly_the_files_the_pipeline_uses(fake_hub: FakeHub, hub_env: Path) -> None:
    folder = hub.download("stableavatar", progress=False)

    assert sorted(fake_hub.file_gets()) == sorted(WANTED)
    assert files_under(folder) == sorted(WANTED)
    assert folder.is_relative_to(hub_env)
    square = folder / "StableAvatar-1.3B/transformer3d-square.pt"
    assert square.read_bytes() == b"content of StableAvatar-1.3B/transformer3d-square.pt"


def test_second_download_of_a_complete_copy_fetches_no_file(fake_hub: FakeHub) -> None:
    first = hub.download("stableavatar", progress=False)
    fake_hub.clear()

    second = hub.download("stableavatar", progress=False)

    assert second == first
    assert fake_hub.file_gets() == []


def test_interrupted_local_dir_download_resumes_with_only_the_missing_file(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    target = tmp_path / "weights"
    hub.download("stableavatar", local_dir=target, progress=False)
    (target / "Wan2.1-Fun-V1.1-1.3B-InP/Wan2.1_VAE.pth").unlink()
    fake_hub.clear()

    folder = hub.download("stableavatar", local_dir=target, progress=False)

    assert folder == target.resolve()
    assert fake_hub.file_gets() == ["Wan2.1-Fun-V1.1-1.3B-InP/Wan2.1_VAE.pth"]
    assert files_under(target) == sorted(WANTED)


def test_offline_with_nothing_local_raises_one_line_error_naming_the_remedies(
    fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    for attempt in (
        lambda: hub.download("stableavatar", progress=False),
        lambda: hub.resolve_weights("stableavatar", None, allow_download=True),
    ):
        with pytest.raises(AvatarError) as caught:
            attempt()
        message = str(caught.value)
        assert "\n" not in message
        assert "avatarcli download" in message
        assert "--weights" in message
    assert fake_hub.requests == []


def test_offline_resolve_uses_the_cached_copy_without_requests(
    fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    downloaded = hub.download("stableavatar", progress=False)
    fake_hub.clear()
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    assert hub.resolve_weights("stableavatar", None, allow_download=False) == downloaded
    assert fake_hub.requests == []


def test_resolve_downloads_when_the_cache_is_empty_and_download_is_allowed(fake_hub: FakeHub) -> None:
    folder = hub.resolve_weights("stableavatar", None, allow_download=True)

    assert sorted(fake_hub.file_gets()) == sorted(WANTED)
    assert files_under(folder) == sorted(WANTED)


def test_resolve_without_download_permission_points_to_the_download_command(fake_hub: FakeHub) -> None:
    with pytest.raises(AvatarError, match="avatarcli download stableavatar"):
        hub.resolve_weights("stableavatar", None, allow_download=False)
    assert fake_hub.file_gets() == []


def test_repo_missing_on_the_hub_raises_avatar_error(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(hub.MODELS, "ghost", hub.ModelSpec("org/ghost", ("*.json",), "not on the Hub"))

    with pytest.raises(AvatarError, match="org/ghost"):
        hub.download("ghost", progress=False)


def test_unknown_model_name_lists_the_known_names() -> None:
    with pytest.raises(AvatarError, match="stableavatar"):
        hub.download("no-such-model")
    with pytest.raises(AvatarError, match="stableavatar"):
        hub.required_files("no-such-model")


def test_unreachable_hub_raises_avatar_error_with_the_reason(hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")

    with pytest.raises(AvatarError, match="ConnectError|connect") as caught:
        hub.download("stableavatar", progress=False)
    assert "\n" not in str(caught.value)


def test_repo_that_lost_a_required_file_is_reported(hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = dict(STABLEAVATAR_REPO)
    del repo["StableAvatar-1.3B/transformer3d-rec-vec.pt"]
    with FakeHub({"FrancisRing/StableAvatar": repo}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(AvatarError, match="transformer3d-rec-vec.pt"):
            hub.download("stableavatar", progress=False)


def test_weights_folder_is_used_as_is_when_complete(tmp_path: Path, hub_env: Path) -> None:
    write_complete_copy(tmp_path / "w")

    assert hub.resolve_weights("stableavatar", tmp_path / "w", allow_download=False) == tmp_path / "w"


def test_weights_folder_missing_a_file_names_it(tmp_path: Path, hub_env: Path) -> None:
    write_complete_copy(tmp_path / "w")
    (tmp_path / "w/Wan2.1-Fun-V1.1-1.3B-InP/models_t5_umt5-xxl-enc-bf16.pth").unlink()

    with pytest.raises(AvatarError, match="models_t5_umt5-xxl-enc-bf16.pth"):
        hub.resolve_weights("stableavatar", tmp_path / "w", allow_download=True)


def test_weights_folder_missing_both_formats_of_a_weight_names_them(tmp_path: Path, hub_env: Path) -> None:
    write_complete_copy(tmp_path / "w")
    (tmp_path / "w/wav2vec2-base-960h/model.safetensors").unlink()

    with pytest.raises(AvatarError, match="model.safetensors or .*pytorch_model.bin"):
        hub.resolve_weights("stableavatar", tmp_path / "w", allow_download=True)


def test_weights_folder_that_does_not_exist_is_an_avatar_error(tmp_path: Path) -> None:
    with pytest.raises(AvatarError, match="does not exist"):
        hub.resolve_weights("stableavatar", tmp_path / "nowhere", allow_download=True)


def test_required_files_name_the_transformers_but_not_the_superseded_base_dit() -> None:
    files = hub.required_files("stableavatar")

    assert "StableAvatar-1.3B/transformer3d-square.pt" in files
    assert "StableAvatar-1.3B/transformer3d-rec-vec.pt" in files
    assert not any(path.endswith("diffusion_pytorch_model.safetensors") for path in files)


def test_registered_model_downloads_its_own_patterns(hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "MODELS", dict(hub.MODELS))
    hub.register_model(
        "tiny", hub.ModelSpec("org/tiny", ("ckpt/*",), "a tiny test model", required_files=("ckpt/a.pt",))
    )
    repo = {"ckpt/a.pt": b"a", "other/b.pt": b"b"}
    with FakeHub({"org/tiny": repo}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        folder = hub.download("tiny", progress=False)

    assert server.file_gets() == ["ckpt/a.pt"]
    assert files_under(folder) == ["ckpt/a.pt"]
