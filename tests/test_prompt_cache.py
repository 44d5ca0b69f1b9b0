"""Prompt embeddings cached on disk: a cached prompt loads no text encoder, and gives the same video."""

from __future__ import annotations

import wave
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

import avatarcli.loading.components as components
from avatarcli.cli import main
from avatarcli.features.prompt_cache import PromptCache
from avatarcli.testing import make_tiny_weights

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("weights"), model="stableavatar")


@pytest.fixture
def text_encoder_loads(monkeypatch):
    calls = []
    real = components.load_text_encoder

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(components, "load_text_encoder", counted)
    monkeypatch.setattr("avatarcli.loading.stableavatar.load_text_encoder", counted)
    return calls


def speech(path: Path, seconds: float = 0.5, sample_rate: int = 16000) -> Path:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes((0.3 * np.sin(2 * np.pi * 180 * t) * 32767).astype(np.int16).tobytes())
    return path


def frames(path: Path) -> np.ndarray:
    reader = imageio_ffmpeg.read_frames(str(path))
    width, height = next(reader)["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader])


def animate(tmp_path, weights, name, *extra) -> Path:
    out = tmp_path / f"{name}.mp4"
    code = main(["animate", str(EXAMPLES / "portrait.png"), "--audio", str(speech(tmp_path / "a.wav")), "-o",
                 str(out), "--weights", str(weights), "--size", "64x64", "--steps", "2", "--crf", "0", "--quiet",
                 *extra])
    assert code == 0
    return out


def test_a_cached_prompt_loads_no_text_encoder_and_gives_the_same_video(tmp_path, weights, text_encoder_loads,
                                                                          monkeypatch, one_thread):
    monkeypatch.setenv("AVATARCLI_CACHE_DIR", str(tmp_path / "cache"))
    first = animate(tmp_path, weights, "first", "--prompt", "a cached prompt")
    assert len(text_encoder_loads) == 1
    second = animate(tmp_path, weights, "second", "--prompt", "a cached prompt")
    assert len(text_encoder_loads) == 1  # umT5 was not loaded at all
    assert np.array_equal(frames(first), frames(second))
    animate(tmp_path, weights, "third", "--prompt", "another prompt")
    assert len(text_encoder_loads) == 2


def test_the_cache_can_be_turned_off(tmp_path, weights, text_encoder_loads, monkeypatch, one_thread):
    monkeypatch.setenv("AVATARCLI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AVATARCLI_PROMPT_CACHE", "0")
    animate(tmp_path, weights, "first")
    animate(tmp_path, weights, "second")
    assert len(text_encoder_loads) == 2 and not (tmp_path / "cache" / "prompts").exists()


def test_entries_are_keyed_by_encoder_file_and_dtype_and_survive_corruption(tmp_path):
    encoder = tmp_path / "t5.pth"
    encoder.write_bytes(b"weights one")
    cache = PromptCache(encoder, torch.float32, folder=tmp_path / "c")
    prompts = ("negative", "positive")
    value = torch.randn(2, 8, 4)
    cache.put(prompts, value)
    assert torch.equal(PromptCache(encoder, torch.float32, folder=tmp_path / "c").get(prompts), value)
    assert PromptCache(encoder, torch.bfloat16, folder=tmp_path / "c").get(prompts) is None
    assert cache.get(("negative", "other")) is None
    encoder.write_bytes(b"weights two")  # another file: another hash
    assert PromptCache(encoder, torch.float32, folder=tmp_path / "c").get(prompts) is None
    cache.path(prompts).write_bytes(b"not a tensor file")
    assert cache.get(prompts) is None
