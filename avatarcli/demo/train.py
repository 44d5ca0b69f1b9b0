"""Train the demo model on the synthetic world (world.py) and write it in the published StableAvatar folder layout.

Stages, all reproducible from one seed, data generated on the fly from the world:
  1. fixed   tiny umT5 (+ tokenizer) and CLIP ViT with fixed random weights: they carry no information here, the DiT
             learns to rely on the reference latents and the audio (as the published layout needs them, they exist).
  2. data    a pool of identities, each speaking its own synthetic speech with blinks and sway (rendered in worker
             processes); windows are cut from it at random.
  3. audio   a small wav2vec2 (transformers' Wav2Vec2Model) trained to predict the mouth openness from the audio of
             one window, normalised per window exactly as the feature extractor does at inference; then frozen.
  4. vae     a small diffusers AutoencoderKLWan (the Wan 2.1 block layout at a narrow base width): L1 reconstruction,
             weighted up on the mouth, plus a small KL. Its latent statistics are then folded into its 1x1x1 quant /
             post-quant convolutions, so the Wan 2.1 latents_mean/std that every Wan VAE is loaded with normalise its
             latents to zero mean and unit variance, and the inference path is unchanged.
  5. dit     a small StableAvatarTransformer3DModel: flow matching (x_t = (1-s) x0 + s eps, target eps - x0) with s
             drawn like the sampling grid (uniform, then shifted by 5), on windows of 21 latent frames cut from whole
             encoded videos, with the reference condition and CLIP tokens computed by the inference code. Condition
             dropout: wav2vec2 features zeroed 10% (as the reference trains), adapter output dropped 10% and the
             negative prompt instead of the positive one 10% (the unconditional branches of `cfg`). Loss weighted up
             on the face and the mouth, as the reference weights its face and lip masks. EMA weights are exported.

The trained weights are written in the original key layouts (transformer3d-square.safetensors with Wan names,
Wan2.1_VAE.safetensors with Wan VAE names) and verified by loading them back through avatarcli.loading, strictly.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from avatarcli.demo import world

BASE = "Wan2.1-Fun-V1.1-1.3B-InP"
AVATAR = "StableAvatar-1.3B"
WAV2VEC = "wav2vec2-base-960h"
WINDOW = 21  # latent frames per window, as the real model
WINDOW_VIDEO_FRAMES = 4 * (WINDOW - 1) + 1
SHIFT = 5.0
PROMPT = "The protagonist is talking."  # = avatarcli.pipeline.DEFAULT_PROMPT (that module needs ffmpeg)


@dataclass
class DemoSizes:
    dim: int = 128
    num_heads: int = 4
    ffn_dim: int = 384
    num_layers: int = 4
    freq_dim: int = 64
    vae_base: int = 12
    audio_dim: int = 64
    audio_layers: int = 2
    audio_heads: int = 4
    audio_conv: int = 32


@dataclass
class TrainConfig:
    seed: int = 0
    identities: int = 400
    clip_latents: int = 76  # latent frames per pool video: 4 * 75 + 1 = 301 video frames, ~12 s
    workers: int = 16
    sizes: DemoSizes = field(default_factory=DemoSizes)
    audio_steps: int = 600
    audio_batch: int = 64
    audio_lr: float = 1e-3
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_clip_frames: int = 17
    vae_lr: float = 5e-4
    vae_kl: float = 1e-4
    vae_seconds: float = 300.0
    dit_steps: int = 100000
    dit_batch: int = 96
    dit_lr: float = 4e-4
    dit_seconds: float = 420.0
    ema: float = 0.999
    device: str = "cuda"
    size: int = world.SIZE  # frame size of the training videos
    init: str | None = None  # continue from a weights folder: audio encoder kept, VAE decoder and DiT trained on

    @classmethod
    def tiny(cls) -> TrainConfig:
        """A few iterations of everything on CPU at toy sizes (tests)."""
        return cls(identities=1, clip_latents=22, workers=0, size=32,
                   sizes=DemoSizes(dim=32, num_heads=2, ffn_dim=32, num_layers=1, freq_dim=32, vae_base=4,
                                   audio_dim=32, audio_layers=1, audio_heads=2, audio_conv=8),
                   audio_steps=2, audio_batch=2, vae_steps=2, vae_batch=1, vae_clip_frames=5, dit_steps=2,
                   dit_batch=2, device="cpu", ema=0.5)


def transformer_sizes(sizes: DemoSizes) -> dict:
    """Sizes in the naming of avatarcli.testing.stableavatar (the original Wan key layout)."""
    from avatarcli.testing.components import TINY_CLIP, TINY_T5

    return dict(dim=sizes.dim, num_heads=sizes.num_heads, in_dim=36, out_dim=16, text_dim=TINY_T5["dim"],
                freq_dim=sizes.freq_dim, ffn_dim=sizes.ffn_dim, num_layers=sizes.num_layers,
                image_dim=TINY_CLIP["vision_dim"], audio_in_dim=sizes.audio_dim, audio_layers=2, text_len=512,
                eps=1e-6)


# ------------------------------------------------------------------------------------------------------ data


def _render_one(args: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    seed, frames, size = args
    identity = world.random_identity(seed)
    samples = world.speech(seed, frames / world.FPS)
    video = world.render_video(identity, samples, motion_seed=seed, size=size)
    openness = world.mouth_openness(samples, frames=len(video))
    return video, samples, np.asarray(world.portrait(identity, size)), openness.astype(np.float32)


@dataclass
class Pool:
    videos: torch.Tensor  # [N, F, H, W, 3] uint8 (on the training device)
    audio: torch.Tensor  # [N, samples] float32
    portraits: np.ndarray  # [N, H, W, 3] uint8
    openness: torch.Tensor  # [N, F]


def make_pool(config: TrainConfig, log: Callable[[str], None]) -> Pool:
    """Identities 1_000_000 + seed * 100_000 + i, so the training people are not the small-seed demo faces."""
    frames = 4 * (config.clip_latents - 1) + 1
    jobs = [(1_000_000 + config.seed * 100_000 + i, frames, config.size) for i in range(config.identities)]
    started = time.perf_counter()
    if config.workers:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(config.workers) as pool:
            results = pool.map(_render_one, jobs, chunksize=4)
    else:
        results = [_render_one(job) for job in jobs]
    device = torch.device(config.device)
    pool = Pool(
        videos=torch.from_numpy(np.stack([r[0] for r in results])).to(device),
        audio=torch.from_numpy(np.stack([r[1] for r in results])).to(device),
        portraits=np.stack([r[2] for r in results]),
        openness=torch.from_numpy(np.stack([r[3] for r in results])).to(device),
    )
    log(f"data: {config.identities} identities x {frames} frames in {time.perf_counter() - started:.1f} s")
    return pool


def to_unit(video_uint8: torch.Tensor) -> torch.Tensor:
    """[B, F, H, W, 3] uint8 -> [B, 3, F, H, W] float in [-1, 1]."""
    return video_uint8.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def normalise_audio(samples: torch.Tensor) -> torch.Tensor:
    """Wav2Vec2FeatureExtractor's per-slice zero-mean / unit-variance normalisation, batched."""
    mean = samples.mean(dim=-1, keepdim=True)
    var = samples.var(dim=-1, keepdim=True, unbiased=False)
    return (samples - mean) / torch.sqrt(var + 1e-7)


def box_mask(box: tuple[float, float, float, float], height: int, width: int, device) -> torch.Tensor:
    x0, y0, x1, y1 = box
    ys = (torch.arange(height, device=device) + 0.5) / height
    xs = (torch.arange(width, device=device) + 0.5) / width
    return (((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]).float()


# ----------------------------------------------------------------------------------------------- components


def write_fixed_components(folder: Path, sizes: DemoSizes, seed: int) -> None:
    """Tiny umT5 + tokenizer and CLIP (fixed random), and the Wan config.json, in the published layout."""
    from safetensors.torch import save_file

    from avatarcli.testing.components import (
        CLIP_FILE, T5_FILE, T5_TOKENIZER_FOLDER, TINY_CLIP, TINY_T5, random_state_dict,
        umt5_encoder_original_shapes, write_tiny_umt5_tokenizer, xlm_roberta_clip_original_shapes,
    )
    from avatarcli.testing.stableavatar import wan_config

    base = folder / BASE
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps(wan_config(transformer_sizes(sizes)), indent=2))
    t5 = random_state_dict(umt5_encoder_original_shapes(**TINY_T5), seed + 2, dtype=torch.bfloat16)
    save_file(t5, str((base / T5_FILE).with_suffix(".safetensors")))
    write_tiny_umt5_tokenizer(base / T5_TOKENIZER_FOLDER, vocab_size=TINY_T5["vocab"])
    clip = random_state_dict(xlm_roberta_clip_original_shapes(**TINY_CLIP), seed + 3)
    visual = {k: v for k, v in clip.items() if k.startswith("visual.") and k != "visual.head"}
    save_file(visual, str((base / CLIP_FILE).with_suffix(".safetensors")))


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
    from transformers import Wav2Vec2FeatureExtractor

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=world.SAMPLE_RATE, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(str(folder))


def new_vae(sizes: DemoSizes):
    from diffusers import AutoencoderKLWan

    from avatarcli.loading.components import WAN21_VAE

    return AutoencoderKLWan(**dict(WAN21_VAE, base_dim=sizes.vae_base))


def new_transformer(sizes: DemoSizes):
    from avatarcli.models.stableavatar import StableAvatarTransformer3DModel

    t = transformer_sizes(sizes)
    return StableAvatarTransformer3DModel(
        num_attention_heads=t["num_heads"], attention_head_dim=t["dim"] // t["num_heads"], text_dim=t["text_dim"],
        freq_dim=t["freq_dim"], ffn_dim=t["ffn_dim"], num_layers=t["num_layers"], image_dim=t["image_dim"],
        audio_in_dim=t["audio_in_dim"])


# --------------------------------------------------------------------------------------------- export layout


def export_transformer(model, sizes: DemoSizes) -> dict[str, torch.Tensor]:
    """diffusers names -> the original Wan/StableAvatar names the published .pt uses (inverse of the loader)."""
    from avatarcli.loading.transformer import convert_original_keys
    from avatarcli.testing.stableavatar import original_key_shapes

    shapes = original_key_shapes(transformer_sizes(sizes))
    markers = {key: torch.empty(shape) for key, shape in shapes.items()}
    converted = convert_original_keys(markers)
    by_pointer = {value.data_ptr(): key for key, value in markers.items()}
    state = model.state_dict()
    out = {}
    for new_key, value in converted.items():
        original = by_pointer[value.data_ptr()]
        out[original] = state[new_key].detach().float().cpu().reshape(shapes[original]).contiguous()
    if set(converted) != set(state):
        raise RuntimeError(f"layout mismatch: {sorted(set(state) ^ set(converted))[:5]}")
    return out


def export_vae(vae, sizes: DemoSizes) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKLWan names -> Wan2.1_VAE.pth names (converted key by key, as the loader does)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from avatarcli.testing.components import wan_vae_original_shapes

    state = vae.state_dict()
    out = {}
    for key, shape in wan_vae_original_shapes(dim=sizes.vae_base, z_dim=16).items():
        (new_key,) = convert_wan_vae_to_diffusers({key: torch.empty(shape)}).keys()
        out[key] = state[new_key].detach().float().cpu().reshape(shape).contiguous()
    return out


@torch.no_grad()
def fold_latent_statistics(vae, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make (mu - latents_mean) / latents_std of the config equal (mu - mean) / std of the trained encoder.

    mu' = a mu + c with a = s_wan / std, c = m_wan - a mean, folded into quant_conv (mu rows; log-variance rows
    shifted by 2 log a); post_quant_conv takes z = (z' - c) / a, folded into its weights."""
    m_wan = torch.tensor(vae.config.latents_mean, dtype=torch.float64)
    s_wan = torch.tensor(vae.config.latents_std, dtype=torch.float64)
    a = s_wan / std.double().cpu()
    c = m_wan - a * mean.double().cpu()
    z = len(a)
    quant, post = vae.quant_conv, vae.post_quant_conv
    w, b = quant.weight.double(), quant.bias.double()
    w[:z] *= a.view(-1, 1, 1, 1, 1).to(w.device)
    b[:z] = b[:z] * a.to(b.device) + c.to(b.device)
    b[z:] += 2 * torch.log(a).to(b.device)
    quant.weight.copy_(w)
    quant.bias.copy_(b)
    w2, b2 = post.weight.double(), post.bias.double()
    b2 -= (w2[:, :, 0, 0, 0] @ (c / a).to(w2.device))
    w2 /= a.view(1, -1, 1, 1, 1).to(w2.device)
    post.weight.copy_(w2)
    post.bias.copy_(b2)


# ------------------------------------------------------------------------------------------------- training


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))) * 0.9 + 0.1


class Deadline:
    def __init__(self, seconds: float, steps: int):
        self.start, self.seconds, self.steps = time.perf_counter(), seconds, steps

    def progress(self, step: int) -> float:
        return max(step / self.steps, (time.perf_counter() - self.start) / self.seconds)

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0


def train_audio_encoder(pool: Pool, config: TrainConfig, log) -> torch.nn.Module:
    """Per-token openness regression (a linear probe on the last hidden state); the probe is thrown away."""
    device = torch.device(config.device)
    gen = torch.Generator(device="cpu").manual_seed(config.seed + 100)
    model = new_wav2vec(config.sizes).to(device).train()
    probe = torch.nn.Linear(config.sizes.audio_dim, 1).to(device)
    params = list(model.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=config.audio_lr, weight_decay=0.01)
    span = WINDOW_VIDEO_FRAMES * world.SAMPLE_RATE // world.FPS
    frames = pool.openness.shape[1]
    hop = world.SAMPLE_RATE // world.FPS
    for step in range(config.audio_steps):
        for group in opt.param_groups:
            group["lr"] = config.audio_lr * _cosine(step, config.audio_steps, 50)
        idx = torch.randint(0, pool.audio.shape[0], (config.audio_batch,), generator=gen)
        first = torch.randint(0, frames - WINDOW_VIDEO_FRAMES + 1, (config.audio_batch,), generator=gen)
        clips = torch.stack([pool.audio[i, f * hop : f * hop + span] for i, f in zip(idx.tolist(), first.tolist())])
        gain = torch.exp(torch.empty(config.audio_batch, 1).uniform_(-1, 1, generator=gen)).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = model(normalise_audio(clips * gain)).last_hidden_state
            pred = probe(hidden).squeeze(-1).float()
        tokens = pred.shape[1]
        centre = (torch.arange(tokens, device=device) * 320 + 200) // hop
        target = torch.stack([pool.openness[i, f + centre.clamp(max=WINDOW_VIDEO_FRAMES - 1)]
                              for i, f in zip(idx.tolist(), first.tolist())])
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == config.audio_steps - 1:
            log(f"audio step {step} loss {loss.item():.4f}")
    return model.eval().requires_grad_(False)


def decode_for_training(vae, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode(z).sample` without its final clamp to [-1, 1]: a clamped output gets no gradient, so a pixel pushed
    past the range by one update could never come back. Same causal per-latent-frame loop as diffusers' _decode."""
    vae.clear_cache()
    hidden = vae.post_quant_conv(z)
    frames = []
    for i in range(hidden.shape[2]):
        vae._conv_idx = [0]
        frames.append(vae.decoder(hidden[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(frames, dim=2)


def train_vae(pool: Pool, config: TrainConfig, log, vae=None) -> torch.nn.Module:
    """From scratch, or (given `vae`) only its decoder side, so its latent space and every DiT trained on it stay."""
    device = torch.device(config.device)
    gen = torch.Generator(device="cpu").manual_seed(config.seed + 200)
    decoder_only = vae is not None
    vae = (vae if decoder_only else new_vae(config.sizes)).to(device).train()
    trained = (list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters()) if decoder_only
               else list(vae.parameters()))
    vae.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=config.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))
    size = pool.videos.shape[2]
    weight = (1 + 1.0 * box_mask(world.FACE_BOX, size, size, device)
              + 6.0 * box_mask(world.MOUTH_BOX, size, size, device)).view(1, 1, 1, size, size)
    frames = pool.videos.shape[1]
    clip = config.vae_clip_frames
    deadline = Deadline(config.vae_seconds, config.vae_steps)
    step = 0
    while not deadline.done(step):
        for group in opt.param_groups:
            group["lr"] = config.vae_lr * _cosine(int(deadline.progress(step) * 1000), 1000, 30)
        idx = torch.randint(0, pool.videos.shape[0], (config.vae_batch,), generator=gen)
        first = torch.randint(0, frames - clip + 1, (config.vae_batch,), generator=gen)
        x = to_unit(torch.stack([pool.videos[i, f : f + clip] for i, f in zip(idx.tolist(), first.tolist())]))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with torch.set_grad_enabled(not decoder_only):
                posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn_like(posterior.std)
            recon = decode_for_training(vae, z)
        rec = ((recon.float() - x).abs() * weight).mean() / weight.mean()
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1 - posterior.logvar.float()).mean()
        loss = rec + config.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        if step % 100 == 0:
            log(f"vae step {step} l1 {rec.item():.4f} kl {kl.item():.3f} ({time.perf_counter() - deadline.start:.0f} s)")
        step += 1
    log(f"vae: {step} steps, final l1 {rec.item():.4f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_pool(vae, pool: Pool, batch: int = 32) -> torch.Tensor:
    """Normalised latent mode of every whole pool video: [N, 16, L, h, w] (what the DiT denoises)."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    out = []
    for start in range(0, pool.videos.shape[0], batch):
        x = to_unit(pool.videos[start : start + batch])
        mode = vae.encode(x).latent_dist.mode()
        out.append(((mode - mean.to(mode)) / std.to(mode)).float())
    return torch.cat(out)


@torch.no_grad()
def latent_statistics(vae, pool: Pool, count: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    mus = []
    for start in range(0, min(count, pool.videos.shape[0]), 8):
        mus.append(vae.encode(to_unit(pool.videos[start : start + 8])).latent_dist.mode().float())
    mu = torch.cat(mus).transpose(0, 1).reshape(16, -1)
    return mu.mean(dim=1), mu.std(dim=1).clamp_min(1e-3)


@torch.no_grad()
def reference_conditions(vae, portraits: np.ndarray) -> torch.Tensor:
    """avatarcli.features.image.reference_condition for a batch of portraits at their own size (same math)."""
    from avatarcli.features.image import MASK_CHANNELS

    parameter = next(vae.parameters())
    b, height, width, _ = portraits.shape
    video = torch.zeros(b, 3, WINDOW_VIDEO_FRAMES, height, width, device=parameter.device)
    video[:, :, 0] = torch.from_numpy(portraits).to(parameter.device).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
    latents = vae.encode(video.to(parameter.dtype)).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
    latents = (latents - mean) / std
    mask = torch.zeros(b, MASK_CHANNELS, *latents.shape[2:]).to(latents)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latents], dim=1)


def dit_velocity(model, xt: torch.Tensor, conditions: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
                 image_tokens: torch.Tensor, features: torch.Tensor, branch_audio: list) -> torch.Tensor:
    """The DiT's velocity for a training batch, called as avatarcli.sampling.denoiser calls it at inference:
    [x_t | mask + reference latents], timestep sigma * 1000, text, CLIP tokens, wav2vec2 features per element."""
    from avatarcli.models.stableavatar import AudioConditioning

    return model(torch.cat([xt, conditions], dim=1), sigma * 1000, text, image_tokens,
                 AudioConditioning(features, branch_audio))


def train_dit(pool: Pool, latents: torch.Tensor, conditions: torch.Tensor, image_tokens: torch.Tensor,
              prompts: torch.Tensor, wav2vec, config: TrainConfig, log, model=None):
    """prompts [2, 512, text_dim]: negative, positive (as encode_prompts returns them for the pipeline)."""
    from avatarcli.sampling.schedule import shift_sigma

    device = torch.device(config.device)
    gen = torch.Generator(device="cpu").manual_seed(config.seed + 300)
    torch.manual_seed(config.seed + 301)
    model = (model if model is not None else new_transformer(config.sizes)).to(device).float().train()
    model.requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or "modulation" in name or "scale_shift" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=config.dit_lr, betas=(0.9, 0.99))
    n, _, total, h, w = latents.shape
    weight = (1 + box_mask(world.FACE_BOX, h, w, device) + 2 * box_mask(world.MOUTH_BOX, h, w, device))
    weight = (weight / weight.mean()).view(1, 1, 1, h, w)
    hop = world.SAMPLE_RATE // world.FPS
    span = WINDOW_VIDEO_FRAMES * hop
    deadline = Deadline(config.dit_seconds, config.dit_steps)
    step, losses = 0, []
    b = config.dit_batch
    while not deadline.done(step):
        for group in opt.param_groups:
            group["lr"] = config.dit_lr * _cosine(int(deadline.progress(step) * 1000), 1000, 20)
        idx = torch.randint(0, n, (b,), generator=gen)
        start = torch.randint(0, total - WINDOW + 1, (b,), generator=gen)
        x0 = torch.stack([latents[i, :, s : s + WINDOW] for i, s in zip(idx.tolist(), start.tolist())])
        clips = torch.stack([pool.audio[i, 4 * s * hop : 4 * s * hop + span]
                             for i, s in zip(idx.tolist(), start.tolist())])
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            features = wav2vec(normalise_audio(clips)).last_hidden_state.float()
        u = torch.rand(b, 3, generator=gen)
        features = features * (u[:, 0] >= 0.1).float().view(-1, 1, 1).to(device)  # zeroed wav2vec2 features
        branch_audio = [None if u[i, 1] < 0.1 else i for i in range(b)]  # adapter output dropped
        text = prompts[(u[:, 2] >= 0.1).long()].to(device)  # negative prompt 10%
        sigma = torch.tensor(shift_sigma(torch.rand(b, generator=gen).numpy(), SHIFT), dtype=torch.float32).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = dit_velocity(model, xt, conditions[idx], sigma, text, image_tokens[idx], features, branch_audio)
        loss = (((pred.float() - (noise - x0)) ** 2) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(config.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        losses.append(loss.item() if step % 10 == 0 else losses[-1] if losses else loss.item())
        if step % 200 == 0:
            log(f"dit step {step} loss {np.mean(losses[-200:]):.4f} ({time.perf_counter() - deadline.start:.0f} s)")
        step += 1
    log(f"dit: {step} steps, final loss {np.mean(losses[-200:]):.4f}")
    return ema, step


# ---------------------------------------------------------------------------------------------------- driver


def train(out_dir: str | Path, config: TrainConfig, log: Callable[[str], None] = lambda line: None) -> dict:
    """Run every stage and write the weights folder; returns a summary (steps, losses, seconds)."""
    from safetensors.torch import save_file

    from avatarcli.features.image import clip_features, reference_condition
    from avatarcli.features.text import NEGATIVE_PROMPT, encode_prompts
    from avatarcli.loading.components import load_image_encoder, load_text_encoder
    from avatarcli.testing.components import CLIP_FILE, T5_FILE, T5_TOKENIZER_FOLDER

    out = Path(out_dir)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    summary: dict = {"config": asdict(config)}

    write_fixed_components(out, config.sizes, config.seed)
    base = out / BASE
    text_encoder, tokenizer = load_text_encoder(base / T5_FILE, base / T5_TOKENIZER_FOLDER, dtype=torch.float32)
    prompts = encode_prompts(text_encoder, tokenizer, [NEGATIVE_PROMPT, PROMPT]).float()
    image_encoder = load_image_encoder(base / CLIP_FILE, device=device)

    pool = make_pool(config, log)
    init_transformer = None
    if config.init:
        from avatarcli.loading.components import load_audio_encoder, load_vae
        from avatarcli.loading.transformer import load_stableavatar_transformer

        init = Path(config.init)
        wav2vec, _ = load_audio_encoder(init / WAV2VEC, device=device)
        vae = train_vae(pool, config, log, vae=load_vae(init / BASE / "Wan2.1_VAE.pth", device=device))
        init_transformer = load_stableavatar_transformer(init, "square", dtype=torch.float32, device=device)
    else:
        wav2vec = train_audio_encoder(pool, config, log)
        vae = train_vae(pool, config, log)
        mean, std = latent_statistics(vae, pool)
        fold_latent_statistics(vae, mean, std)
    save_wav2vec(wav2vec, out / WAV2VEC)
    save_file(export_vae(vae, config.sizes), str(base / "Wan2.1_VAE.safetensors"))
    latents = encode_pool(vae, pool)
    summary["latent_mean_abs"] = float(latents.mean(dim=(0, 2, 3, 4)).abs().max())
    summary["latent_std"] = [round(float(v), 3) for v in latents.std(dim=(0, 2, 3, 4))]
    log(f"latents {tuple(latents.shape)}, per-channel std {summary['latent_std']}")

    from PIL import Image

    conditions, tokens = [], []
    with torch.no_grad():
        for face in pool.portraits:
            tokens.append(clip_features(image_encoder, Image.fromarray(face), face.shape[1], face.shape[0]).float())
        for start in range(0, len(pool.portraits), 64):
            conditions.append(reference_conditions(vae, pool.portraits[start : start + 64]))
    conditions, tokens = torch.cat(conditions).float(), torch.cat(tokens)
    first = Image.fromarray(pool.portraits[0])
    check = reference_condition(vae, first, first.width, first.height, WINDOW_VIDEO_FRAMES).float()
    summary["condition_batch_error"] = float((check - conditions[:1]).abs().max())

    ema, steps = train_dit(pool, latents, conditions, tokens, prompts, wav2vec, config, log, init_transformer)
    avatar = out / AVATAR
    avatar.mkdir(parents=True, exist_ok=True)
    save_file(export_transformer(ema, config.sizes), str(avatar / "transformer3d-square.safetensors"))
    summary.update(dit_steps=steps, seconds=round(time.perf_counter() - started, 1))
    return summary


def verify(folder: str | Path) -> None:
    """Load the written folder through the real loaders (strict) and run one tiny forward."""
    from avatarcli.loading.stableavatar import load_stableavatar

    load_stableavatar(Path(folder), "square", "cpu", torch.float32)


def with_overrides(config: TrainConfig, **values) -> TrainConfig:
    return replace(config, **{k: v for k, v in values.items() if v is not None})
