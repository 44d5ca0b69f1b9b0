"""The reference condition's VAE encode skips the encoder steps that repeat and stays bit-identical to `vae.encode`.

avatarcli.features.image.encode_mode runs the encoder step by step and reuses a step's previous results when its
input and cache entries are bit for bit those of its previous chunk. These tests compare it with diffusers' own
encode, bit for bit (integer views, so -0.0 vs 0.0 counts), on the tiny real-layout VAE and on the demo's VAE, in
float32 on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avatarcli.features.image import MASK_CHANNELS, encode_mode, reference_condition, reference_pixels
from avatarcli.loading.components import load_vae
from avatarcli.testing.components import write_tiny_vae

# Latent frames 0..28 of [reference, zero frames...] see the reference (Wan 2.1 layout: a latent frame j sees pixel
# frames from 4j - 112 on); from 29 on every latent frame is the same.
LAST_LATENT_SEEING_THE_REFERENCE = 28


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory: pytest.TempPathFactory):
    return load_vae(write_tiny_vae(tmp_path_factory.mktemp("vae"), seed=1))


@pytest.fixture(scope="module")
def demo_vae():
    from avatarcli.demo.model import demo_weights_dir
    from avatarcli.loading.stableavatar import VAE_FILE

    return load_vae(demo_weights_dir() / VAE_FILE)


@pytest.fixture(scope="module")
def portrait() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(50, 40, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def demo_portrait() -> Image.Image:
    from avatarcli.demo import world

    return world.portrait(3)


def reference_clip(image: Image.Image, width: int, height: int, frames: int) -> torch.Tensor:
    video = torch.zeros(1, 3, frames, height, width)
    video[:, :, 0] = reference_pixels(image, width, height)[0]
    return video


def full_condition(vae, image: Image.Image, width: int, height: int, frames: int) -> torch.Tensor:
    """reference_condition as written before the shortcut: one vae.encode of the whole clip."""
    with torch.no_grad():
        latents = vae.encode(reference_clip(image, width, height, frames)).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    latents = (latents - mean) / std
    mask = torch.zeros(1, MASK_CHANNELS, *latents.shape[2:])
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latents], dim=1)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == torch.float32
    differ = actual.view(torch.int32) != expected.view(torch.int32)
    assert not differ.any(), f"{int(differ.sum())} of {differ.numel()} values differ"


class CallCount:
    """How many times a module ran (forward hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self._count)

    def _count(self, *_) -> None:
        self.calls += 1

    def __enter__(self) -> CallCount:
        return self

    def __exit__(self, *_) -> None:
        self.handle.remove()


# ------------------------------------------------------------------------------------------------------ tiny VAE


def test_condition_of_an_81_frame_window_is_the_full_encode_bit_for_bit(tiny_vae, portrait, one_thread) -> None:
    with CallCount(tiny_vae.encoder.down_blocks[0]) as first_block:
        y = reference_condition(tiny_vae, portrait, width=32, height=16, num_frames=81)
    assert_bits_equal(y, full_condition(tiny_vae, portrait, 32, 16, 81))
    # the full-resolution blocks stop running once their look-back is all zero frames (21 chunks otherwise)
    assert first_block.calls == 4


@pytest.mark.parametrize("frames", [4 * k + 1 for k in range(1, 26)])
def test_every_flashportrait_window_length_encodes_bit_for_bit(tiny_vae, portrait, frames: int, one_thread) -> None:
    video = reference_clip(portrait, 32, 16, frames)
    with torch.no_grad():
        expected = tiny_vae.encode(video).latent_dist.mode()
    assert_bits_equal(encode_mode(tiny_vae, video), expected)


def test_past_the_receptive_field_every_latent_frame_is_the_same(tiny_vae, portrait, one_thread) -> None:
    frames = 4 * 35 + 1  # 36 latent frames: the encoder reaches its fixed point and every step repeats
    video = reference_clip(portrait, 16, 16, frames)
    with torch.no_grad():
        expected = tiny_vae.encode(video).latent_dist.mode()
    with CallCount(tiny_vae.encoder.conv_out) as head:
        latents = encode_mode(tiny_vae, video)
    assert_bits_equal(latents, expected)
    last = LAST_LATENT_SEEING_THE_REFERENCE
    assert not torch.equal(latents[:, :, last], latents[:, :, last + 1])
    assert all(torch.equal(latents[:, :, last + 1], latents[:, :, j]) for j in range(last + 2, latents.shape[2]))
    # the head runs up to the first latent frame that no longer sees the reference; the next one repeats its inputs
    assert head.calls == last + 2


@pytest.mark.parametrize("kind", ["random", "static", "repeating"])
def test_any_clip_encodes_bit_for_bit(tiny_vae, kind: str, one_thread) -> None:
    """The shortcut proves each repeat on the tensors themselves, so it holds for clips other than a reference
    followed by zeros: all frames different (nothing repeats), one frame held, a 4-frame loop in step with the
    chunks."""
    generator = torch.Generator().manual_seed(2)
    if kind == "random":
        video = torch.rand(1, 3, 45, 16, 16, generator=generator) * 2 - 1
    elif kind == "static":
        video = (torch.rand(1, 3, 1, 16, 16, generator=generator) * 2 - 1).expand(-1, -1, 45, -1, -1).contiguous()
    else:
        loop = torch.rand(1, 3, 4, 16, 16, generator=generator) * 2 - 1
        video = torch.cat([torch.zeros(1, 3, 1, 16, 16), loop.repeat(1, 1, 11, 1, 1)], dim=2)
    with torch.no_grad():
        expected = tiny_vae.encode(video).latent_dist.mode()
    assert_bits_equal(encode_mode(tiny_vae, video), expected)


def test_tiled_and_short_encodes_take_the_vae_path(tiny_vae, portrait, one_thread) -> None:
    video = reference_clip(portrait, 32, 16, 9)
    with torch.no_grad():
        expected = tiny_vae.encode(video).latent_dist.mode()
    with CallCount(tiny_vae.encoder) as encoder:
        assert_bits_equal(encode_mode(tiny_vae, video), expected)
    assert encoder.calls == 3  # diffusers' loop: one encoder call per chunk
    video = reference_clip(portrait, 32, 16, 21)
    with torch.no_grad():
        tiny_vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=16,
                               tile_sample_stride_width=16)
        try:
            expected = tiny_vae.encode(video).latent_dist.mode()
            with CallCount(tiny_vae.encoder) as encoder:
                assert_bits_equal(encode_mode(tiny_vae, video), expected)
        finally:
            tiny_vae.disable_tiling()
    assert encoder.calls > 0


def test_a_gpu_short_of_memory_gets_the_plain_loop_with_the_same_latents(tiny_vae, portrait, monkeypatch,
                                                                         one_thread) -> None:
    """Where the budget cannot hold what the skipping keeps (5.1 GB at 480x832), diffusers' loop runs instead."""
    import avatarcli.budget
    from avatarcli.features.image import SKIP_RETAINED_ELEMENTS_PER_PIXEL

    video = reference_clip(portrait, 32, 16, 81)
    with torch.no_grad():
        expected = tiny_vae.encode(video).latent_dist.mode()
    keeps = SKIP_RETAINED_ELEMENTS_PER_PIXEL * 32 * 16 * video.element_size()
    short, enough = avatarcli.budget.RESERVE + keeps // 2, avatarcli.budget.RESERVE + 2 * keeps
    for budget, loop_calls in ((short, 21), (enough, 0)):  # 21 chunks; the skipping calls no encoder.forward
        monkeypatch.setattr(avatarcli.budget, "device_budget", lambda device, budget=budget: budget)
        with CallCount(tiny_vae.encoder) as encoder:
            assert_bits_equal(encode_mode(tiny_vae, video), expected)
        assert encoder.calls == loop_calls


# ------------------------------------------------------------------------------------------------------ demo VAE


def test_demo_condition_at_its_size_is_the_full_encode_bit_for_bit(demo_vae, demo_portrait, one_thread) -> None:
    """The call `animate --model demo` makes: an 81-frame window at 128x128."""
    y = reference_condition(demo_vae, demo_portrait, width=128, height=128, num_frames=81)
    assert_bits_equal(y, full_condition(demo_vae, demo_portrait, 128, 128, 81))


@pytest.mark.parametrize("frames", [5, 13, 29, 53, 101])
def test_demo_vae_flashportrait_window_lengths_encode_bit_for_bit(demo_vae, demo_portrait, frames: int,
                                                                one_thread) -> None:
    video = reference_clip(demo_portrait, 48, 32, frames)
    with torch.no_grad():
        expected = demo_vae.encode(video).latent_dist.mode()
    assert_bits_equal(encode_mode(demo_vae, video), expected)
