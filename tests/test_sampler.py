"""The window plan, and the streaming wavefront sampler against the joint (reference-order) loop."""

from __future__ import annotations

import pytest
import torch

from avatarcli.sampling.guidance import Guidance
from avatarcli.sampling.sampler import sample_joint, sample_streaming
from avatarcli.sampling.schedule import flow_sigmas
from avatarcli.sampling.windows import latent_frames_for, plan_windows

WINDOW = 21


def toy_denoiser(channels: int = 4, seed: int = 0):
    """Nonlinear in the latents, mixing frames and channels, different per window and step: any order mistake shows."""
    mix = torch.randn(channels, channels, generator=torch.Generator().manual_seed(seed))

    def denoise(window, step, x):
        y = torch.einsum("bcfhw,cd->bdfhw", x, mix)
        return torch.tanh(y) * (1 + 0.1 * window.index) + 0.05 * step + x.mean(dim=2, keepdim=True)

    return denoise


def length_for_windows(n: int, overlap: int) -> int:
    return WINDOW if n == 1 else WINDOW + (n - 1) * (WINDOW - overlap)


def run_both(plan, steps=5, channels=4, denoise=None, state_dtype=None):
    sigmas = flow_sigmas(steps)
    noise = torch.randn(1, channels, plan.latent_frames, 2, 3, generator=torch.Generator().manual_seed(1))
    denoise = denoise or toy_denoiser(channels)
    joint = sample_joint(plan, sigmas, noise, denoise, state_dtype)
    chunks = list(sample_streaming(plan, sigmas, lambda s, e: noise[:, :, s:e], denoise, state_dtype))
    return joint, chunks


@pytest.mark.parametrize("windows", [1, 2, 5])
@pytest.mark.parametrize("overlap", [5, 10])
@pytest.mark.parametrize("blend", ["log", "uniform"])
def test_wavefront_equals_joint_loop(windows, overlap, blend):
    plan = plan_windows(length_for_windows(windows, overlap), WINDOW, overlap, blend)
    assert len(plan.windows) == windows
    joint, chunks = run_both(plan)
    streamed = torch.cat([c.latents for c in chunks], dim=2)
    assert (streamed - joint).abs().max().item() <= 1e-6


@pytest.mark.parametrize("length", [10, 22, 40, 63, 100])
def test_wavefront_equals_joint_loop_with_shifted_last_window(length):
    """Last windows that overlap their predecessor by more than the nominal overlap, or two windows back."""
    plan = plan_windows(length, WINDOW, 5, "log")
    joint, chunks = run_both(plan)
    assert torch.equal(torch.cat([c.latents for c in chunks], dim=2), joint)


def test_wavefront_equals_joint_loop_with_bfloat16_state():
    plan = plan_windows(60, WINDOW, 8, "log")
    joint, chunks = run_both(plan, state_dtype=torch.bfloat16)
    assert torch.equal(torch.cat([c.latents for c in chunks], dim=2), joint)


def test_frames_are_emitted_in_order_before_the_video_ends():
    plan = plan_windows(length_for_windows(8, 5), WINDOW, 5, "log")
    _, chunks = run_both(plan, steps=3)
    starts = [c.start for c in chunks]
    assert starts[0] == 0 and starts == sorted(starts) and len(chunks) > 1
    assert sum(c.latents.shape[2] for c in chunks) == plan.latent_frames
    assert all(b.start == a.start + a.latents.shape[2] for a, b in zip(chunks, chunks[1:]))


def test_live_windows_of_a_ten_minute_plan_stay_bounded_by_the_steps():
    steps = 50
    video_frames = 10 * 60 * 25
    plan = plan_windows(latent_frames_for(video_frames), WINDOW, 5, "log")
    assert len(plan.windows) > 200
    last_step: dict[int, int] = {}
    live_max = 0
    first_final_after = None
    calls = 0

    def denoise(window, step, x):
        nonlocal live_max, calls
        calls += 1
        last_step[window.index] = step
        live_max = max(live_max, sum(1 for s in last_step.values() if s < steps - 1))
        return torch.zeros_like(x)

    frames = 0
    for chunk in sample_streaming(plan, flow_sigmas(steps), lambda s, e: torch.zeros(1, 1, e - s, 1, 1), denoise):
        first_final_after = first_final_after or calls
        frames += chunk.latents.shape[2]
    assert frames == plan.latent_frames
    assert calls == steps * len(plan.windows)
    assert live_max <= steps + 2  # bounded by the steps, not by the 235 windows
    assert first_final_after < 2 * steps * steps  # the first frames are final within ~steps^2 window-steps


def test_guided_combination_formulas():
    b = torch.randn(3, 2)
    cfg = Guidance("cfg", text_scale=3.0, audio_scale=5.0).combine(b)
    assert torch.allclose(cfg, b[0] + 5 * (b[1] - b[0]) + 3 * (b[2] - b[1]))
    ang = Guidance("ang", alpha=4.5, beta=3.0).combine(b)
    assert torch.allclose(ang, 8.5 * b[0] - 4.5 * b[1] - 3.0 * b[2])
    assert [br.audio for br in Guidance("ang").branches] == ["real", "silent", "none"]
    assert [br.prompt for br in Guidance("cfg").branches] == ["negative", "negative", "positive"]


# ---- window plan -------------------------------------------------------------------------------------------------


def test_plan_covers_every_frame_with_full_windows():
    for length in (1, 5, 21, 22, 37, 63, 375, 3751):
        plan = plan_windows(length, WINDOW, 5, "log")
        assert plan.latent_frames == max(length, WINDOW)
        assert all(w.latent_frames == WINDOW for w in plan.windows)
        assert plan.windows[0].start == 0 and plan.windows[-1].end == plan.latent_frames
        assert all(b.start < a.end for a, b in zip(plan.windows, plan.windows[1:]))  # overlapping, no gaps


def test_short_audio_is_one_padded_window():
    plan = plan_windows(latent_frames_for(12), WINDOW, 5, "log")  # 0.5 s at 25 fps
    assert [(w.start, w.end) for w in plan.windows] == [(0, WINDOW)]


def test_latent_frames_cover_the_video_frames():
    for frames in (1, 2, 5, 81, 82, 250, 15000):
        latents = latent_frames_for(frames)
        assert 4 * (latents - 1) + 1 >= frames > 4 * (latents - 2) + 1 or latents == 1


def test_plan_rejects_bad_overlap_and_blend():
    with pytest.raises(ValueError):
        plan_windows(40, WINDOW, 0, "log")
    with pytest.raises(ValueError):
        plan_windows(40, WINDOW, 21, "log")
    with pytest.raises(ValueError):
        plan_windows(40, WINDOW, 5, "cosine")


@pytest.mark.parametrize("overlap", [12, 15, 18, 20])
def test_wavefront_equals_joint_loop_with_overlaps_above_half_a_window(overlap):
    """Many windows write each frame: the ready window can lie beyond the usual wavefront span."""
    plan = plan_windows(latent_frames_for(300), WINDOW, overlap, "log")
    joint, chunks = run_both(plan, steps=3)
    assert torch.equal(torch.cat([c.latents for c in chunks], dim=2), joint)
