"""The driving-video driver: a face video -> FlashPortrait (Wan2.1-I2V-14B + the expression block).

Per job: the driving video's 554 PD-FGC expression values per frame (face detection, landmarks, tracking, PD-FGC,
streamed frame by frame), umT5 prompt embeddings, CLIP tokens and the I2V reference condition of the portrait
(once); each window's expression tokens when the window first runs. The output keeps the driving video's frame
count and frame rate (decoded frame 0 is the reference-image slot and is dropped, as in the reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from avatarcli.drivers.base import Generation, Inputs
from avatarcli.errors import AvatarError
from avatarcli.models.windows import FLASHPORTRAIT_WINDOW as WINDOW_LATENT_FRAMES

if TYPE_CHECKING:
    import torch

    from avatarcli.job import AnimateJob
    from avatarcli.runtime import StageClock
    from avatarcli.sampling.windows import Window, WindowPlan

FLASHPORTRAIT_FOLDER = "FlashPortrait"  # the files of FrancisRing/FlashPortrait inside the weights folder


@dataclass
class FlashPortraitModels:
    components: Any  # loading.flashportrait.FlashPortraitComponents
    extractor: Any  # features.expression.ExpressionExtractor
    placement: Any  # loading.memory.Placement: where the DiT's inputs go
    tiny_decoder: Any = None  # models.taehv decoder (fast_vae.pth) when the preset or --decoder asks for it
    weights_dir: Any = None  # the weights folder they were loaded from (umT5 comes from there when a prompt needs it)
    disk_prompts: Any = None  # features.prompt_cache.PromptCache for this umT5 file

    def weights_folder(self):
        return self.weights_dir


def _explicit_size(size: str) -> tuple[int, int] | None:
    if size == "auto":
        return None
    width, height = (int(v) for v in size.split("x"))
    return width, height


class FlashPortraitDriver:
    name = "driving"

    def prepare(self, job: AnimateJob) -> Inputs:
        from avatarcli.limits import check_driving_frames, check_frame_size
        from avatarcli.media.image import load_portrait
        from avatarcli.media.video import probe_video
        from avatarcli.sampling.flashportrait import reference_size

        preset = job.preset
        if preset.guidance != "expression":
            raise AvatarError(f"--guidance {preset.guidance} is for --audio; a --driving video uses 'expression'")
        if job.precision != "auto":
            raise AvatarError("--precision fp8 applies to --audio; for a --driving video use --weights-dtype fp8")
        if preset.overlap >= WINDOW_LATENT_FRAMES:
            raise AvatarError(f"--overlap must be below the window of {WINDOW_LATENT_FRAMES} latent frames for a "
                              f"--driving video, got {preset.overlap}")
        portrait = load_portrait(job.portrait)
        info = probe_video(job.driving)
        if info.frame_count < 1:
            raise AvatarError(f"{job.driving}: the video has no frames")
        check_driving_frames(info.frame_count, info.fps, job.driving)
        width, height = reference_size(portrait.width, portrait.height, preset.max_size, _explicit_size(preset.size))
        auto = f"the output size {width}x{height} (the portrait's longer side at max_size {preset.max_size})"
        check_frame_size(width, height, self.name, auto if preset.size == "auto" else f"--size {preset.size}")
        return Inputs(portrait=portrait, width=width, height=height, frames=info.frame_count, fps=info.fps,
                      audio_track=job.driving if info.has_audio else None, signal=info)

    @staticmethod
    def prompt_cache(weights, device):
        from avatarcli.features.prompt_cache import PromptCache, encoder_file
        from avatarcli.loading.flashportrait import T5_FILE
        from avatarcli.loading.stableavatar import text_dtype_for

        return PromptCache(encoder_file(weights / T5_FILE), text_dtype_for(device))

    def window_plan(self, job: AnimateJob, frames: int) -> WindowPlan:
        """The sliding windows of an output of `frames` frames (no model needed)."""
        from avatarcli.sampling.flashportrait import latent_frames_for_driving, plan_flashportrait_windows

        return plan_flashportrait_windows(latent_frames_for_driving(frames), WINDOW_LATENT_FRAMES, job.preset.overlap)

    def compile_break_even(self, job: AnimateJob) -> int | None:
        """The 14B DiT's: 48 s of compiling against 2.49 s saved per window-step (14.15 -> 11.66 s at 512x512 on an
        H100, benchmarks/bench_flashportrait.py) pays after 20 window-steps."""
        return 20

    def models_key(self, job: AnimateJob, inputs: Inputs) -> tuple:
        return (self.name, str(job.weights), job.device, job.dtype, job.offload, job.weights_dtype, job.compile,
                job.preset.lora_strength, job.preset.decoder, job.preset.numerics)

    def load(self, job: AnimateJob, inputs: Inputs, device: torch.device, dtype: torch.dtype) -> FlashPortraitModels:
        from avatarcli.compilation import compile_blocks
        from avatarcli.features.expression import ExpressionExtractor
        from avatarcli.hub import resolve_weights
        from avatarcli.loading.flashportrait import load_flashportrait
        from avatarcli.loading.memory import place_transformer
        from avatarcli.models.wan import use_numerics

        weights = resolve_weights("flashportrait", job.weights, job.allow_download, also=turbo_files(job.preset))
        offloaded = job.offload != "none" or job.weights_dtype == "fp8"
        disk_prompts = self.prompt_cache(weights, device)
        cached = disk_prompts.get((job.negative_prompt, job.prompt)) is not None
        components = load_flashportrait(weights, device, dtype, transformer_device="cpu" if offloaded else device,
                                        with_text_encoder=not cached)
        if job.preset.lora_strength:
            from avatarcli.loading.lora import FAST_LORA_FILE, merge_lora_into_model, read_lora

            # merged once, before any offloading or fp8 storage is applied (W += s * up @ down, strict keys)
            lora_path = weights / FLASHPORTRAIT_FOLDER / FAST_LORA_FILE
            merge_lora_into_model(components.transformer, read_lora(lora_path), job.preset.lora_strength,
                                  source=str(lora_path))
        tiny_decoder = None
        if job.preset.decoder == "tiny":
            from avatarcli.loading.taehv import FAST_VAE_FILE, load_tiny_decoder
            from avatarcli.runtime import resolve_dtype

            tiny_decoder = load_tiny_decoder(weights / FLASHPORTRAIT_FOLDER / FAST_VAE_FILE,
                                             dtype=resolve_dtype(job.vae_dtype, device), device=device)
        if offloaded:
            placement = place_transformer(components.transformer, device, offload=job.offload,
                                          weights_dtype="fp8" if job.weights_dtype == "fp8" else "bf16",
                                          compute_dtype=dtype)
        else:
            from avatarcli.loading.memory import Placement

            placement = Placement(device, dtype)
        use_numerics(components.transformer, job.preset.numerics)  # before compiling
        if job.compile == "on" and device.type == "cuda" and job.offload == "none":  # auto: decided before loading
            compile_blocks(components.transformer)
        extractor = ExpressionExtractor.from_folder(weights / FLASHPORTRAIT_FOLDER, device=str(device))
        return FlashPortraitModels(components, extractor, placement, tiny_decoder, weights, disk_prompts)

    def build(self, job: AnimateJob, inputs: Inputs, models: FlashPortraitModels, device: torch.device,
              dtype: torch.dtype, clock: StageClock) -> Generation:
        import torch

        from avatarcli.decode.decoders import generation_decoder
        from avatarcli.loading.memory import decode_copy
        from avatarcli.runtime import resolve_dtype
        from avatarcli.sampling.flashportrait import (
            ExpressionGuidance,
            FlashPortraitDenoiser,
            latent_frames_for_driving,
        )

        preset, parts = job.preset, models.components
        latent_frames = latent_frames_for_driving(inputs.frames)
        with clock("features"), torch.no_grad():
            pixel_features, text, image_tokens, (condition, encoded) = self.conditioning(job, inputs, models,
                                                                                         latent_frames, device)
        # a cast copy when needed: the loaded VAE keeps encoding in float32 for later jobs
        decode_vae = decode_copy(parts.vae, resolve_dtype(job.vae_dtype, device))
        plan = self.window_plan(job, inputs.frames)
        sigmas, update = _schedule(preset)
        guidance = ExpressionGuidance(emo_scale=preset.emo_scale, text_scale=preset.text_scale)
        denoiser = FlashPortraitDenoiser(parts.transformer, guidance, positive_text=text[1:2],
                                         negative_text=text[0:1], image_tokens=image_tokens, condition=condition,
                                         window_tokens=WindowTokens(parts.portrait_encoder, pixel_features, clock),
                                         sigmas=sigmas, device=models.placement.device, dtype=models.placement.dtype,
                                         clock=clock)
        blocks = parts.transformer.blocks
        return Generation(plan=plan, sigmas=sigmas, denoiser=denoiser,
                          latent_shape=(16, inputs.height // 8, inputs.width // 8), vae=decode_vae,
                          decoder=generation_decoder(preset.decoder, models.tiny_decoder), update=update,
                          skip_frames=1,
                          probe_blocks=(blocks[0], blocks[-1]), transformer=parts.transformer, encode_mode=encoded)

    def conditioning(self, job: AnimateJob, inputs: Inputs, models: FlashPortraitModels, latent_frames: int, device):
        """(per-pixel-frame expression features, negative and positive prompt embeddings, CLIP tokens, (the reference
        condition of one window, how it was encoded))."""
        from avatarcli.features.image import clip_features, reference_condition_in_budget
        from avatarcli.features.prompt_cache import prompt_embeddings
        from avatarcli.loading.flashportrait import T5_FILE, TOKENIZER_FOLDER
        from avatarcli.media.video import iter_video_frames
        from avatarcli.models.flashportrait import pixel_frames_for
        from avatarcli.sampling.flashportrait import pixel_features_for_driving, resize_portrait

        preset, parts = job.preset, models.components
        features = models.extractor.extract(iter_video_frames(job.driving, inputs.signal), source=job.driving)
        pixel_features = pixel_features_for_driving(features)[None]  # [1, 4(L-1)+1, 554]
        text = prompt_embeddings(parts, (job.negative_prompt, job.prompt), models.disk_prompts,
                                 models.weights_folder, T5_FILE, TOKENIZER_FOLDER, device, job.keep_text_encoder)
        portrait = resize_portrait(inputs.portrait, preset.max_size, _explicit_size(preset.size))
        image_tokens = clip_features(parts.image_encoder, portrait, inputs.width, inputs.height)
        window_frames = min(WINDOW_LATENT_FRAMES, latent_frames)
        condition = reference_condition_in_budget(parts.vae, portrait, inputs.width, inputs.height,
                                                  pixel_frames_for(window_frames), device, movable=parts.transformer)
        return pixel_features, text, image_tokens, condition


def turbo_files(preset) -> tuple[str, ...]:
    """The files of FlashPortrait's 4-step path that `preset` uses, relative to the weights folder (the download
    fetches them; only a job that uses them requires them)."""
    from avatarcli.loading.lora import FAST_LORA_FILE
    from avatarcli.loading.taehv import FAST_VAE_FILE

    files = [FAST_LORA_FILE] if preset.lora_strength else []
    files += [FAST_VAE_FILE] if preset.decoder == "tiny" else []
    return tuple(f"{FLASHPORTRAIT_FOLDER}/{name}" for name in files)


def _schedule(preset):
    from avatarcli.sampling.step_distill import schedule_for

    try:
        return schedule_for(preset.schedule, preset.steps, preset.shift)
    except ValueError as error:
        raise AvatarError(str(error)) from error


class WindowTokens:
    """A window's grouped expression tokens, charged to the clock's "features" stage."""

    def __init__(self, encoder, pixel_features, clock: StageClock) -> None:
        self.encoder, self.pixel_features, self.clock = encoder, pixel_features, clock

    def __call__(self, window: Window) -> torch.Tensor:
        import torch

        from avatarcli.sampling.flashportrait import window_expression_tokens

        with self.clock("features"), torch.no_grad():
            return window_expression_tokens(self.encoder, self.pixel_features, window)


DRIVER = FlashPortraitDriver()
