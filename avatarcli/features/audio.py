"""Speech samples -> wav2vec2 features (last hidden state, 50 Hz, 768 wide for wav2vec2-base)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

from avatarcli.errors import AvatarError
from avatarcli.media.audio import SAMPLE_RATE

# wav2vec2's conv feature encoder: receptive field 400 samples (25 ms), hop 320 samples (20 ms).
RECEPTIVE_FIELD_SAMPLES = 400
HOP_SAMPLES = 320


def wav2vec_frame_count(num_samples: int) -> int:
    """T_a for a slice of num_samples: floor((n - 400) / 320) + 1, e.g. 161 for 81 video frames at 25 fps."""
    return (num_samples - RECEPTIVE_FIELD_SAMPLES) // HOP_SAMPLES + 1


@torch.no_grad()
def wav2vec_features(
    model: Wav2Vec2Model, feature_extractor: Wav2Vec2FeatureExtractor, samples: np.ndarray,
) -> torch.Tensor:
    """[1, T_a, hidden] features of one slice of 16 kHz mono samples.

    The feature extractor normalises the slice to zero mean and unit variance by itself, so each window is normalised
    separately, as the reference pipeline does (it calls the processor per window). No attention mask, as there.
    """
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"expected mono samples of shape [n], got {samples.shape}")
    if samples.shape[0] < RECEPTIVE_FIELD_SAMPLES:
        raise AvatarError(f"audio slice of {samples.shape[0]} samples is shorter than wav2vec2's "
                          f"{RECEPTIVE_FIELD_SAMPLES}-sample window; use a longer audio file")
    values = feature_extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
    parameter = next(model.parameters())
    return model(values.to(parameter.device, parameter.dtype)).last_hidden_state
