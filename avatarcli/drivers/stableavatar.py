"""The audio driver: speech -> StableAvatar (Wan2.1-Fun-1.3B-InP + the time-step-aware audio adapter).

Per job: umT5 prompt embeddings, CLIP tokens and the reference-image latents of the portrait (once), wav2vec2
features per window (when the window first runs). Windows of 21 latent frames (81 video frames), as trained.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from avatarcli.drivers.base import Generation, Inputs
from avatarcli.errors import AvatarError
from avatarcli.media.audio import SAMPLE_RATE
from avatarcli.models.windows import STABLEAVATAR_WINDOW as WINDOW_LATENT_FRAMES

if TYPE_CHECKING:
    import torch

    from avatarcli.job import AnimateJob
    from avatarcli.runtime import StageClock
    from avatarcli.sampling.windows import Window



def window_samples(samples: np.ndarray, window: Window, fps: float) -> np.ndarray:
    """The audio of the window's video frames, zero-padded past the end of the file."""
    first, end = window.video_frames
    lo, hi = round(first * SAMPLE_RATE / fps), round(end * SAMPLE_RATE / fps)
    chunk = samples[lo:hi]
    return np.pad(chunk, (0, hi - lo - len(chunk))) if len(chunk) < hi - lo else chunk


class StableAvatarDriver:
    name = "audio"

    def prepare(self, job: AnimateJob) -> Inputs:
        from avatarcli.limits import MAX_AUDIO_SECONDS
        from avatarcli.media.audio import is_silent, load_audio
        from avatarcli.media.image import load_portrait
        from avatarcli.presets import resolve_checkpoint, resolve_size

        if job.preset.guidance not in ("cfg", "ang"):
            raise AvatarError(f"--guidance {job.preset.guidance} is for a --driving video; --audio uses cfg or ang")
        if job.preset.overlap >= WINDOW_LATENT_FRAMES:
            raise AvatarError(f"--overlap must be below the window of {WINDOW_LATENT_FRAMES} latent frames for "
                              f"--audio, got {job.preset.overlap}")
        if job.preset.decoder != "full" or job.preset.schedule != "flow" or job.preset.lora_strength:
            raise AvatarError("--decoder tiny, the step-distill schedule and its LoRA are FlashPortrait's (--driving)")
        if job.offload != "none" or job.weights_dtype != "auto":
            raise AvatarError("--offload and --weights-dtype apply to a --driving video (the 14B model)")
        portrait = load_portrait(job.portrait)
        samples = load_audio(job.audio, SAMPLE_RATE, max_seconds=MAX_AUDIO_SECONDS)
        width, height = resolve_size(job.preset.size, *portrait.size)
        fps = job.preset.fps
        frames = max(1, round(len(samples) * fps / SAMPLE_RATE))
        if job.model == "demo":
            from avatarcli.demo.model import DEMO_CHECKPOINT

            checkpoint = DEMO_CHECKPOINT  # the demo ships one transformer
        else:
            checkpoint = resolve_checkpoint(job.preset.checkpoint, width, height)
        warnings = ["the audio is silent: the portrait will not speak"] if is_silent(samples) else []
        return Inputs(portrait=portrait, width=width, height=height, frames=frames, fps=fps, audio_track=job.audio,
                      signal=samples, checkpoint=checkpoint, warnings=warnings)

    @staticmethod
    def weights_dir(job: AnimateJob):
        if job.model == "demo":
            from avatarcli.demo.model import demo_weights_dir

            return job.weights or demo_weights_dir()  # embedded unless another demo folder is named: no download
        from avatarcli.hub import resolve_weights

        return resolve_weights("stableavatar", job.weights, job.allow_download)

    @staticmethod
    def prompt_cache(weights, device):
        from avatarcli.features.prompt_cache import PromptCache, encoder_file
        from avatarcli.loading.stableavatar import T5_FILE, text_dtype_for

        return PromptCache(encoder_file(weights / T5_FILE), text_dtype_for(device))

    def models_key(self, job: AnimateJob, inputs: Inputs) -> tuple:
        return (self.name, str(job.weights), inputs.checkpoint, job.device, job.dtype, job.compile, job.model,
                job.precision)

    def load(self, job: AnimateJob, inputs: Inputs, device: torch.device, dtype: torch.dtype):
        from avatarcli.loading.stableavatar import load_stableavatar
        from avatarcli.runtime import quiet_diffusers

        if job.precision == "fp8":
            from avatarcli.models.fp8 import check_fp8_support

            check_fp8_support(device)  # before any weights load
        weights = self.weights_dir(job)
        disk_prompts = self.prompt_cache(weights, device)
        cached = disk_prompts.get((job.negative_prompt, job.prompt)) is not None
        components = load_stableavatar(weights, inputs.checkpoint, device, dtype, with_text_encoder=not cached)
        components.weights_dir, components.disk_prompts = weights, disk_prompts
        with quiet_diffusers():
            if job.compile and device.type == "cuda":
                components.transformer.fuse_qkv_projections()
            if job.precision == "fp8":
                from avatarcli.models.fp8 import use_fp8

                use_fp8(components.transformer)  # after fusing (it quantizes the fused layers), before compiling
            if job.compile and device.type == "cuda":
                components.transformer.compile_repeated_blocks(fullgraph=True)
        return components

    def reuse(self, components, previous_key: tuple, job: AnimateJob, inputs: Inputs, device: torch.device,
              dtype: torch.dtype):
        """Models for `job` from the ones loaded for `previous_key` (a batch switching jobs): when only the checkpoint
        differs, only the transformer is loaded; the VAE, the encoders and the prompt cache are kept. None when
        nothing can be kept."""
        import gc

        import torch

        from avatarcli.loading.transformer import load_stableavatar_transformer

        key = self.models_key(job, inputs)
        if previous_key[:2] + previous_key[3:] != key[:2] + key[3:] or job.compile or job.precision != "auto":
            return None
        components.transformer = None  # free the old DiT before the new one loads
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        weights = self.weights_dir(job)
        components.transformer = load_stableavatar_transformer(weights, inputs.checkpoint, dtype=dtype, device=device)
        return components

    def build(self, job: AnimateJob, inputs: Inputs, components, device: torch.device, dtype: torch.dtype,
              clock: StageClock) -> Generation:
        import torch

        from avatarcli.loading.memory import decode_copy, park_on_host
        from avatarcli.runtime import resolve_dtype
        from avatarcli.sampling.denoiser import StableAvatarDenoiser
        from avatarcli.sampling.guidance import Guidance
        from avatarcli.sampling.schedule import flow_sigmas
        from avatarcli.sampling.windows import latent_frames_for, plan_windows

        preset = job.preset
        with clock("features"), torch.no_grad():
            text, image_tokens, condition = self.portrait_conditioning(job, inputs, components, device)
        # the loaded VAE stays float32: the next job sharing these models encodes its reference with it
        vae = decode_copy(components.vae, resolve_dtype(job.vae_dtype, device))
        if device.type == "cuda":  # not needed until the next job: off the GPU while the DiT runs (2.8 GB at full size)
            park_on_host(components.image_encoder, components.vae if vae is not components.vae else None)
        plan = plan_windows(latent_frames_for(inputs.frames), WINDOW_LATENT_FRAMES, preset.overlap, preset.blend)
        sigmas = flow_sigmas(preset.steps, preset.shift)
        guidance = Guidance(preset.guidance, preset.text_scale, preset.audio_scale, preset.ang_alpha, preset.ang_beta)
        denoiser = StableAvatarDenoiser(components.transformer, guidance, positive_text=text[1:2],
                                        negative_text=text[0:1], image_tokens=image_tokens, condition=condition,
                                        window_audio=WindowAudio(components, inputs, clock), sigmas=sigmas,
                                        clock=clock)
        blocks = components.transformer.blocks
        return Generation(plan=plan, sigmas=sigmas, denoiser=denoiser, vae=vae, transformer=components.transformer,
                          latent_shape=(16, inputs.height // 8, inputs.width // 8),
                          probe_blocks=(blocks[0], blocks[-1]))

    def portrait_conditioning(self, job: AnimateJob, inputs: Inputs, components, device: torch.device):
        """(negative and positive prompt embeddings, CLIP tokens, the reference condition of one window)."""
        from avatarcli.features.image import clip_features, reference_condition
        from avatarcli.features.prompt_cache import prompt_embeddings
        from avatarcli.loading.stableavatar import T5_FILE, TOKENIZER_FOLDER

        text = prompt_embeddings(components, (job.negative_prompt, job.prompt), components.disk_prompts,
                                 WeightsFolder(self, components, job), T5_FILE, TOKENIZER_FOLDER, device,
                                 job.keep_text_encoder)
        # .to(device): a no-op unless an earlier job of a batch parked them on the host (build)
        image_tokens = clip_features(components.image_encoder.to(device), inputs.portrait, inputs.width, inputs.height)
        condition = reference_condition(components.vae.to(device), inputs.portrait, inputs.width, inputs.height,
                                        num_frames=4 * (WINDOW_LATENT_FRAMES - 1) + 1)
        return text, image_tokens, condition


class WeightsFolder:
    """() -> the weights folder the models came from (umT5 is loaded from there when a prompt is not cached)."""

    def __init__(self, driver: StableAvatarDriver, components, job: AnimateJob) -> None:
        self.driver, self.components, self.job = driver, components, job

    def __call__(self):
        return self.components.weights_dir or self.driver.weights_dir(self.job)


class WindowAudio:
    """A window's wav2vec2 features, charged to the clock's "features" stage."""

    def __init__(self, components, inputs: Inputs, clock: StageClock) -> None:
        self.components, self.samples, self.fps, self.clock = components, inputs.signal, inputs.fps, clock

    def __call__(self, window: Window) -> torch.Tensor:
        from avatarcli.features.audio import wav2vec_features

        with self.clock("features"):
            return wav2vec_features(self.components.audio_encoder, self.components.feature_extractor,
                                    window_samples(self.samples, window, self.fps))


DRIVER = StableAvatarDriver()
