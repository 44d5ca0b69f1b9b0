"""Class-conditional ImageNet generation with SFD: labels -> semantic-first sampling -> texture decode -> files.

`run_sfd(job)` writes a grid PNG, one PNG per image, and/or the `arr_0` npz the ADM evaluator reads for FID.
Every file is written under a temporary name and renamed when complete. Image i's noise depends only on
(seed, i), so results do not change with the batch size.
"""

from __future__ import annotations

import math
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import torch
from PIL import Image

from avatarcli.errors import AvatarError, CheckpointError
from avatarcli.loading.sfd import (
    SFD_MODELS, LatentStats, load_latent_stats, load_lightningdit, load_texture_vae, sfd_files,
)
from avatarcli.models.ldm_vae import TextureVAEDecoder, to_uint8_nhwc
from avatarcli.models.sfd import LightningDiT
from avatarcli.sampling import sfd as sampling

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class SfdJob:
    weights_dir: Path
    model: Literal["xl", "xxl"] = "xl"
    classes: list[int] = field(default_factory=list)
    random_count: int = 0  # this many uniformly random labels
    balanced_count: int = 0  # this many labels, equally many per class (the FID protocol's 50 per class)
    guidance: Literal["autoguidance", "cfg", "none"] = "autoguidance"
    scale: float | None = None  # None: the published scale of the model; <= 1 turns guidance off, as in the reference
    scale_tex: float | None = None
    scale_sem: float | None = None
    solver: Literal["euler", "heun", "dopri5"] = "euler"
    steps: int = 100  # fixed-step solvers only
    seed: int = 0
    batch_size: int = 32
    grid_path: Path | None = None
    images_dir: Path | None = None
    npz_path: Path | None = None
    vae_dir: Path | None = None  # folder holding the texture VAE when it is not in weights_dir
    device: str | None = None
    dtype: Literal["fp32", "bf16"] = "fp32"
    # torch.compile the denoisers: eager LightningDiT is bound by its unfused norms, RoPE and gating (about 3x
    # slower in bf16 on an H100); compiling costs a minute up front.
    compile: bool = False
    on_batch: Callable[[int, int], None] | None = None  # (images done, total), for progress display


@dataclass
class SfdResult:
    labels: list[int]
    nfe: list[int]  # drift evaluations per batch
    files: list[Path]
    sampling_seconds: float
    decoding_seconds: float


def job_labels(job: SfdJob, num_classes: int) -> list[int]:
    if sum(bool(x) for x in (job.classes, job.random_count, job.balanced_count)) != 1:
        raise AvatarError("give exactly one of --class, --random N or --balanced N")
    if job.classes:
        bad = [c for c in job.classes if not 0 <= c <= num_classes]
        if bad:
            raise AvatarError(f"class ids must lie in 0..{num_classes - 1} ({num_classes} = unconditional); got {bad}")
        return list(job.classes)
    if job.random_count:
        return np.random.default_rng([job.seed, 1]).integers(0, num_classes, job.random_count).tolist()
    # The reference's balanced_sampling: count // classes per class, the remainder to the first classes.
    per_class, remainder = divmod(job.balanced_count, num_classes)
    return [c for c in range(num_classes) for _ in range(per_class)] + list(range(remainder))


def image_noise(seed: int, indices: range, shape: tuple[int, ...]) -> torch.Tensor:
    def one(index: int) -> torch.Tensor:
        image_seed = int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)
        return torch.randn(shape, generator=torch.Generator().manual_seed(image_seed))

    return torch.stack([one(i) for i in indices])


def grid_columns(count: int) -> int:
    """The widest divisor of `count` up to sqrt(2 * count) (8 -> 2 x 4), else a near-square grid."""
    limit = math.isqrt(2 * count)
    divisor = max(d for d in range(1, limit + 1) if count % d == 0)
    return divisor if divisor * divisor * 2 >= count else math.ceil(math.sqrt(count))


def make_grid(images: np.ndarray) -> np.ndarray:
    count, h, w, c = images.shape
    columns = grid_columns(count)
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def write_png(path: Path, image: np.ndarray) -> None:
    tmp = _temporary(path)
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


class NpzWriter:
    """Streams uint8 NHWC batches into `arr_0` of an .npz, so 50k images never sit in memory at once."""

    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.path, self.tmp = path, _temporary(path)
        self.archive = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.entry = self.archive.open("arr_0.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_1_0(self.entry, {"descr": "|u1", "fortran_order": False, "shape": shape})

    def write(self, images: np.ndarray) -> None:
        self.entry.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())

    def close(self) -> None:
        self.entry.close()
        self.archive.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.entry.close()
        self.archive.close()
        self.tmp.unlink(missing_ok=True)


def _check_job(job: SfdJob) -> None:
    if job.model not in SFD_MODELS:
        raise AvatarError(f"unknown SFD model {job.model!r}; choose one of {', '.join(SFD_MODELS)}")
    if not (job.grid_path or job.images_dir or job.npz_path):
        raise AvatarError("nothing to write: give -o grid.png, --images-dir DIR or --npz samples.npz")
    if job.guidance not in ("autoguidance", "cfg", "none"):
        raise AvatarError(f"--guidance must be autoguidance, cfg or none, not {job.guidance!r}")
    if job.solver not in ("euler", "heun", "dopri5"):
        raise AvatarError(f"unknown solver {job.solver!r}; use euler, heun or dopri5")
    if job.solver != "dopri5" and job.steps < 3:
        raise AvatarError("--steps must be at least 3 (one step per phase)")
    if job.batch_size < 1:
        raise AvatarError("--batch-size must be at least 1")
    if job.dtype not in DTYPES:
        raise AvatarError(f"--dtype must be one of {', '.join(DTYPES)}")


def job_guidance(job: SfdJob) -> sampling.Guidance:
    scale = SFD_MODELS[job.model].guidance_scale if job.scale is None else job.scale
    if job.guidance == "none" or scale <= 1.0:
        return sampling.Guidance("none")
    tex = scale if job.scale_tex is None else job.scale_tex
    sem = scale if job.scale_sem is None else job.scale_sem
    return sampling.Guidance(job.guidance, tex, sem)


@dataclass
class SfdModels:
    """Networks and statistics of one run; `weak` is the AutoGuidance model (None without AutoGuidance)."""

    main: LightningDiT
    weak: LightningDiT | None
    vae: TextureVAEDecoder
    stats: LatentStats


def _load(job: SfdJob, guidance: sampling.Guidance, device: torch.device) -> SfdModels:
    files = sfd_files(job.weights_dir, job.model, job.vae_dir)
    dtype = DTYPES[job.dtype]
    main = load_lightningdit(files.checkpoint).to(device, dtype)
    weak = load_lightningdit(files.guidance_checkpoint).to(device, dtype) if guidance.kind == "autoguidance" else None
    vae = load_texture_vae(files.vae).to(device, dtype)
    stats = load_latent_stats(files.texture_stats)
    config = main.config
    latent_shape = (config.in_channels, config.input_size)
    if weak is not None and (weak.config.in_channels, weak.config.input_size) != latent_shape:
        raise CheckpointError(f"{files.guidance_checkpoint} does not fit {files.checkpoint} (latent shape differs)")
    if not config.semantic_first:
        raise CheckpointError(f"{files.checkpoint} has a single timestep embedder; it is not an SFD checkpoint")
    if stats.mean.shape[1] != config.texture_chans or vae.config.embed_dim != config.texture_chans:
        raise CheckpointError(f"texture channels disagree: model {config.texture_chans}, stats {stats.mean.shape[1]}, "
                              f"VAE {vae.config.embed_dim}; check that the files belong together")
    if guidance.kind == "cfg" and not config.has_null_class:
        raise AvatarError(f"{files.checkpoint} has no null class; use --guidance autoguidance or none")
    return SfdModels(main, weak, vae, stats)


@dataclass
class SfdBatch:
    indices: range
    images: np.ndarray  # uint8 [B, H, W, 3]
    nfe: int
    sampling_seconds: float
    decoding_seconds: float


def generate(models: SfdModels, labels: list[int], job: SfdJob, guidance: sampling.Guidance,
             device: torch.device) -> Iterator[SfdBatch]:
    """Batches of decoded images in label order, with the time spent sampling and decoding each."""
    config, dtype = models.main.config, DTYPES[job.dtype]
    for start in range(0, len(labels), job.batch_size):
        indices = range(start, min(start + job.batch_size, len(labels)))
        noise = image_noise(job.seed, indices, (config.in_channels, config.input_size, config.input_size)).to(device)
        y = torch.tensor([labels[i] for i in indices], device=device)
        velocity = sampling.guided_velocity(models.main, y, guidance, texture_chans=config.texture_chans,
                                            null_class=config.null_class, guidance_model=models.weak, dtype=dtype)
        began = time.perf_counter()
        out = sampling.sample(velocity, noise, texture_chans=config.texture_chans, delta_t=config.semfirst_delta_t,
                              solver=job.solver, num_steps=job.steps)
        # Only the texture part is decoded; the generated semantic latent is discarded (SFD README).
        texture = models.stats.denormalize(out.x[:, : config.texture_chans])
        _sync(device)
        sampled = time.perf_counter()
        images = to_uint8_nhwc(models.vae(texture.to(dtype))).cpu().numpy()
        yield SfdBatch(indices, images, out.nfe, sampled - began, time.perf_counter() - sampled)


def run_sfd(job: SfdJob) -> SfdResult:
    _check_job(job)
    guidance = job_guidance(job)
    device = _device(job.device)
    models = _load(job, guidance, device)
    if job.compile:
        for network in (models.main, models.weak):
            if network is not None:
                network.compile()
    labels = job_labels(job, models.main.config.num_classes)
    if job.grid_path and len(labels) > 1024:
        raise AvatarError(f"a grid of {len(labels)} images is too large; use --images-dir or --npz instead")
    side = models.main.config.input_size * models.vae.config.upsampling_factor

    result = SfdResult(labels, [], [], 0.0, 0.0)
    grid_parts: list[np.ndarray] = []
    npz = NpzWriter(Path(job.npz_path), (len(labels), side, side, 3)) if job.npz_path else None
    if job.images_dir:
        Path(job.images_dir).mkdir(parents=True, exist_ok=True)
    try:
        with torch.inference_mode():
            for batch in generate(models, labels, job, guidance, device):
                result.nfe.append(batch.nfe)
                result.sampling_seconds += batch.sampling_seconds
                result.decoding_seconds += batch.decoding_seconds
                if npz:
                    npz.write(batch.images)
                if job.images_dir:
                    for i, image in zip(batch.indices, batch.images):
                        write_png(Path(job.images_dir) / f"{i:06d}.png", image)
                        result.files.append(Path(job.images_dir) / f"{i:06d}.png")
                if job.grid_path:
                    grid_parts.append(batch.images)
                if job.on_batch:
                    job.on_batch(batch.indices.stop, len(labels))
    except BaseException:
        if npz:
            npz.abort()
        raise
    if npz:
        npz.close()
        result.files.append(Path(job.npz_path))
    if job.grid_path:
        write_png(Path(job.grid_path), make_grid(np.concatenate(grid_parts)))
        result.files.append(Path(job.grid_path))
    return result


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise AvatarError(f"device {name!r} is not usable here ({exc}); pick another with --device") from exc
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
