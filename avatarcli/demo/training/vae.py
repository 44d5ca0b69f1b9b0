"""The VAE stage: a small diffusers AutoencoderKLWan (the Wan 2.1 block layout at base_dim config.sizes.vae_base).

It trains in the regime inference runs it: encoder and decoder are causal, carry feature caches from chunk to chunk
and run over whole videos (latents.encode_pool) and one continuous decode stream (avatarcli.decode.stream). Their
receptive field spans far more than a short clip, so training streams each batch of clips (episodes of
vae_episode_latents latent frames, ~11 s) through both with the caches carried from step to step (vae_stream.py):
every step encodes and decodes the next vae_grad_latents latent frames with gradients, then detaches the caches
(truncated backprop through time: every position of the stream is trained, from the first frame to ~285 frames in, at
the cost of the frames with gradients alone).

Why the earlier weights lost the eyes, brows, hair, shirt and background gradient (round trip 15-17 dB PSNR on
unseen faces, a beige face on grey-blue; only the mouth survived):

* The KL weight. At vae_kl 1e-4 against a mean L1 of a few hundredths, the posterior collapsed: its standard
  deviation came out at 0.4-2.8 times the spread of the latent means, channel by channel. The decoder trains on
  latents drawn from the posterior, so it learnt that a latent says about one bit per element and drew the world's
  average person; only the mouth, weighted up 8-38x, kept its own information. The encoder's mode latents, which the
  DiT learns, still move with the picture, but the decoder had learnt to ignore what they say. Now vae_kl is 1e-7: the
  posterior's noise is a few % of the latents' spread (logged as "posterior noise / spread"), enough to keep the
  latent space smooth and the decoder tolerant of the DiT's small errors.
* The loss. L1 weighted 1 + face + 6 x mouth + 30 x dark interior spent half of its weight on the mouth box (6% of
  the pixels). Now the whole frame counts alike (L1 + vae_mse x squared error, the quantity PSNR measures), the mouth
  box at 1 + vae_mouth_weight and the open mouth's dark interior vae_dark_weight more: what lip sync is read from,
  about 1% of the pixels, or the decoder draws a closed mouth whatever the latent says.
* Capacity: base_dim 12 gave 12 channels at 128 px; now 20 (config.py says why not more).

A per-frame round-trip error of 81- and 301-frame videos of a held-out face is logged (stability over long videos),
with the whole video's PSNR, and how well the round trip keeps the mouth's opening. Given a trained VAE (--init),
only its decoder side trains, so its latent space stays.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from avatarcli.demo import world
from avatarcli.demo.training.config import HELD_OUT, DemoSizes, TrainConfig
from avatarcli.demo.training.data import Pool, box_mask, render_identity, to_unit, video_clips
from avatarcli.demo.training.schedule import Deadline, cosine
from avatarcli.demo.training.vae_stream import CausalStream, vae_piece, video_frames


# Initial log-variance of the posterior (quant_conv's log-variance bias): a standard deviation of 0.02, against
# latent means that spread by ~0.1-1 from the start. At the default 0 (std 1) the noise buries the means at first,
# and a small KL leaves the reconstruction loss alone to pull it down, which takes far longer than the stage has.
INITIAL_LOGVAR = -8.0


def new_vae(sizes: DemoSizes, per_frame: bool = True):
    """A new VAE at sizes.vae_base with a quiet posterior (INITIAL_LOGVAR), started per-frame (per_frame_start)
    unless not `per_frame` (every tap random, as diffusers initialises it)."""
    from diffusers import AutoencoderKLWan

    from avatarcli.loading.components import WAN21_VAE

    vae = AutoencoderKLWan(**dict(WAN21_VAE, base_dim=sizes.vae_base))
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.z_dim :] = INITIAL_LOGVAR
    if per_frame:
        per_frame_start(vae)
    return vae


@torch.no_grad()
def per_frame_start(vae) -> None:
    """Start a new VAE as a per-frame one, so what stills teach it holds on video from the first streamed step.

    A still (a stream's first frame) reaches only the current-frame tap of every causal 3x3x3 convolution (the two
    past frames are zero padding) and none of the temporal resampling convolutions. Left at their random values, those
    taps and convolutions would garble every later frame, and the streamed phase would first have to unlearn them.
    Here the past taps start at zero (the current one scaled to keep the output's spread), the encoder's temporal
    downsampling keeps the centre frame of its stride-2 window (a latent frame is then the still encoding of the
    first frame of its 4), and the decoder's temporal upsampling copies each frame to both of its outputs (the 4
    frames of a latent frame are its still decode). The streamed phase trains all of them from there."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    time_convs = {}
    for module in vae.modules():
        if isinstance(module, WanResample) and hasattr(module, "time_conv"):
            time_convs[module.time_conv] = module.mode
    for module in vae.modules():
        if not isinstance(module, WanCausalConv3d) or module.kernel_size[0] == 1:
            continue
        if module in time_convs:
            weight = module.weight  # [out, in, 3, 1, 1]
            eye = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
            weight.zero_()
            module.bias.zero_()
            if time_convs[module] == "downsample3d":
                weight[:, :, 1, 0, 0] = eye
            else:  # upsample3d: out channels [0, dim) are the first output frame, [dim, 2 dim) the second
                weight[:, :, 2, 0, 0] = torch.cat([eye, eye])
        else:  # the current tap scaled up by sqrt(3): the output keeps the default initialisation's spread
            module.weight[:, :, :-1] = 0
            module.weight[:, :, -1] *= module.kernel_size[0] ** 0.5


@contextmanager
def still_convolutions() -> Iterator[None]:
    """While active, a causal convolution over one frame with nothing cached (a still) runs as the 2D convolution of
    its current-frame tap: what the 3D convolution over the frame and its two zero-padded past frames computes, at a
    third of the work and on 2D kernels. Training-time only (it patches diffusers' WanCausalConv3d.forward)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    original = WanCausalConv3d.forward

    def forward(self, x, cache_x=None):
        causal = self._padding[4] == self.kernel_size[0] - 1 and self.stride[0] == 1
        if cache_x is None and x.shape[2] == 1 and causal:
            out = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, stride=self.stride[1:],
                           padding=(self._padding[2], self._padding[0]))
            return out.unsqueeze(2)
        return original(self, x, cache_x)

    WanCausalConv3d.forward = forward
    try:
        yield
    finally:
        WanCausalConv3d.forward = original


def dark_pixels(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, F, H, W] mask of the pixels of unit-range RGB x [B, 3, F, H, W] at most world.DARK_LUMA dark."""
    luma = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return (luma <= world.DARK_LUMA / 127.5 - 1).float()


def weights_memory_format(vae, memory_format: torch.memory_format) -> None:
    """Every 5D weight of `vae` in `memory_format`. On a GPU the training steps run with the 3D convolutions' weights
    channels-last (cuDNN's faster kernels for these small channel counts: 1.5x a streamed step at batch 12 on an
    H100, bench_train_step.py); they are made contiguous again before anything else sees the VAE."""
    for p in vae.parameters():
        if p.ndim == 5:
            p.data = p.data.contiguous(memory_format=memory_format)


def trained_parameters(vae, decoder_only: bool) -> list[torch.nn.Parameter]:
    """The parameters the stage trains (all, or the decoder side only); every other one is frozen."""
    trained = (list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters()) if decoder_only
               else list(vae.parameters()))
    vae.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    return trained


def loss_weights(size: int, config: TrainConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pixel weight 1 + vae_mouth_weight x mouth box, mouth box), both [1, 1, 1, size, size]: the whole frame
    counts, the mouth box a little more (its dark interior is weighed up on top, per frame, in piece_losses)."""
    mouth = box_mask(world.MOUTH_BOX, size, size, device).view(1, 1, 1, size, size)
    return 1 + config.vae_mouth_weight * mouth, mouth


def piece_losses(stream: CausalStream, x: torch.Tensor, weight: torch.Tensor, mouth: torch.Tensor,
                 config: TrainConfig, train_encoder: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted L1 + vae_mse x squared error of the reconstruction, KL of the posterior, MSE of the frames) of the
    next piece x of the stream."""
    device = x.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        recon, posterior = vae_piece(stream, x, train_encoder=train_encoder)
    # The open mouth's dark interior is what lip sync is read from, and only ~1% of the pixels: weighed up, or the
    # decoder learns to draw a closed mouth whatever the latent says.
    pixel = weight + config.vae_dark_weight * mouth * dark_pixels(x)
    err = recon.float() - x
    rec = ((err.abs() + config.vae_mse * err**2) * pixel).mean() / weight.mean()
    kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1 - posterior.logvar.float()).mean()
    return rec, kl, (err.detach().clamp(-2, 2) ** 2).mean()


def psnr(mse: float) -> float:
    """PSNR in dB of a mean squared error of unit-range ([-1, 1]) pixels."""
    return float(10 * np.log10(4.0 / max(mse, 1e-12)))


def stream_episodes(vae, opt, trained: list, pool: Pool, config: TrainConfig, gen: torch.Generator,
                    decoder_only: bool, log, seconds: float | None = None) -> tuple[int, torch.Tensor]:
    """The training loop: episodes of clips streamed piece by piece until the step / time budget (`seconds`, else
    config.vae_seconds) is spent. Returns (steps, loss of the last step)."""
    device = torch.device(config.device)
    size = pool.videos.shape[2]
    weight, mouth = loss_weights(size, config, device)
    grad, episode = config.vae_grad_latents, config.vae_episode_latents
    deadline = Deadline(config.vae_seconds if seconds is None else seconds, config.vae_steps)
    step, pos, mses = 0, episode, []
    while not deadline.done(step):
        for group in opt.param_groups:
            group["lr"] = config.vae_lr * cosine(int(deadline.progress(step) * 1000), 1000, 30)
        if pos >= episode:  # new episode: other clips, streamed from their first frame with empty caches
            clips = video_clips(pool, config.vae_batch, video_frames(episode), gen)
            stream, pos = CausalStream(vae), 0
        n = min(grad, episode - pos)
        x = to_unit(clips[:, video_frames(pos) : video_frames(pos + n)])
        rec, kl, mse = piece_losses(stream, x, weight, mouth, config, train_encoder=not decoder_only)
        loss = rec + config.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        stream.detach()  # truncated backprop: the next piece starts from these caches as constants
        mses.append(mse)
        if step % 100 == 0:
            log(f"vae step {step} loss {rec.item():.4f} kl {kl.item():.3f} psnr {psnr(float(torch.stack(mses).mean())):.1f} dB "
                f"at latent frame {pos} ({time.perf_counter() - deadline.start:.0f} s)")
            mses = []
        pos += n
        step += 1
    return step, rec


def train_stills(vae, opt, trained: list, pool: Pool, config: TrainConfig, gen: torch.Generator, log,
                 seconds: float) -> int:
    """The first phase: single frames (each the first frame of a stream of its own, so encoded and decoded as a
    still, the way the first latent frame of every video is) at batch vae_still_batch and learning rate
    vae_still_lr, for `seconds`. Stills train the spatial path of every layer at a small cost per sample (2D
    convolutions, still_convolutions): in 75 s on an H100 they reach 23.1 dB on a held-out face's stills where
    streamed clips reach 17.3 (vae_recipe_sweep.py, before the 2D path); a new VAE starts per-frame
    (per_frame_start), so what they learn carries over to video, and the streamed phase after them trains the
    temporal path.
    Returns the steps."""
    device = torch.device(config.device)
    size = pool.videos.shape[2]
    weight, mouth = loss_weights(size, config, device)
    deadline = Deadline(seconds, config.vae_steps)
    step, mses = 0, []
    while not deadline.done(step):
        for group in opt.param_groups:
            group["lr"] = config.vae_still_lr * cosine(int(deadline.progress(step) * 1000), 1000, 30)
        x = to_unit(video_clips(pool, config.vae_still_batch, 1, gen))
        with still_convolutions():
            rec, kl, mse = piece_losses(CausalStream(vae), x, weight, mouth, config, train_encoder=True)
        opt.zero_grad(set_to_none=True)
        (rec + config.vae_kl * kl).backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        mses.append(mse)
        if step % 100 == 0:
            log(f"vae stills step {step} loss {rec.item():.4f} psnr {psnr(float(torch.stack(mses).mean())):.1f} dB")
            mses = []
        step += 1
    log(f"vae stills: {step} steps")
    return step


def train_vae(pool: Pool, config: TrainConfig, log, vae=None, seconds: float | None = None) -> torch.nn.Module:
    """From scratch (a share vae_still_share of the time on stills, then streamed clips), or (given `vae`) only its
    decoder side on streamed clips, so its latent space and every DiT trained on it stay.
    `seconds`: the stage's time budget (default config.vae_seconds)."""
    device = torch.device(config.device)
    gen = torch.Generator(device="cpu").manual_seed(config.seed + 200)
    decoder_only = vae is not None
    vae = (vae if decoder_only else new_vae(config.sizes, config.vae_per_frame_start)).to(device).train()
    if device.type == "cuda":
        weights_memory_format(vae, torch.channels_last_3d)
    trained = trained_parameters(vae, decoder_only)
    opt = torch.optim.AdamW(trained, lr=config.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))
    if config.vae_episode_latents > config.clip_latents:
        raise ValueError(f"vae_episode_latents {config.vae_episode_latents} > clip_latents {config.clip_latents}")
    seconds = config.vae_seconds if seconds is None else seconds
    stills = 0.0 if decoder_only else seconds * config.vae_still_share
    if stills > 0:
        train_stills(vae, opt, trained, pool, config, gen, log, stills)
    steps, rec = stream_episodes(vae, opt, trained, pool, config, gen, decoder_only, log, seconds - stills)
    log(f"vae: {steps} steps, final loss {rec.item():.4f}")
    weights_memory_format(vae, torch.contiguous_format)
    return vae.eval().requires_grad_(False)


def log_round_trips(vae, lengths: tuple[int, ...], size: int, log) -> dict:
    """Round-trip error over videos of each length, PSNR, the posterior's noise and the mouth opening's round trip,
    of a held-out identity; returns the numbers for the run's summary."""
    held_out = torch.from_numpy(render_identity((HELD_OUT, max(lengths), size))[0])  # not in the pool
    for length in lengths:
        log(f"vae round trip, {length} frames, MAE (0-255) every 16 frames: "
            f"{round_trip_error(vae, held_out[:length])}")
    whole, first = round_trip_psnr(vae, held_out)
    noise = posterior_noise(vae, held_out[: min(len(held_out), 81)])
    log(f"vae round trip, {len(held_out)} frames: PSNR {whole:.2f} dB (first frame {first:.2f} dB); posterior noise / "
        f"spread of the latent means per channel: median {float(noise.median()):.3f}, max {float(noise.max()):.3f}")
    truth, got, corr = round_trip_mouth(vae, held_out)
    log(f"vae round trip, mouth openness: mean {truth:.3f} original, {got:.3f} round trip, correlation {corr:.2f}")
    return dict(vae_psnr=round(whole, 2), vae_psnr_first_frame=round(first, 2),
                vae_posterior_noise=round(float(noise.median()), 4), vae_mouth_correlation=round(corr, 3))


@torch.no_grad()
def posterior_noise(vae, video_uint8: torch.Tensor) -> torch.Tensor:
    """Per latent channel: the posterior's mean standard deviation over the spread (std) of its means, on one video.
    Near 1 the latents carry about one bit per element to a decoder trained on samples (a collapsed posterior)."""
    x = to_unit(video_uint8[None]).to(next(vae.parameters()).device)
    dist = vae.encode(x).latent_dist
    return (dist.std.float().mean(dim=(0, 2, 3, 4)) / dist.mean.float().std(dim=(0, 2, 3, 4)).clamp_min(1e-8)).cpu()


def round_trip_psnr(vae, video_uint8: torch.Tensor) -> tuple[float, float]:
    """PSNR (dB) of the uint8 round trip (as `avatarcli eval` reads a written video) over the whole video and over its
    first frame (decoded alone from the first latent frame)."""
    from avatarcli.decode.stream import video_to_uint8

    got = video_to_uint8(round_trip(vae, video_uint8)).astype(np.float64)
    truth = video_uint8.numpy()[: len(got)].astype(np.float64)
    err = (got - truth) ** 2
    return float(10 * np.log10(255**2 / max(err.mean(), 1e-12))), float(10 * np.log10(255**2 / max(err[0].mean(), 1e-12)))


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
