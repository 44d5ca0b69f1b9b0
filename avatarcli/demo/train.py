"""Train the demo model on the synthetic world (world.py) and write it in the published StableAvatar folder layout.

Stages, all reproducible from one seed, data generated on the fly from the world:
  1. fixed   tiny umT5 (+ tokenizer) and CLIP ViT with fixed random weights: they carry no information here, the DiT
             learns to rely on the reference latents and the audio (as the published layout needs them, they exist).
  2. data    a pool of identities, each speaking its own synthetic speech with blinks and sway (rendered in worker
             processes); windows are cut from it at random.
  3. audio   a small wav2vec2 (transformers' Wav2Vec2Model) trained to predict the mouth openness from the audio of
             one window, normalised per window exactly as the feature extractor does at inference; then frozen.
  4. vae     a small diffusers AutoencoderKLWan (the Wan 2.1 block layout at a narrow base width), trained in the
             regime inference runs it: encoder and decoder are causal, carry feature caches from chunk to chunk and
             run over whole videos (encode_pool) and one continuous decode stream (avatarcli.decode.stream). Their
             receptive field spans far more than a short clip, so training streams each batch of clips (episodes of
             vae_episode_latents latent frames, ~11 s) through both with the caches carried from step to step;
             every step encodes and decodes the next vae_grad_latents latent frames with gradients, then detaches
             the caches (truncated backprop through time: every position of the stream is trained, from the first
             frame to ~285 frames in, at the cost of the frames with gradients alone). Loss on those frames: L1 of
             the unclamped decode, weighted up on the mouth, plus a small KL. A per-frame round-trip error of 81-
             and 301-frame videos of a held-out face is logged (stability over long videos). Its latent statistics
             are then folded into its 1x1x1 quant / post-quant convolutions, so the Wan 2.1 latents_mean/std that
             every Wan VAE is loaded with normalise its latents to zero mean and unit variance, and the inference
             path is unchanged.
  5. dit     a small StableAvatarTransformer3DModel: flow matching (x_t = (1-s) x0 + s eps, target eps - x0) with s
             drawn like the sampling grid (uniform, then shifted by 5), on windows of 21 latent frames cut from whole
             encoded videos, with the reference condition and CLIP tokens computed by the inference code. Each
             element's conditioning is drawn from a table of the branches guidance runs (_branch_table: full 60%,
             cfg's negative+audio and negative+no adapter, ang's silent features and no adapter, 10% each). Loss
             weighted up on the face and more on the mouth (dit_mouth_weight), the audio path learns faster
             (dit_audio_lr_scale). EMA weights are exported; a condition check (x0 error with right, swapped, zeroed
             or dropped inputs on a held-out face) is logged.

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
AUDIO_MODULES = ("vocal_projector", "k_vocal", "v_vocal")  # parameter names of the StableAvatar audio path
HELD_OUT = 7  # identity seed of the stability / conditioning checks (pool identities start at 1_000_000)
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
    vae_episode_latents: int = 72  # streaming regime: clips of 72 latent frames (285 video frames) streamed through
    vae_grad_latents: int = 3  # encoder and decoder with caches carried, 3 latent frames (12 video frames) a step
    vae_lr: float = 5e-4
    vae_kl: float = 1e-4
    vae_seconds: float = 360.0
    vae_dark_weight: float = 30.0  # extra loss weight on the open mouth's dark interior (a few % of the mouth box)
    vae_check_frames: tuple[int, ...] = (81, 301)  # round-trip lengths logged after VAE training (stability)
    dit_steps: int = 100000
    dit_batch: int = 96
    dit_lr: float = 4e-4
    dit_seconds: float = 420.0
    dit_mouth_weight: float = 6.0  # loss weight 1 + face + this * mouth box (normalised to mean 1): the audio's area
    dit_audio_lr_scale: float = 3.0  # learning-rate multiplier of the audio path (AUDIO_MODULES)
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
                   audio_steps=2, audio_batch=2, vae_steps=2, vae_batch=1, vae_episode_latents=4, vae_grad_latents=2,
                   vae_check_frames=(9,), dit_steps=2,
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


class CausalStream:
    """The causal feature caches of one video batch streamed through the VAE, kept across calls.

    What diffusers' AutoencoderKLWan keeps in `_enc_feat_map` / `_feat_map` during ONE encode / decode call, held
    here so a video can be encoded and decoded in pieces: the first video frame is one encoder chunk, every later 4
    frames one more (one latent frame each); the decoder takes one latent frame at a time (`first_chunk` on the first
    of the video). Pieces encoded or decoded through one stream equal one `vae.encode` / `vae.decode` of the whole
    (decode: before its final clamp), and decoding equals avatarcli.decode.stream.StreamingDecoder."""

    def __init__(self, vae):
        self.vae = vae
        self.encoder_cache: list = [None] * vae._cached_conv_counts["encoder"]
        self.decoder_cache: list = [None] * vae._cached_conv_counts["decoder"]
        self.frames_in = 0  # video frames encoded so far
        self.latents_out = 0  # latent frames decoded so far

    def detach(self) -> None:
        """Cut the graph at the caches (truncated backprop: later pieces get no gradient into earlier ones)."""
        self.encoder_cache = [c.detach() if isinstance(c, torch.Tensor) else c for c in self.encoder_cache]
        self.decoder_cache = [c.detach() if isinstance(c, torch.Tensor) else c for c in self.decoder_cache]

    def encode(self, x: torch.Tensor):
        """The next video frames [B, 3, F, H, W] -> DiagonalGaussianDistribution of their latent frames."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        first = 1 if self.frames_in == 0 else 0
        if x.shape[2] == 0 or (x.shape[2] - first) % 4:
            raise ValueError(f"{x.shape[2]} frames after {self.frames_in} do not fill whole 4-frame chunks")
        bounds = ([0, 1] if first else [0]) + list(range(first + 4, x.shape[2] + 1, 4))
        out = [self.vae.encoder(x[:, :, a:b], feat_cache=self.encoder_cache, feat_idx=[0])
               for a, b in zip(bounds[:-1], bounds[1:])]
        self.frames_in += x.shape[2]
        return DiagonalGaussianDistribution(self.vae.quant_conv(torch.cat(out, dim=2)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The next latent frames [B, 16, n, h, w] (unnormalised) -> video frames, NOT clamped to [-1, 1]."""
        hidden = self.vae.post_quant_conv(z)  # 1x1x1: per chunk as StreamingDecoder runs it
        frames = []
        for i in range(hidden.shape[2]):
            frames.append(self.vae.decoder(hidden[:, :, i : i + 1], feat_cache=self.decoder_cache, feat_idx=[0],
                                           first_chunk=self.latents_out == 0))
            self.latents_out += 1
        return torch.cat(frames, dim=2)


def decode_for_training(vae, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode(z).sample` without its final clamp to [-1, 1]: a clamped output gets no gradient, so a pixel pushed
    past the range by one update could never come back. Same causal per-latent-frame loop as diffusers' _decode."""
    return CausalStream(vae).decode(z)


def video_frames(latent_frames: int) -> int:
    """Video frames of the first `latent_frames` latent frames of a video (1, then 4 each)."""
    return 0 if latent_frames == 0 else 4 * (latent_frames - 1) + 1


def vae_piece(stream: CausalStream, x: torch.Tensor, train_encoder: bool, sample: bool = True):
    """The next frames x [B, 3, F, H, W] of the streamed clips through encoder and decoder, caches carried on:
    (unclamped reconstruction, posterior). Latents are drawn from the posterior (its mode if not `sample`)."""
    with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
        posterior = stream.encode(x)
    z = posterior.mean + posterior.std * torch.randn_like(posterior.std) if sample else posterior.mode()
    return stream.decode(z), posterior


def dark_pixels(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, F, H, W] mask of the pixels of unit-range RGB x [B, 3, F, H, W] at most world.DARK_LUMA dark."""
    luma = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return (luma <= world.DARK_LUMA / 127.5 - 1).float()


@torch.no_grad()
def round_trip(vae, video_uint8: torch.Tensor) -> torch.Tensor:
    """Encode (mode) + decode of one whole video [F, H, W, 3] uint8 as one causal stream, as inference sees the VAE
    (encode_pool encodes whole videos, the sampler decodes one long stream): float [1, 3, F, H, W] in unit range."""
    x = to_unit(video_uint8[None]).to(next(vae.parameters()).device)
    return vae.decode(vae.encode(x).latent_dist.mode()).sample.float()


def round_trip_error(vae, video_uint8: torch.Tensor, every: int = 16) -> list[float]:
    """Per-frame MAE (0-255) of round_trip, every `every` frames."""
    x = to_unit(video_uint8[None]).to(next(vae.parameters()).device)
    frames = ((round_trip(vae, video_uint8) - x).abs() * 127.5).mean(dim=(0, 1, 3, 4))
    return [round(float(v), 1) for v in frames[::every]]


def round_trip_mouth(vae, video_uint8: torch.Tensor) -> tuple[float, float, float]:
    """Mouth openness (world.dark_fraction) through round_trip: (mean of the original, mean of the round trip,
    their correlation over frames); a decoder that cannot draw an open mouth gives a round-trip mean of 0."""
    from avatarcli.decode.stream import video_to_uint8

    truth = world.dark_fraction(video_uint8.numpy())
    got = world.dark_fraction(video_to_uint8(round_trip(vae, video_uint8)))
    corr = float(np.corrcoef(truth, got)[0, 1]) if got.std() > 0 and truth.std() > 0 else float("nan")
    return float(truth.mean()), float(got.mean()), corr


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
    mouth = box_mask(world.MOUTH_BOX, size, size, device).view(1, 1, 1, size, size)
    frames = pool.videos.shape[1]
    grad, episode = config.vae_grad_latents, config.vae_episode_latents
    if episode > config.clip_latents:
        raise ValueError(f"vae_episode_latents {episode} > clip_latents {config.clip_latents}")
    deadline = Deadline(config.vae_seconds, config.vae_steps)
    step, pos = 0, episode
    while not deadline.done(step):
        for group in opt.param_groups:
            group["lr"] = config.vae_lr * _cosine(int(deadline.progress(step) * 1000), 1000, 30)
        if pos >= episode:  # new episode: other clips, streamed from their first frame with empty caches
            idx = torch.randint(0, pool.videos.shape[0], (config.vae_batch,), generator=gen)
            first = torch.randint(0, frames - video_frames(episode) + 1, (config.vae_batch,), generator=gen)
            clips = torch.stack([pool.videos[i, f : f + video_frames(episode)]
                                 for i, f in zip(idx.tolist(), first.tolist())])
            stream, pos = CausalStream(vae), 0
        n = min(grad, episode - pos)
        x = to_unit(clips[:, video_frames(pos) : video_frames(pos + n)])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            recon, posterior = vae_piece(stream, x, train_encoder=not decoder_only)
        # The open mouth's dark interior is what lip sync is read from, and only ~1% of the pixels: weighed up, or the
        # decoder learns to draw a closed mouth whatever the latent says.
        pixel = weight + config.vae_dark_weight * mouth * dark_pixels(x)
        rec = ((recon.float() - x).abs() * pixel).mean() / weight.mean()
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1 - posterior.logvar.float()).mean()
        loss = rec + config.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        stream.detach()  # truncated backprop: the next piece starts from these caches as constants
        if step % 100 == 0:
            log(f"vae step {step} l1 {rec.item():.4f} kl {kl.item():.3f} at latent frame {pos} "
                f"({time.perf_counter() - deadline.start:.0f} s)")
        pos += n
        step += 1
    log(f"vae: {step} steps, final l1 {rec.item():.4f}")
    vae.eval()
    held_out = torch.from_numpy(_render_one((HELD_OUT, max(config.vae_check_frames), size))[0])  # not in the pool
    for length in config.vae_check_frames:
        log(f"vae round trip, {length} frames, MAE (0-255) every 16 frames: "
            f"{round_trip_error(vae, held_out[:length])}")
    truth, got, corr = round_trip_mouth(vae, held_out)
    log(f"vae round trip, mouth openness: mean {truth:.3f} original, {got:.3f} round trip, correlation {corr:.2f}")
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


def _branch_table():
    from avatarcli.sampling.guidance import Branch

    # What one DiT training element is conditioned on, drawn per element from this table: every branch a guidance
    # mode runs at inference (avatarcli.sampling.guidance) is trained on directly, with its own rate, rather than
    # arising from independent dropouts (which gave cfg's b0 ~1% of the batch).
    return (
        (Branch("positive", "real"), 0.6),  # full conditioning: guidance none, cfg b2, ang b0
        (Branch("negative", "real"), 0.1),  # cfg b1: negative prompt, audio
        (Branch("negative", "none"), 0.1),  # cfg b0: negative prompt, adapter output dropped
        (Branch("positive", "silent"), 0.1),  # ang b1: wav2vec2 features zeroed before the adapter
        (Branch("positive", "none"), 0.1),  # ang b2: adapter output dropped
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
    opt = torch.optim.AdamW(dit_param_groups(model, config.dit_audio_lr_scale), lr=config.dit_lr, betas=(0.9, 0.99))
    n, _, total, h, w = latents.shape
    mouth = box_mask(world.MOUTH_BOX, h, w, device)
    weight = 1 + box_mask(world.FACE_BOX, h, w, device) + config.dit_mouth_weight * mouth
    weight = (weight / weight.mean()).view(1, 1, 1, h, w)
    hop = world.SAMPLE_RATE // world.FPS
    span = WINDOW_VIDEO_FRAMES * hop
    deadline = Deadline(config.dit_seconds, config.dit_steps)
    step, losses = 0, []
    b = config.dit_batch
    while not deadline.done(step):
        for group in opt.param_groups:
            group["lr"] = config.dit_lr * group["scale"] * _cosine(int(deadline.progress(step) * 1000), 1000, 20)
        idx = torch.randint(0, n, (b,), generator=gen)
        start = torch.randint(0, total - WINDOW + 1, (b,), generator=gen)
        x0 = torch.stack([latents[i, :, s : s + WINDOW] for i, s in zip(idx.tolist(), start.tolist())])
        clips = torch.stack([pool.audio[i, 4 * s * hop : 4 * s * hop + span]
                             for i, s in zip(idx.tolist(), start.tolist())])
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            features = wav2vec(normalise_audio(clips)).last_hidden_state.float()
        features, branch_audio, text = branch_inputs(draw_branches(b, gen), features, prompts)
        text = text.to(device)
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


@torch.no_grad()
def condition_check(model, vae, wav2vec, image_encoder, prompts: torch.Tensor, size: int,
                    sigmas: tuple[float, ...] = (1.0, 0.9)) -> dict[float, dict[str, tuple[float, float]]]:
    """Does the DiT use its conditions? x0 error (whole frame, mouth box) of one window of a held-out identity, from
    the same noise at each sigma, with the right inputs and with one input swapped for another held-out identity's
    (portrait, audio), zeroed (wav2vec2 features) or dropped (adapter output). Equal errors: the input is ignored."""
    from PIL import Image

    from avatarcli.features.image import clip_features

    device = next(model.parameters()).device

    def inputs(seed: int):
        video, samples, portrait, _ = _render_one((seed, WINDOW_VIDEO_FRAMES, size))
        portrait = np.array(portrait)  # writable (PIL arrays are not)
        pool = Pool(torch.from_numpy(video[None]).to(device), None, portrait[None], None)
        x0 = encode_pool(vae, pool).to(device)
        tokens = clip_features(image_encoder, Image.fromarray(portrait), size, size).float().to(device)
        clip = torch.from_numpy(samples[None, : WINDOW_VIDEO_FRAMES * world.SAMPLE_RATE // world.FPS]).to(device)
        features = wav2vec(normalise_audio(clip)).last_hidden_state.float()
        return x0, reference_conditions(vae, portrait[None]).float().to(device), tokens, features

    x0, cond, tokens, features = inputs(HELD_OUT)
    _, other_cond, other_tokens, other_features = inputs(HELD_OUT + 1)
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
    check = condition_check(ema, vae, wav2vec, image_encoder, prompts, config.size)
    for sigma, errors in check.items():
        log(f"dit x0 error at sigma {sigma} (frame / mouth box): "
            + "  ".join(f"{name} {a:.4f} / {m:.4f}" for name, (a, m) in errors.items()))
    summary["condition_check"] = {str(sigma): errors for sigma, errors in check.items()}
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
