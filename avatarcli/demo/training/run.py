"""The orchestrator: every stage in order, from one seed, into one weights folder in the published layout.

fixed components and prompts -> pool -> audio encoder -> VAE (+ its latent statistics folded in, round-trip checks)
-> encoded pool and portrait conditions -> DiT -> condition check -> export (VAE and DiT in config.export_dtype).
Continuing from a weights folder (config.init), the audio encoder is kept, the VAE's decoder side and the DiT train
on, and the latent statistics stay as they were.

A new VAE may spend a share of its time (config.vae_decoder_share) on its decoder side alone after the whole VAE has
trained and its latent statistics are folded in: what a continued run (--init) does, in the same process.

Time: each stage runs to its step count or its time budget; with config.minutes the VAE and the DiT share what the
stages before them leave of the whole budget (schedule.Budget), so the run ends on time on any GPU. The expected
H200 seconds of every stage (config.estimate) are logged first.

Resume: once the VAE stage is done its weights are in the folder, with PROGRESS (the config and the seconds spent).
`train(..., stop_after="vae")` ends there; a later train() into the same folder with the same config goes on from
the saved VAE and audio encoder (as float16 files, as inference loads them) with the rest of the budget.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from avatarcli.demo.training.config import H200_FIXED_SECONDS, PROMPT, WINDOW_VIDEO_FRAMES, TrainConfig, estimate
from avatarcli.demo.training.data import Pool, make_pool
from avatarcli.demo.training.dit import train_dit
from avatarcli.demo.training.dit_check import condition_check
from avatarcli.demo.training.latents import (
    encode_pool, fold_latent_statistics, latent_statistics, reference_conditions,
)
from avatarcli.demo.training.layout import AVATAR, BASE, WAV2VEC, export_transformer, export_vae, write_fixed_components
from avatarcli.demo.training.schedule import Budget
from avatarcli.demo.training.vae import log_round_trips, train_vae
from avatarcli.demo.training.wav2vec import save_wav2vec, train_audio_encoder


def fixed_components(out: Path, config: TrainConfig, device):
    """Write the fixed random umT5 and CLIP (layout.py) and load them as inference does: (prompt embeddings
    [negative, positive], image encoder)."""
    from avatarcli.features.text import NEGATIVE_PROMPT, encode_prompts
    from avatarcli.loading.components import load_image_encoder, load_text_encoder
    from avatarcli.testing.components import CLIP_FILE, T5_FILE, T5_TOKENIZER_FOLDER

    write_fixed_components(out, config.sizes, config.seed)
    base = out / BASE
    text_encoder, tokenizer = load_text_encoder(base / T5_FILE, base / T5_TOKENIZER_FOLDER, dtype=torch.float32)
    prompts = encode_prompts(text_encoder, tokenizer, [NEGATIVE_PROMPT, PROMPT]).float()
    return prompts, load_image_encoder(base / CLIP_FILE, device=device)


def reserve(config: TrainConfig, *stages: str) -> float:
    """Seconds to keep back for the untimed `stages` (config.H200_FIXED_SECONDS, scaled with the pool) and the
    margin, when a whole-run budget (config.minutes) is split between the trained stages."""
    pool = config.identities * config.clip_latents / (400 * 76)
    scaled = {"latents": H200_FIXED_SECONDS["latents"] * pool, "checks": H200_FIXED_SECONDS["checks"]}
    return config.margin_seconds + sum(scaled[s] for s in stages)


def audio_encoder_and_vae(pool: Pool, config: TrainConfig, log, device, budget: Budget):
    """The audio-encoder and VAE stages, or what config.init gives in their place: (wav2vec2, VAE, DiT to train on
    from, None from scratch)."""
    if config.init:
        from avatarcli.loading.components import load_audio_encoder, load_vae

        init = Path(config.init)
        wav2vec, _ = load_audio_encoder(init / WAV2VEC, device=device)
        vae = train_vae(pool, config, log, vae=load_vae(init / BASE / "Wan2.1_VAE.pth", device=device),
                        seconds=budget.share(config.vae_seconds, config.dit_seconds,
                                             reserve=reserve(config, "latents", "checks")))
        return wav2vec, vae, init_transformer(config, device)
    wav2vec = train_audio_encoder(pool, config, log)
    later = reserve(config, "latents", "checks")
    whole = budget.share(config.vae_seconds, config.dit_seconds, reserve=later) * (1 - config.vae_decoder_share)
    vae = train_vae(pool, config, log, seconds=whole)
    mean, std = latent_statistics(vae, pool)
    fold_latent_statistics(vae, mean, std)
    if config.vae_decoder_share > 0:
        decoder = budget.share(config.vae_seconds * config.vae_decoder_share, config.dit_seconds, reserve=later)
        log(f"vae: the decoder side alone for {decoder:.0f} s")
        vae = train_vae(pool, replace(config, vae_lr=config.vae_decoder_lr, seed=config.seed + 1), log, vae=vae,
                        seconds=decoder)
    return wav2vec, vae, None


PROGRESS = "train-progress.json"
VAE_FILE = "Wan2.1_VAE.safetensors"


def _resumable(config: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))


def saved_progress(out: Path, config: TrainConfig) -> float | None:
    """Seconds an earlier run of this config into `out` spent before it stopped after its VAE, or None."""
    path = out / PROGRESS
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    if state["config"] != _resumable(config):
        raise ValueError(f"{out} holds a stopped run with other settings: remove it or give another folder")
    return float(state["seconds"])


def vae_stage(out: Path, pool: Pool, config: TrainConfig, log, device, budget: Budget, summary: dict):
    """Audio encoder and VAE trained (or continued), checked and written to `out` with PROGRESS:
    (wav2vec2, VAE, DiT to train on from or None)."""
    wav2vec, vae, init_transformer = audio_encoder_and_vae(pool, config, log, device, budget)
    summary.update(log_round_trips(vae, config.vae_check_frames, pool.videos.shape[2], log))
    save_wav2vec(wav2vec, out / WAV2VEC)
    save_file(export_vae(vae, config.sizes, getattr(torch, config.export_dtype)), str(out / BASE / VAE_FILE))
    (out / PROGRESS).write_text(json.dumps({"config": _resumable(config), "seconds": budget.elapsed()}))
    return wav2vec, vae, init_transformer


def init_transformer(config: TrainConfig, device):
    """The DiT of the weights folder config.init to train on from (float32), or None for a new one."""
    if not config.init:
        return None
    from avatarcli.loading.transformer import load_stableavatar_transformer

    return load_stableavatar_transformer(Path(config.init), "square", dtype=torch.float32, device=device)


def saved_models(out: Path, config: TrainConfig, device):
    """What vae_stage wrote to `out`, loaded back: (wav2vec2, VAE, DiT to train on from or None)."""
    from avatarcli.loading.components import load_audio_encoder, load_vae

    wav2vec, _ = load_audio_encoder(out / WAV2VEC, device=device)
    return wav2vec, load_vae(out / BASE / VAE_FILE, device=device), init_transformer(config, device)


def portrait_inputs(vae, image_encoder, pool: Pool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Each pool portrait's reference condition (batched) and CLIP tokens, and the largest difference of the first
    condition from the inference code's own (avatarcli.features.image.reference_condition)."""
    from PIL import Image

    from avatarcli.features.image import clip_features, reference_condition

    conditions, tokens = [], []
    with torch.no_grad():
        for face in pool.portraits:
            tokens.append(clip_features(image_encoder, Image.fromarray(face), face.shape[1], face.shape[0]).float())
        for start in range(0, len(pool.portraits), 64):
            conditions.append(reference_conditions(vae, pool.portraits[start : start + 64]))
    conditions, tokens = torch.cat(conditions).float(), torch.cat(tokens)
    first = Image.fromarray(pool.portraits[0])
    check = reference_condition(vae, first, first.width, first.height, WINDOW_VIDEO_FRAMES).float()
    return conditions, tokens, float((check - conditions[:1]).abs().max())


def logged_condition_check(ema, vae, wav2vec, image_encoder, prompts: torch.Tensor, size: int, log) -> dict:
    """dit_check.condition_check, logged, keyed by sigma as text (for the JSON summary)."""
    check = condition_check(ema, vae, wav2vec, image_encoder, prompts, size)
    for sigma, errors in check.items():
        log(f"dit x0 error at sigma {sigma} (frame / mouth box): "
            + "  ".join(f"{name} {a:.4f} / {m:.4f}" for name, (a, m) in errors.items()))
    return {str(sigma): errors for sigma, errors in check.items()}


def train(out_dir: str | Path, config: TrainConfig, log: Callable[[str], None] = lambda line: None,
          started: float | None = None, stop_after: str | None = None) -> dict:
    """Run every stage and write the weights folder; returns a summary (steps, losses, checks, seconds).
    `started`: the time.perf_counter() the whole run's budget (config.minutes) counts from (default: now).
    `stop_after="vae"`: end once the VAE is written; a run stopped so is taken up again by the next train() of the
    same config into the same folder (its budget counts the seconds already spent)."""
    out = Path(out_dir)
    started = time.perf_counter() if started is None else started
    spent = saved_progress(out, config)
    budget = Budget(config.minutes, started - (spent or 0.0))
    planned = estimate(config)
    log("expected on one H200: " + ", ".join(f"{k} {v:.0f} s" for k, v in planned.items()))
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    if device.type == "cuda":  # the VAE's 3D convolutions come in a handful of shapes: let cuDNN time its kernels once
        torch.backends.cudnn.benchmark = True
    dtype = getattr(torch, config.export_dtype)
    summary: dict = {"config": asdict(config), "expected_h200_seconds": {k: round(v) for k, v in planned.items()}}
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:
        seconds[name] = round(time.perf_counter() - started - sum(seconds.values()), 1)

    prompts, image_encoder = fixed_components(out, config, device)
    pool = make_pool(config, log)
    lap("data")
    if spent is None:
        wav2vec, vae, init_transformer = vae_stage(out, pool, config, log, device, budget, summary)
        lap("audio+vae")
        if stop_after == "vae":
            log(f"stopped after the VAE ({budget.elapsed():.0f} s): the same command goes on from there")
            return dict(summary, stopped_after="vae", stage_seconds=seconds, seconds=round(budget.elapsed(), 1))
    else:
        log(f"going on after the VAE of a run stopped at {spent:.0f} s")
        wav2vec, vae, init_transformer = saved_models(out, config, device)
        summary["resumed_after_seconds"] = round(spent, 1)
    latents = encode_pool(vae, pool)
    summary["latent_mean_abs"] = float(latents.mean(dim=(0, 2, 3, 4)).abs().max())
    summary["latent_std"] = [round(float(v), 3) for v in latents.std(dim=(0, 2, 3, 4))]
    log(f"latents {tuple(latents.shape)}, per-channel std {summary['latent_std']}")
    conditions, tokens, summary["condition_batch_error"] = portrait_inputs(vae, image_encoder, pool)
    lap("latents")
    ema, steps = train_dit(pool, latents, conditions, tokens, prompts, wav2vec, config, log, init_transformer,
                           seconds=budget.share(config.dit_seconds, reserve=reserve(config, "checks")))
    lap("dit")
    summary["condition_check"] = logged_condition_check(ema, vae, wav2vec, image_encoder, prompts, config.size, log)
    avatar = out / AVATAR
    avatar.mkdir(parents=True, exist_ok=True)
    save_file(export_transformer(ema, config.sizes, dtype), str(avatar / "transformer3d-square.safetensors"))
    (out / PROGRESS).unlink(missing_ok=True)
    lap("checks")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"stage seconds: {seconds}; weights folder {size / 2**20:.1f} MiB")
    summary.update(dit_steps=steps, stage_seconds=seconds, weights_mib=round(size / 2**20, 2),
                   seconds=round(budget.elapsed(), 1))
    return summary
