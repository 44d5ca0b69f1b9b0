"""Streaming causal decode: any split of the latent video into chunks gives exactly the frames of one vae.decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.video_processor import VideoProcessor

from avatarcli.decode.stream import StreamingDecoder, decode_all

LATENT_FRAMES = 6


def _tiny_wan21_vae() -> AutoencoderKLWan:
    # diffusers_stack.md §5, with non-trivial latent statistics so that de-normalisation matters.
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True],
                            latents_mean=torch.linspace(-0.5, 0.5, 16).tolist(),
                            latents_std=torch.linspace(0.5, 2.0, 16).tolist())  # fmt: skip


def _tiny_wan22_vae() -> AutoencoderKLWan:
    # Wan2.2 layout (residual up-blocks that use first_chunk, pixel patchify 2): exercises both code paths.
    return AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
                            in_channels=12, out_channels=12, scale_factor_spatial=16,
                            latents_mean=torch.linspace(-0.5, 0.5, 48).tolist(),
                            latents_std=torch.linspace(0.5, 2.0, 48).tolist())  # fmt: skip


@pytest.fixture(scope="module", params=["wan2.1", "wan2.2"])
def vae(request) -> AutoencoderKLWan:
    torch.manual_seed(0)
    return (_tiny_wan21_vae() if request.param == "wan2.1" else _tiny_wan22_vae()).eval()


@pytest.fixture(scope="module")
def latents(vae: AutoencoderKLWan) -> torch.Tensor:
    # Not smaller than 4x6: on a handful of voxels CPU conv kernels round a 1-frame chunk differently.
    shape = (1, vae.config.z_dim, LATENT_FRAMES, 4, 6)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(vae: AutoencoderKLWan, latents: torch.Tensor) -> np.ndarray:
    return decode_all(vae, latents)


def _stream(decoder: StreamingDecoder, latents: torch.Tensor, chunk_sizes: list[int]) -> list[np.ndarray]:
    starts = np.cumsum([0] + chunk_sizes[:-1])
    return [decoder.push(latents[:, :, start : start + size]) for start, size in zip(starts, chunk_sizes)]


def test_decode_all_is_the_wan_pipeline_output_as_uint8(vae: AutoencoderKLWan, latents: torch.Tensor) -> None:
    # What WanPipeline does with output_type="np", then the rounding of VaeImageProcessor.numpy_to_pil.
    channels = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(channels)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(channels)
    with torch.no_grad():
        video = vae.decode(latents / inverse_std + mean).sample
    expected = VideoProcessor(vae_scale_factor=8).postprocess_video(video, output_type="np")[0]
    expected = (expected * 255).round().astype(np.uint8)

    frames = decode_all(vae, latents)

    scale = vae.config.scale_factor_spatial
    assert frames.shape == (1 + 4 * (LATENT_FRAMES - 1), 4 * scale, 6 * scale, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, expected)
    assert len(np.unique(frames)) > 50  # a real picture, not a clamped constant


@pytest.mark.parametrize("chunk_sizes", [[1] * 6, [2, 1, 3], [3, 2, 1], [1, 5], [6]], ids=str)
def test_streamed_chunks_equal_one_decode_bit_for_bit(vae, latents, reference, chunk_sizes) -> None:
    pieces = _stream(StreamingDecoder(vae), latents, chunk_sizes)

    expected_counts = [4 * size for size in chunk_sizes]
    expected_counts[0] -= 3  # the first latent frame of the video decodes to a single frame
    assert [len(piece) for piece in pieces] == expected_counts
    assert np.array_equal(np.concatenate(pieces), reference)


def test_earlier_chunks_shape_later_frames(vae, latents, reference) -> None:
    # Guards the test above: the carried cache really holds context, so a wrong history is visible.
    decoder = StreamingDecoder(vae)
    decoder.push(torch.zeros_like(latents[:, :, :3]))
    tail = decoder.push(latents[:, :, 3:])
    assert tail.shape == reference[9:].shape
    assert not np.array_equal(tail, reference[9:])


def test_generator_form_yields_each_chunk_and_resets_at_the_end(vae, latents, reference) -> None:
    decoder = StreamingDecoder(vae)
    chunks = [latents[:, :, :2], latents[:, :, 2:]]

    pieces = list(decoder.decode(iter(chunks)))

    assert np.array_equal(np.concatenate(pieces), reference)
    assert not decoder.started


def test_close_starts_a_new_video(vae, latents, reference) -> None:
    decoder = StreamingDecoder(vae)
    _stream(decoder, latents, [2])
    decoder.close()
    assert np.array_equal(np.concatenate(_stream(decoder, latents, [4, 2])), reference)


def test_other_vae_calls_between_pushes_do_not_disturb_the_stream(vae, latents, reference) -> None:
    decoder = StreamingDecoder(vae)
    first = decoder.push(latents[:, :, :2])
    with torch.no_grad():
        vae.encode(torch.zeros(1, 3, 5, 64, 64))  # e.g. the next window's reference frame
        vae.decode(torch.zeros_like(latents[:, :, :2]))
    rest = decoder.push(latents[:, :, 2:])
    assert np.array_equal(np.concatenate([first, rest]), reference)


def test_latents_of_the_wrong_shape_are_rejected(vae) -> None:
    with pytest.raises(ValueError, match=f"1, {vae.config.z_dim}, F, h, w"):
        StreamingDecoder(vae).push(torch.zeros(1, 8, 1, 4, 6))


def _long_stream(vae: AutoencoderKLWan, frames: int) -> torch.Tensor:
    return torch.randn(1, vae.config.z_dim, frames, 4, 6, generator=torch.Generator().manual_seed(2))


def _caches_equal(a: StreamingDecoder, b: StreamingDecoder) -> bool:
    pairs = list(zip(a._feat_cache, b._feat_cache, strict=True))
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in pairs)


@pytest.mark.parametrize("saved_after", ["before the horizon", "past the horizon"])
def test_a_stream_resumed_from_its_saved_state_continues_bit_for_bit(vae, saved_after) -> None:
    """The saved state holds the last latent frames, not the cache; replaying them rebuilds the cache exactly,
    also when the stream is longer than the replay horizon (the replay then starts mid-video)."""
    horizon = StreamingDecoder(vae).replay_frames
    cut = 3 if saved_after == "before the horizon" else horizon + 4
    latents = _long_stream(vae, cut + 4)
    uninterrupted = StreamingDecoder(vae)
    uninterrupted.push(latents[:, :, :cut])
    state = uninterrupted.state_dict()

    resumed = StreamingDecoder(vae)
    resumed.load_state_dict(state)

    assert state["replay"].shape[2] == min(cut, horizon) and state["pushed"] == cut
    assert resumed.started and _caches_equal(resumed, uninterrupted)
    assert np.array_equal(resumed.push(latents[:, :, cut:]), uninterrupted.push(latents[:, :, cut:]))


def test_a_replay_shorter_than_the_decoders_memory_gives_other_frames(vae) -> None:
    # Guards the test above: the horizon matters, so a replay of too few frames is caught by the comparison.
    horizon = StreamingDecoder(vae).replay_frames
    latents = _long_stream(vae, horizon + 8)
    uninterrupted = StreamingDecoder(vae)
    uninterrupted.push(latents[:, :, : horizon + 4])
    short = StreamingDecoder(vae)
    short.replay_frames = uninterrupted.replay_frames = 3
    state = uninterrupted.state_dict()
    state["replay"] = state["replay"][:, :, -3:]
    short.load_state_dict(state)

    rest = latents[:, :, horizon + 4 :]
    assert not np.array_equal(short.push(rest), uninterrupted.push(rest))


def test_a_state_for_another_horizon_is_rejected(vae) -> None:
    decoder = StreamingDecoder(vae)
    decoder.push(_long_stream(vae, 2))
    state = dict(decoder.state_dict(), replay_frames=decoder.replay_frames + 1)
    with pytest.raises(ValueError, match="horizon"):
        StreamingDecoder(vae).load_state_dict(state)
