"""The DiT stage: a small StableAvatarTransformer3DModel trained by flow matching on the encoded pool.

x_t = (1-s) x0 + s eps with target eps - x0 (MSE on the velocity), s drawn like the sampling grid (uniform, then
shifted by SHIFT), on windows of WINDOW latent frames cut from whole encoded videos, with the reference condition and
CLIP tokens computed by the inference code and the frozen wav2vec2's features of the speech under the window. Each
element's conditioning is drawn from a table of the branches guidance runs (_branch_table: real audio 70%, adapter
output dropped 20%, zeroed features 10%, each under either prompt half the time). The loss covers the whole
frame, weighted up on the face and more on the mouth (dit_mouth_weight; normalised to mean 1, the background keeps
about half the mean weight), the audio path learns faster (dit_audio_lr_scale). EMA weights are what the stage
returns (and what is exported); dit_check.py checks that they use their conditions.

Why the video did not look like the portrait, as far as the DiT is concerned:

* It does get what the published model gets: y = [mask | reference latents] (the portrait encoded as the first of
  81 frames, mask 1 on latent frame 0) concatenated to x_t, and the CLIP image tokens through cross-attention, both
  computed by the inference code (tests/test_demo_training.py checks the training forward against the driver's
  denoiser). And it used them: another person's portrait doubled its x0 error (0.20 -> 0.45 at sigma 0.9). What it
  could not do is hand the decoder latents it would draw a person from: the latents it learnt were the means of a
  collapsed posterior, which the decoder had learnt to ignore (vae.py). A DiT on such latents also has to predict
  their jitter, which carries nothing the decoder uses.
* The first frame. Windows were cut uniformly from the 56 starts of a 76-latent video, so 1 window in 56 held the
  video's first latent frame (the first video frame alone, encoded and decoded as a chunk of its own); inference's
  first window always starts there. That frame came out paler and the first second worse than the rest. Now a share
  dit_first_window of the windows starts at latent frame 0 (data.latent_windows). It still comes out smeared, with
  doubled edges, under every preset (benchmarks/README.md, demo_goals.py): every window's reference is the neutral
  portrait while its first frame is the person mid-sway (world.motion's random phases) or later in the clip, an
  offset the DiT cannot know, so it learns their blend. StableAvatar conditions each training clip on its own first
  frame; doing that per window is the next change to this stage.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from avatarcli.demo import world
from avatarcli.demo.training.config import DemoSizes, TrainConfig
from avatarcli.demo.training.data import Pool, box_mask, latent_windows, normalise_audio
from avatarcli.demo.training.layout import transformer_sizes
from avatarcli.demo.training.schedule import Deadline, cosine

SHIFT = 5.0
AUDIO_MODULES = ("vocal_projector", "k_vocal", "v_vocal")  # parameter names of the StableAvatar audio path


def new_transformer(sizes: DemoSizes):
    from avatarcli.models.stableavatar import StableAvatarTransformer3DModel

    t = transformer_sizes(sizes)
    return StableAvatarTransformer3DModel(
        num_attention_heads=t["num_heads"], attention_head_dim=t["dim"] // t["num_heads"], text_dim=t["text_dim"],
        freq_dim=t["freq_dim"], ffn_dim=t["ffn_dim"], num_layers=t["num_layers"], image_dim=t["image_dim"],
        audio_in_dim=t["audio_in_dim"])


def dit_velocity(model, xt: torch.Tensor, conditions: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
                 image_tokens: torch.Tensor, features: torch.Tensor, branch_audio: list) -> torch.Tensor:
    """The DiT's velocity for a training batch, called as avatarcli.sampling.denoiser calls it at inference:
    [x_t | mask + reference latents], timestep sigma * 1000, text, CLIP tokens, wav2vec2 features per element."""
    from avatarcli.models.stableavatar import AudioConditioning

    return model(torch.cat([xt, conditions], dim=1), sigma * 1000, text, image_tokens,
                 AudioConditioning(features, branch_audio))


def _branch_table():
    from avatarcli.sampling.guidance import Branch

    # What one DiT training element is conditioned on, drawn per element from this table: every branch a guidance
    # mode runs at inference (avatarcli.sampling.guidance) is trained on directly, with its own rate, rather than
    # arising from independent dropouts (which gave cfg's b0 ~1% of the batch). The prompt says nothing in this world
    # (every video is "talking"), so every audio input is trained under both prompts alike: the text guidance term
    # (cfg's b2 - b1, times 3) then has nothing to amplify, and cfg's b0 and b1, which it weighs -4 and 2 at the
    # presets' scales, get as much training as the positive-prompt branches.
    return (
        (Branch("positive", "real"), 0.35),  # full conditioning: guidance none, cfg b2, ang b0
        (Branch("negative", "real"), 0.35),  # cfg b1: negative prompt, audio
        (Branch("negative", "none"), 0.1),  # cfg b0: negative prompt, adapter output dropped
        (Branch("positive", "none"), 0.1),  # ang b2: adapter output dropped
        (Branch("positive", "silent"), 0.05),  # ang b1: wav2vec2 features zeroed before the adapter
        (Branch("negative", "silent"), 0.05),  # the same under the other prompt
    )


def draw_branches(count: int, gen: torch.Generator) -> list:
    """`count` conditioning branches (avatarcli.sampling.guidance.Branch) drawn at the table's rates."""
    table = _branch_table()
    rates = torch.tensor([rate for _, rate in table], dtype=torch.float64)
    picks = torch.multinomial(rates, count, replacement=True, generator=gen)
    return [table[i][0] for i in picks.tolist()]


def branch_inputs(branches: list, features: torch.Tensor, prompts: torch.Tensor):
    """Per-element wav2vec2 features, adapter rows and prompt embeddings of a training batch for its branches."""
    keep = torch.tensor([b.audio != "silent" for b in branches], dtype=features.dtype, device=features.device)
    branch_audio = [None if b.audio == "none" else i for i, b in enumerate(branches)]
    text = prompts[torch.tensor([int(b.prompt == "positive") for b in branches])]
    return features * keep.view(-1, 1, 1), branch_audio, text


def dit_param_groups(model, audio_lr_scale: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only; the audio path (AUDIO_MODULES: adapter + per-block audio
    key/value) at `audio_lr_scale` times the learning rate (group["scale"]), the rest at 1x."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        decays = not (p.ndim < 2 or "norm" in name or "modulation" in name or "scale_shift" in name)
        audio = any(part in name for part in AUDIO_MODULES)
        groups.setdefault((audio, decays), []).append(p)
    return [{"params": params, "weight_decay": 0.01 if decays else 0.0, "scale": audio_lr_scale if audio else 1.0}
            for (audio, decays), params in sorted(groups.items())]


def face_weight(height: int, width: int, mouth_weight: float, device) -> torch.Tensor:
    """Per-pixel loss weight 1 + face box + mouth_weight * mouth box, normalised to mean 1: [1, 1, 1, h, w]."""
    mouth = box_mask(world.MOUTH_BOX, height, width, device)
    weight = 1 + box_mask(world.FACE_BOX, height, width, device) + mouth_weight * mouth
    return (weight / weight.mean()).view(1, 1, 1, height, width)


@dataclass
class FlowBatch:
    x0: torch.Tensor  # [B, 16, WINDOW, h, w] clean latents
    idx: torch.Tensor  # [B] pool index of each window (its reference condition and CLIP tokens)
    features: torch.Tensor  # [B, tokens, audio_dim] wav2vec2 features, zeroed for the silent branch
    branch_audio: list  # adapter row of each element, None where its adapter output is dropped
    text: torch.Tensor  # [B, 512, text_dim] prompt embedding of each element's branch
    sigma: torch.Tensor  # [B] noise level
    noise: torch.Tensor  # [B, 16, WINDOW, h, w]


def flow_batch(pool: Pool, latents: torch.Tensor, wav2vec, prompts: torch.Tensor, count: int, gen: torch.Generator,
               device, noise_gen: torch.Generator, first: float = 0.0) -> FlowBatch:
    """`count` random windows (a share `first` from the video's start), their audio features and conditioning
    branches, noise levels and noise. The noise is drawn on the device by `noise_gen`, a generator there (drawn on
    the host and copied, it was part of the host work that took 43% of a step at batch 96 on an H100,
    bench_train_step.py)."""
    from avatarcli.sampling.schedule import shift_sigma

    x0, idx, clips = latent_windows(pool, latents, count, gen, first)
    x0 = x0.contiguous()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        features = wav2vec(normalise_audio(clips)).last_hidden_state.float()
    features, branch_audio, text = branch_inputs(draw_branches(count, gen), features, prompts)
    text = text.to(device)
    sigma = torch.tensor(shift_sigma(torch.rand(count, generator=gen).numpy(), SHIFT), dtype=torch.float32).to(device)
    noise = torch.randn(x0.shape, generator=noise_gen, device=device)
    return FlowBatch(x0, idx, features, branch_audio, text, sigma, noise)


def flow_matching_loss(model, batch: FlowBatch, conditions: torch.Tensor, image_tokens: torch.Tensor,
                       weight: torch.Tensor) -> torch.Tensor:
    """Weighted MSE of the predicted velocity against noise - x0 at x_t = (1 - sigma) x0 + sigma noise."""
    device = batch.x0.device
    s = batch.sigma.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * batch.x0 + s * batch.noise
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        pred = dit_velocity(model, xt, conditions[batch.idx], batch.sigma, batch.text, image_tokens[batch.idx],
                            batch.features, batch.branch_audio)
    return (((pred.float() - (batch.noise - batch.x0)) ** 2) * weight).mean()


@torch.no_grad()
def ema_update(ema, model, decay: float, step: int) -> None:
    """ema <- d ema + (1 - d) model, d = min(decay, (1 + step) / (10 + step)) (a short memory early on)."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - d)


def train_dit(pool: Pool, latents: torch.Tensor, conditions: torch.Tensor, image_tokens: torch.Tensor,
              prompts: torch.Tensor, wav2vec, config: TrainConfig, log, model=None, seconds: float | None = None):
    """prompts [2, 512, text_dim]: negative, positive (as encode_prompts returns them for the pipeline).
    From scratch, or from `model`; `seconds`: the stage's time budget (default config.dit_seconds).
    Returns (EMA model, steps)."""
    device = torch.device(config.device)
    gen = torch.Generator(device="cpu").manual_seed(config.seed + 300)
    torch.manual_seed(config.seed + 301)
    fresh = model is None  # a model trained on (--init) starts its average at full memory: no short early window
    model = (new_transformer(config.sizes) if fresh else model).to(device).float().train()
    model.requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(dit_param_groups(model, config.dit_audio_lr_scale), lr=config.dit_lr, betas=(0.9, 0.99))
    weight = face_weight(latents.shape[3], latents.shape[4], config.dit_mouth_weight, device)
    deadline = Deadline(config.dit_seconds if seconds is None else seconds, config.dit_steps)
    noise_gen = torch.Generator(device=device).manual_seed(config.seed + 302)
    step, losses = 0, []
    while not deadline.done(step):
        for group in opt.param_groups:
            group["lr"] = config.dit_lr * group["scale"] * cosine(int(deadline.progress(step) * 1000), 1000, 20)
        batch = flow_batch(pool, latents, wav2vec, prompts, config.dit_batch, gen, device, noise_gen,
                           config.dit_first_window)
        loss = flow_matching_loss(model, batch, conditions, image_tokens, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, config.ema, step if fresh else 10**9)
        losses.append(loss.item() if step % 10 == 0 else losses[-1] if losses else loss.item())
        if step % 200 == 0:
            log(f"dit step {step} loss {np.mean(losses[-200:]):.4f} ({time.perf_counter() - deadline.start:.0f} s)")
        step += 1
    log(f"dit: {step} steps, final loss {np.mean(losses[-200:]):.4f}")
    return ema, step
