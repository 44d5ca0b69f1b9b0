"""After the DiT stage: does the trained DiT use its conditions? (A measurement, logged and put in the summary.)

x0 error (whole frame, mouth box) of one window of a held-out identity, from the same noise at each sigma, with the
right inputs and with one input swapped for another held-out identity's (portrait, audio), zeroed (wav2vec2
features) or dropped (adapter output). Equal errors: the input is ignored.
"""

from __future__ import annotations

import numpy as np
import torch

from avatarcli.demo import world
from avatarcli.demo.training.config import HELD_OUT, WINDOW_VIDEO_FRAMES
from avatarcli.demo.training.data import Pool, box_mask, normalise_audio, render_identity
from avatarcli.demo.training.dit import dit_velocity
from avatarcli.demo.training.latents import encode_pool, reference_conditions


@torch.no_grad()
def held_out_inputs(seed: int, vae, wav2vec, image_encoder, size: int, device):
    """One window of identity `seed`, as the DiT sees it: (x0, reference condition, CLIP tokens, wav2vec2 features)."""
    from PIL import Image

    from avatarcli.features.image import clip_features

    video, samples, portrait, _ = render_identity((seed, WINDOW_VIDEO_FRAMES, size))
    portrait = np.array(portrait)  # writable (PIL arrays are not)
    pool = Pool(torch.from_numpy(video[None]).to(device), None, portrait[None], None)
    x0 = encode_pool(vae, pool).to(device)
    tokens = clip_features(image_encoder, Image.fromarray(portrait), size, size).float().to(device)
    clip = torch.from_numpy(samples[None, : WINDOW_VIDEO_FRAMES * world.SAMPLE_RATE // world.FPS]).to(device)
    features = wav2vec(normalise_audio(clip)).last_hidden_state.float()
    return x0, reference_conditions(vae, portrait[None]).float().to(device), tokens, features


@torch.no_grad()
def condition_check(model, vae, wav2vec, image_encoder, prompts: torch.Tensor, size: int,
                    sigmas: tuple[float, ...] = (1.0, 0.9)) -> dict[float, dict[str, tuple[float, float]]]:
    """{sigma: {case: (x0 error over the frame, x0 error in the mouth box)}} for the cases of the module docstring."""
    device = next(model.parameters()).device
    x0, cond, tokens, features = held_out_inputs(HELD_OUT, vae, wav2vec, image_encoder, size, device)
    _, other_cond, other_tokens, other_features = held_out_inputs(HELD_OUT + 1, vae, wav2vec, image_encoder, size,
                                                                  device)
    h, w = x0.shape[-2:]
    mouth = box_mask(world.MOUTH_BOX, h, w, device).view(1, 1, 1, h, w)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(device)
    text = prompts[1:2].to(device)
    cases = {"right": (cond, tokens, features, [0]), "wrong-portrait": (other_cond, other_tokens, features, [0]),
             "wrong-audio": (cond, tokens, other_features, [0]), "zero-audio": (cond, tokens, features * 0, [0]),
             "no-adapter": (cond, tokens, features, [None])}
    out = {}
    for sigma in sigmas:
        xt = (1 - sigma) * x0 + sigma * noise
        s = torch.tensor([sigma], device=device)
        out[sigma] = {}
        for name, (c, t, f, rows) in cases.items():
            err = (xt - sigma * dit_velocity(model, xt, c, s, text, t, f, rows).float() - x0) ** 2
            in_mouth = (err * mouth).sum() / (mouth.sum() * err.shape[1] * err.shape[2])
            out[sigma][name] = (float(err.mean()), float(in_mouth))
    return out
