"""The shared window denoiser: branch batching, one conditioning computation per window, and a per-window cache that
stays bounded for both drivers when step prediction skips the windows' last steps."""

from __future__ import annotations

import pytest
import torch

from avatarcli.sampling.denoiser import StableAvatarDenoiser, WindowCache
from avatarcli.sampling.flashportrait import ExpressionGuidance, FlashPortraitDenoiser
from avatarcli.sampling.guidance import Guidance
from avatarcli.sampling.predict import Prediction
from avatarcli.sampling.sampler import sample_streaming
from avatarcli.sampling.schedule import flow_sigmas
from avatarcli.sampling.windows import plan_windows

CHANNELS, SIZE = 4, 2


class StubModel:
    """Stands in for the DiT: a smooth velocity from the latents and the timestep, the layout of the real call."""

    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self) -> None:
        self.calls = []

    def pad_text(self, text: torch.Tensor) -> torch.Tensor:
        return text

    def __call__(self, x, t, text, image, conditioning):
        self.calls.append((x.shape[0], conditioning))
        latents = x[:, :CHANNELS]
        return 0.9 * latents + (t / 1000).view(-1, 1, 1, 1, 1) * torch.arange(x.shape[0]).view(-1, 1, 1, 1, 1)


def stableavatar(model, sigmas, computed):
    def window_audio(window):
        computed.append(window.index)
        return torch.ones(1, 5, 8)

    return StableAvatarDenoiser(model, Guidance("cfg"), positive_text=torch.ones(1, 3, 6),
                                negative_text=torch.zeros(1, 3, 6), image_tokens=torch.zeros(1, 2, 6),
                                condition=torch.zeros(1, 20, 21, SIZE, SIZE), window_audio=window_audio, sigmas=sigmas)


def flashportrait(model, sigmas, computed):
    def window_tokens(window):
        computed.append(window.index)
        return torch.ones(1, window.end - window.start, 3, 8)

    return FlashPortraitDenoiser(model, ExpressionGuidance(emo_scale=4.0, text_scale=2.0),
                                 positive_text=torch.ones(1, 3, 6), negative_text=torch.zeros(1, 3, 6),
                                 image_tokens=torch.zeros(1, 2, 6), condition=torch.zeros(1, 20, 21, SIZE, SIZE),
                                 window_tokens=window_tokens, sigmas=sigmas)


@pytest.mark.parametrize("make", [stableavatar, flashportrait], ids=["audio", "driving"])
def test_cache_stays_bounded_with_prediction_on(make):
    steps, model, computed = 12, StubModel(), []
    sigmas = flow_sigmas(steps)
    plan = plan_windows(21 * 24, 21, 5, "linear")
    denoiser = make(model, sigmas, computed)
    predictor = Prediction(order=1, max_predicted=8, tolerance=1.0, warmup=2).bind(denoiser, sigmas)
    sizes = []

    def watched(window, step, latents):
        velocity = predictor(window, step, latents)
        sizes.append(len(denoiser.cache))
        return velocity

    noise = torch.randn(1, CHANNELS, plan.latent_frames, SIZE, SIZE)
    list(sample_streaming(plan, sigmas, lambda s, e: noise[:, :, s:e], watched))
    assert predictor.predicted_steps > 0  # the windows' last steps were predicted: the drop at the last step is skipped
    assert max(sizes) <= steps + 2 < len(plan.windows)
    assert sorted(computed) == list(range(len(plan.windows)))  # each window's conditioning computed once
    assert {batch for batch, _ in model.calls} == {len(denoiser.guidance.branches)}  # all branches in one forward


def test_window_cache_evicts_the_oldest_entry():
    cache, made = WindowCache(2), []
    for index in (0, 1, 2, 1):
        cache.get(index, lambda i=index: made.append(i) or i)
    assert list(cache.entries) == [1, 2] and made == [0, 1, 2]
    cache.drop(1)
    assert len(cache) == 1
