"""The VAE stage: a small diffusers AutoencoderKLWan (the Wan 2.1 block layout at a narrow base width).

It trains in the regime inference runs it: encoder and decoder are causal, carry feature caches from chunk to chunk
and run over whole videos (latents.encode_pool) and one continuous decode stream (avatarcli.decode.stream). Their
receptive field spans far more than a short clip, so training streams each batch of clips (episodes of
vae_episode_latents latent frames, ~11 s) through both with the caches carried from step to step (vae_stream.py):
every step encodes and decodes the next vae_grad_latents latent frames with gradients, then detaches the caches
(truncated backprop through time: every position of the stream is trained, from the first frame to ~285 frames in, at
the cost of the frames with gradients alone).

Loss on those frames: L1 of the unclamped decode, weighted up on the face, more on the mouth and most on the open
mouth's dark interior (vae_dark_weight), plus a small KL (vae_kl). A per-frame round-trip error of 81- and 301-frame
videos of a held-out face is logged (stability over long videos), and how well the round trip keeps the mouth's
opening. Given a trained VAE (--init), only its decoder side trains, so its latent space stays.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from avatarcli.demo import world
from avatarcli.demo.training.config import HELD_OUT, DemoSizes, TrainConfig
from avatarcli.demo.training.data import Pool, box_mask, render_identity, to_unit, video_clips
from avatarcli.demo.training.schedule import Deadline, cosine
from avatarcli.demo.training.vae_stream import CausalStream, vae_piece, video_frames


def new_vae(sizes: DemoSizes):
    from diffusers import AutoencoderKLWan

    from avatarcli.loading.components import WAN21_VAE

    return AutoencoderKLWan(**dict(WAN21_VAE, base_dim=sizes.vae_base))


def dark_pixels(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, F, H, W] mask of the pixels of unit-range RGB x [B, 3, F, H, W] at most world.DARK_LUMA dark."""
    luma = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return (luma <= world.DARK_LUMA / 127.5 - 1).float()


def trained_parameters(vae, decoder_only: bool) -> list[torch.nn.Parameter]:
    """The parameters the stage trains (all, or the decoder side only); every other one is frozen."""
    trained = (list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters()) if decoder_only
               else list(vae.parameters()))
    vae.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    return trained


def piece_losses(stream: CausalStream, x: torch.Tensor, weight: torch.Tensor, mouth: torch.Tensor,
                 config: TrainConfig, train_encoder: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted L1 of the reconstruction, KL of the posterior) of the next piece x of the stream."""
    device = x.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        recon, posterior = vae_piece(stream, x, train_encoder=train_encoder)
    # The open mouth's dark interior is what lip sync is read from, and only ~1% of the pixels: weighed up, or the
    # decoder learns to draw a closed mouth whatever the latent says.
    pixel = weight + config.vae_dark_weight * mouth * dark_pixels(x)
    rec = ((recon.float() - x).abs() * pixel).mean() / weight.mean()
    kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1 - posterior.logvar.float()).mean()
    return rec, kl


def stream_episodes(vae, opt, trained: list, pool: Pool, config: TrainConfig, gen: torch.Generator,
                    decoder_only: bool, log) -> tuple[int, torch.Tensor]:
    """The training loop: episodes of clips streamed piece by piece until the step / time budget is spent.
    Returns (steps, L1 of the last step)."""
    device = torch.device(config.device)
    size = pool.videos.shape[2]
    weight = (1 + 1.0 * box_mask(world.FACE_BOX, size, size, device)
              + 6.0 * box_mask(world.MOUTH_BOX, size, size, device)).view(1, 1, 1, size, size)
    mouth = box_mask(world.MOUTH_BOX, size, size, device).view(1, 1, 1, size, size)
    grad, episode = config.vae_grad_latents, config.vae_episode_latents
    deadline = Deadline(config.vae_seconds, config.vae_steps)
    step, pos = 0, episode
    while not deadline.done(step):
        for group in opt.param_groups:
            group["lr"] = config.vae_lr * cosine(int(deadline.progress(step) * 1000), 1000, 30)
        if pos >= episode:  # new episode: other clips, streamed from their first frame with empty caches
            clips = video_clips(pool, config.vae_batch, video_frames(episode), gen)
            stream, pos = CausalStream(vae), 0
        n = min(grad, episode - pos)
        x = to_unit(clips[:, video_frames(pos) : video_frames(pos + n)])
        rec, kl = piece_losses(stream, x, weight, mouth, config, train_encoder=not decoder_only)
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
    return step, rec


def train_vae(pool: Pool, config: TrainConfig, log, vae=None) -> torch.nn.Module:
    """From scratch, or (given `vae`) only its decoder side, so its latent space and every DiT trained on it stay."""
    device = torch.device(config.device)
    gen = torch.Generator(device="cpu").manual_seed(config.seed + 200)
    decoder_only = vae is not None
    vae = (vae if decoder_only else new_vae(config.sizes)).to(device).train()
    trained = trained_parameters(vae, decoder_only)
    opt = torch.optim.AdamW(trained, lr=config.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))
    if config.vae_episode_latents > config.clip_latents:
        raise ValueError(f"vae_episode_latents {config.vae_episode_latents} > clip_latents {config.clip_latents}")
    steps, rec = stream_episodes(vae, opt, trained, pool, config, gen, decoder_only, log)
    log(f"vae: {steps} steps, final l1 {rec.item():.4f}")
    vae.eval()
    log_round_trips(vae, config.vae_check_frames, pool.videos.shape[2], log)
    return vae.eval().requires_grad_(False)


def log_round_trips(vae, lengths: tuple[int, ...], size: int, log) -> None:
    """Round-trip error over videos of each length and the mouth opening's round trip, of a held-out identity."""
    held_out = torch.from_numpy(render_identity((HELD_OUT, max(lengths), size))[0])  # not in the pool
    for length in lengths:
        log(f"vae round trip, {length} frames, MAE (0-255) every 16 frames: "
            f"{round_trip_error(vae, held_out[:length])}")
    truth, got, corr = round_trip_mouth(vae, held_out)
    log(f"vae round trip, mouth openness: mean {truth:.3f} original, {got:.3f} round trip, correlation {corr:.2f}")


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
