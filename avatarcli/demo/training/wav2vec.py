"""The audio-encoder stage: a small wav2vec2 (transformers' Wav2Vec2Model) trained from scratch, then frozen.

It learns to predict the mouth openness from the speech of one window: a linear probe on its last hidden state
regresses the openness of the video frame under each token (MSE), on windows normalised per window exactly as the
feature extractor does at inference and at a random gain. The probe is thrown away; the DiT reads the hidden states.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from avatarcli.demo import world
from avatarcli.demo.training.config import DemoSizes, TrainConfig
from avatarcli.demo.training.data import Pool, normalise_audio, openness_targets, speech_windows
from avatarcli.demo.training.schedule import Deadline, cosine


def new_wav2vec(sizes: DemoSizes):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(
        hidden_size=sizes.audio_dim, num_hidden_layers=sizes.audio_layers, num_attention_heads=sizes.audio_heads,
        intermediate_size=2 * sizes.audio_dim, conv_dim=(sizes.audio_conv,) * 7, num_conv_pos_embeddings=32,
        num_conv_pos_embedding_groups=4, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0, layerdrop=0.0, final_dropout=0.0, apply_spec_augment=False, mask_time_prob=0.0,
        vocab_size=32,
    )
    return Wav2Vec2Model(config)


def save_wav2vec(model, folder: Path) -> None:
    """The model and the feature extractor inference loads with it (normalising, at the world's sample rate)."""
    from transformers import Wav2Vec2FeatureExtractor

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=world.SAMPLE_RATE, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(str(folder))


def openness_loss(model, probe, pool: Pool, batch: int, gen: torch.Generator, device) -> torch.Tensor:
    """MSE of the probe's per-token openness on `batch` random speech windows, each at a random gain (e^-1..e)."""
    clips, where = speech_windows(pool, batch, gen)
    gain = torch.exp(torch.empty(batch, 1).uniform_(-1, 1, generator=gen)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        hidden = model(normalise_audio(clips * gain)).last_hidden_state
        pred = probe(hidden).squeeze(-1).float()
    return F.mse_loss(pred, openness_targets(pool, where, pred.shape[1], device))


def train_audio_encoder(pool: Pool, config: TrainConfig, log) -> torch.nn.Module:
    """Per-token openness regression (a linear probe on the last hidden state) for audio_steps steps or
    audio_seconds, whichever ends first; the probe is thrown away."""
    device = torch.device(config.device)
    gen = torch.Generator(device="cpu").manual_seed(config.seed + 100)
    model = new_wav2vec(config.sizes).to(device).train()
    probe = torch.nn.Linear(config.sizes.audio_dim, 1).to(device)
    params = list(model.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=config.audio_lr, weight_decay=0.01)
    deadline = Deadline(config.audio_seconds, config.audio_steps)
    step = 0
    while not deadline.done(step):
        for group in opt.param_groups:
            group["lr"] = config.audio_lr * cosine(int(deadline.progress(step) * 1000), 1000, 80)
        loss = openness_loss(model, probe, pool, config.audio_batch, gen, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0:
            log(f"audio step {step} loss {loss.item():.4f}")
        step += 1
    log(f"audio: {step} steps, final loss {loss.item():.4f}")
    return model.eval().requires_grad_(False)
