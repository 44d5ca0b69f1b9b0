"""Reference image -> CLIP image tokens and the 20-channel i2v condition y (mask + reference latents).

The condition encodes the clip [reference, zero frames...] with the Wan VAE, whose encoder runs frame 0 alone and
then chunks of 4 frames, carrying the last time steps of every causal conv in a feature cache. `encode_mode` gives
the same latents bit for bit as `vae.encode(video).latent_dist.mode()` but skips the work that repeats:

- Why not "encode the first latents, repeat the last": in the Wan 2.1 layout a latent frame j >= 1 sees pixel frames
  from 4j - 112 on (conv_out, 2 mid and 2 stage-3 res blocks: 18 look-back steps at the latent rate; the second
  temporal downsample and 4 stage-2 convs: 2*(j-18) - 2 - 8 at the half rate; the first downsample, 8 stage-0/1
  convs and conv_in: 2*(2j-46) - 2 - 18 at the pixel rate). Latents 0..28 therefore depend on the reference and only
  latents 29, 30, ... repeat: an 81-frame window (21 latents) never gets there.
- What does repeat is each layer on its own, much earlier: once a layer's whole look-back lies in the zero frames,
  it does the same work on every chunk. So the encoder is run step by step (conv_in, each down block, the mid
  block's parts, the head), and a step is skipped when its input and the cache entries it reads are bit for bit
  those of its previous chunk (dtype, shape and strides included): it would run the same kernels on the same
  tensors, so its output and the cache entries it writes are those of its previous run, which are reused. Nothing
  is approximated and no fixed point is assumed: equality is checked on every chunk, for any clip. In an 81-frame
  window the full-resolution blocks, where the encoder spends most of its time, run on 4 or 5 of the 21 chunks,
  the half-resolution ones on 6 or 7, the quarter-resolution ones on 9 to 12 and the rest on 16 to 21. The price
  is memory: the previous chunk's activations are kept until they are compared, one chunk's worth more than
  `vae.encode` holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

# Private module of diffusers: the encoder's layer order and its (feat_cache, feat_idx) calling convention are
# internals, which is why pyproject pins diffusers <0.43 (tests/test_reference_condition.py compares with encode()).
from diffusers.models.autoencoders.autoencoder_kl_wan import CACHE_T, WanCausalConv3d, WanEncoder3d
from PIL import Image
from transformers import CLIPVisionModel

from avatarcli.errors import AvatarError

# OpenAI CLIP normalisation, used by open-clip XLM-R ViT-H/14 (wan/modules/clip.py).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MASK_CHANNELS = 4


def reference_pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """[1, 3, H, W] float32 in [-1, 1]: the portrait stretched to (W, H) with PIL bicubic, as the reference does."""
    resized = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
    return (pixels / 255.0 - 0.5) * 2.0


@torch.no_grad()
def clip_features(image_encoder: CLIPVisionModel, image: Image.Image, width: int, height: int) -> torch.Tensor:
    """[1, 257, image_dim] penultimate-block tokens (Wan's use_31_block=True) in the encoder's dtype.

    Preprocessing follows Wan's CLIPModel.visual: the (W, H) reference in [-1, 1], torch bicubic to 224x224
    (align_corners=False, no antialias), back to [0, 1], CLIP mean/std. The reference casts the pixels to bf16 before
    resizing; here they stay float32 until the encoder.
    """
    size = image_encoder.config.image_size
    pixels = F.interpolate(reference_pixels(image, width, height), size=(size, size), mode="bicubic",
                           align_corners=False)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = (pixels * 0.5 + 0.5 - mean) / std
    parameter = next(image_encoder.parameters())
    output = image_encoder(pixel_values=pixels.to(parameter.device, parameter.dtype), output_hidden_states=True)
    return output.hidden_states[-2]


@torch.no_grad()
def reference_condition(
    vae: AutoencoderKLWan, image: Image.Image, width: int, height: int, num_frames: int = 81, tiled: bool = False,
) -> torch.Tensor:
    """y = [mask (4) | normalised VAE latent mode (16)] of the clip [reference, num_frames-1 zero frames].

    Shape [1, 20, F_lat, H/8, W/8] with F_lat = (num_frames-1)/4 + 1. The mask is 1 on all four channels at latent
    frame 0 (its first pixel frame repeated 4x) and 0 elsewhere; the latents are (mode - latents_mean) / latents_std.
    Same layout as diffusers' WanImageToVideoPipeline and StableAvatar's long pipeline.
    `tiled`: encode in diffusers' overlapping spatial tiles (a tile's working memory instead of the frame's), where
    the frame is larger than a tile: close to the whole-frame latents, not bit for bit (budget.choose_encode_plan).
    """
    temporal, spatial = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    if (num_frames - 1) % temporal:
        raise ValueError(f"num_frames must be {temporal}k+1, got {num_frames}")
    if width % spatial or height % spatial:
        raise AvatarError(f"width and height must be multiples of {spatial}, got {width}x{height}")
    parameter = next(vae.parameters())
    video = torch.zeros(1, 3, num_frames, height, width)
    video[:, :, 0] = reference_pixels(image, width, height)[0]
    with _tiling(vae, tiled):
        latents = encode_mode(vae, video.to(parameter.device, parameter.dtype))
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
    latents = (latents - mean) / std
    mask = torch.zeros(1, MASK_CHANNELS, *latents.shape[2:]).to(latents)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latents], dim=1)


def reference_condition_in_budget(vae: AutoencoderKLWan, image: Image.Image, width: int, height: int,
                                  num_frames: int, device: torch.device,
                                  movable: torch.nn.Module | None = None) -> tuple[torch.Tensor, str]:
    """(`reference_condition`, how it was encoded) within the GPU memory left (budget.choose_encode_plan): whole, or
    whole with `movable` (the DiT) on the host meanwhile, or in spatial tiles; a whole encode that still runs out of
    memory is retried in tiles. Any driver's reference clip."""
    from avatarcli.budget import EncodePlan, choose_encode_plan, device_budget, encode_bytes
    from avatarcli.loading.memory import movable_gpu_bytes, on_host_while

    dtype_bytes = next(vae.parameters()).element_size()
    plan = choose_encode_plan(device_budget(device), encode_bytes(width, height, dtype_bytes, num_frames),
                              movable_gpu_bytes(movable))
    with on_host_while(movable, device, move=plan.dit_to_host):
        try:
            return reference_condition(vae, image, width, height, num_frames, plan.tiled), str(plan)
        except torch.OutOfMemoryError:
            if plan.tiled:
                raise
        torch.cuda.empty_cache()
        plan = EncodePlan(plan.dit_to_host, tiled=True, retried=True)
        return reference_condition(vae, image, width, height, num_frames, True), str(plan)


@contextmanager
def _tiling(vae: AutoencoderKLWan, on: bool) -> Iterator[None]:
    """diffusers' spatial tiling of `vae` on for the block (when `on`), as it was after."""
    was = vae.use_tiling
    vae.use_tiling = was or on
    try:
        yield
    finally:
        vae.use_tiling = was


# --- the VAE encode, without the steps that repeat ------------------------------------------------------------------

# diffusers' AutoencoderKLWan._encode: frame 0 alone, then chunks of this many frames.
ENCODE_CHUNK = 4
# What the skipping keeps beyond the plain chunk loop, per pixel of a frame (counted with the published configuration
# at 32x32 to 64x112, in elements): every step's output for one chunk of 4 frames (1,800: each step's input is its
# predecessor's output) and the cache entries the steps read before the ones they wrote (1,404). At 480x832 in
# float32 that is 5.1 GB: on a GPU where it does not fit, the plain loop runs instead (the same latents).
SKIP_RETAINED_ELEMENTS_PER_PIXEL = 3204
# The first chunk a step can be skipped on: the cache holds one time step before chunk 1 and two before chunk 2, so
# chunk 2 is the first to start from a cache shaped like its successors', and chunk 3 the first that can repeat it.
FIRST_REPEATABLE_CHUNK = 3


@torch.no_grad()
def encode_mode(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """`vae.encode(video).latent_dist.mode()` bit for bit, skipping the encoder steps that repeat (module docstring).

    Falls back to `vae.encode` where its path is not the plain chunk loop (tiling, patching, a batch, offload hooks)
    and where no step could repeat (up to 4*(FIRST_REPEATABLE_CHUNK-1)+1 frames), and where the GPU memory left
    cannot hold what the skipping keeps (SKIP_RETAINED_ELEMENTS_PER_PIXEL).
    """
    if not _plain_encode(vae, video) or not _skipping_fits(video):
        return vae.encode(video).latent_dist.mode()
    hidden = _encode_chunks(vae.encoder, video)
    return vae.quant_conv(hidden).chunk(2, dim=1)[0]  # DiagonalGaussianDistribution(h).mode(): the mean half


def _plain_encode(vae: AutoencoderKLWan, video: torch.Tensor) -> bool:
    """Whether `vae.encode(video)` is the chunk loop `_encode_chunks` mirrors, and long enough to gain from it."""
    from avatarcli.loading.memory import has_offload_hooks

    _, _, frames, height, width = video.shape
    tiled = vae.use_tiling and (width > vae.tile_sample_min_width or height > vae.tile_sample_min_height)
    return (video.shape[0] == 1 and vae.config.patch_size is None and not tiled and not has_offload_hooks(vae)
            and isinstance(vae.encoder, WanEncoder3d)
            and 1 + (frames - 1) // ENCODE_CHUNK > FIRST_REPEATABLE_CHUNK)


def _skipping_fits(video: torch.Tensor) -> bool:
    """Whether the device's memory left holds what the skipping keeps (always, on the CPU: no budget)."""
    from avatarcli.budget import device_budget, fits

    height, width = video.shape[-2:]
    return fits(device_budget(video.device), SKIP_RETAINED_ELEMENTS_PER_PIXEL * height * width * video.element_size())


Step = Callable[[torch.Tensor, list, list], torch.Tensor]


@dataclass
class _Record:
    """One step's last real run: its input, the cache entries it read and wrote, its output."""

    input: torch.Tensor
    read: list
    written: list
    output: torch.Tensor


def _encode_chunks(encoder: WanEncoder3d, video: torch.Tensor) -> torch.Tensor:
    """The encoder outputs of every chunk, concatenated on time, as AutoencoderKLWan._encode computes them (before
    quant_conv); a step whose input and cache entries equal its previous run's is not run again."""
    steps = _encoder_steps(encoder)
    cache: list = [None] * sum(isinstance(m, WanCausalConv3d) for m in encoder.modules())
    records: list[_Record | None] = [None] * len(steps)
    outputs = []
    for chunk in range(1 + (video.shape[2] - 1) // ENCODE_CHUNK):
        start = 0 if chunk == 0 else 1 + ENCODE_CHUNK * (chunk - 1)
        x = video[:, :, start : start + (1 if chunk == 0 else ENCODE_CHUNK)]
        index = [0]
        for position, step in enumerate(steps):
            first, record = index[0], records[position]
            if record is not None and _same(x, record.input) and all(
                    _same(cache[first + k], entry) for k, entry in enumerate(record.read)):
                # Same operations on the same tensors: the previous run's results, bit for bit. They also equal what
                # was read (the state is a fixed point of this step), so the next chunk can match by identity.
                cache[first : first + len(record.written)] = record.written
                index[0] += len(record.written)
                record.input, record.read = x, list(record.written)
                x = record.output
                continue
            before = list(cache)
            output = step(x, cache, index)
            records[position] = _Record(x, before[first : index[0]], cache[first : index[0]], output)
            x = output
        outputs.append(x)
    return torch.cat(outputs, dim=2)


def _encoder_steps(encoder: WanEncoder3d) -> list[Step]:
    """WanEncoder3d.forward with a cache, cut into steps (x, feat_cache, feat_idx) -> x, in its order."""

    def cached(layer: torch.nn.Module) -> Step:
        return lambda x, cache, index: layer(x, feat_cache=cache, feat_idx=index)

    def head(x: torch.Tensor, cache: list, index: list) -> torch.Tensor:
        return _causal_conv(encoder.conv_out, encoder.nonlinearity(encoder.norm_out(x)), cache, index)

    mid = encoder.mid_block
    steps: list[Step] = [lambda x, cache, index: _causal_conv(encoder.conv_in, x, cache, index)]
    steps += [cached(layer) for layer in encoder.down_blocks]
    steps.append(cached(mid.resnets[0]))
    for attention, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attention is not None:
            steps.append(lambda x, cache, index, attention=attention: attention(x))
        steps.append(cached(resnet))
    steps.append(head)
    return steps


def _causal_conv(conv: WanCausalConv3d, x: torch.Tensor, cache: list, index: list) -> torch.Tensor:
    """conv_in / conv_out as WanEncoder3d.forward runs them: keep the last CACHE_T time steps of the input."""
    slot = index[0]
    keep = x[:, :, -CACHE_T:, :, :].clone()
    if keep.shape[2] < 2 and cache[slot] is not None:
        keep = torch.cat([cache[slot][:, :, -1, :, :].unsqueeze(2).to(keep.device), keep], dim=2)
    x = conv(x, cache[slot])
    cache[slot] = keep
    index[0] += 1
    return x


def _same(a: object, b: object) -> bool:
    """Bit-for-bit equality of two cache entries or step inputs (None, tensors): dtype, device, shape, strides and
    every byte (so -0.0 differs from 0.0 and a NaN equals the same NaN)."""
    if a is b:
        return True
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    if a.dtype != b.dtype or a.device != b.device or a.shape != b.shape or a.stride() != b.stride():
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
