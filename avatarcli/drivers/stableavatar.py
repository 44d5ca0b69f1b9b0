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
    from avatarcli.sampling.windows import Window, WindowPlan



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
        if job.preset.schedule != "flow" or job.preset.lora_strength:
            raise AvatarError("the step-distill schedule and its LoRA are FlashPortrait's (--driving)")
        if job.preset.decoder == "tiny" and job.model == "demo":
            raise AvatarError("--decoder tiny decodes the Wan2.1 latent space; the demo model has its own VAE: use "
                              "--decoder full")
        if job.weights_dtype != "auto":
            raise AvatarError("--weights-dtype applies to a --driving video (the 14B model); for --audio use "
                              "--precision fp8")
        if job.offload != "none" and job.precision == "fp8":
            raise AvatarError("--offload and --precision fp8 do not combine for --audio: choose one")
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

    def window_plan(self, job: AnimateJob, frames: int) -> WindowPlan:
        """The sliding windows of a video of `frames` frames (no model needed)."""
        from avatarcli.sampling.windows import latent_frames_for, plan_windows

        return plan_windows(latent_frames_for(frames), WINDOW_LATENT_FRAMES, job.preset.overlap, job.preset.blend)

    def compile_break_even(self, job: AnimateJob) -> int | None:
        """The 1.3B DiT's measured break-even. The demo model's DiT has 1.7M parameters (a window-step of its 3
        branches is ~0.25 s on 2 CPU cores, milliseconds on a GPU): no job repays the seconds of compiling it."""
        from avatarcli.compilation import BREAK_EVEN_WINDOW_STEPS

        return None if job.model == "demo" else BREAK_EVEN_WINDOW_STEPS

    def models_key(self, job: AnimateJob, inputs: Inputs) -> tuple:
        return (self.name, str(job.weights), inputs.checkpoint, job.device, job.dtype, job.compile, job.model,
                job.precision, job.offload, job.preset.numerics,
                (job.preset.decoder, job.vae_dtype) if job.preset.decoder == "tiny" else None)

    @staticmethod
    def tiny_decoder_file(job: AnimateJob):
        """`fast_vae.pth` (TAEHV) for --decoder tiny: in the --weights folder when it is there, else the `taehv`
        download (the Hub cache, fetched when missing)."""
        from avatarcli.hub import resolve_weights
        from avatarcli.loading.taehv import FAST_VAE_FILE

        if job.weights is not None and (job.weights / FAST_VAE_FILE).is_file():
            return job.weights / FAST_VAE_FILE
        return resolve_weights("taehv", None, job.allow_download) / FAST_VAE_FILE

    def load(self, job: AnimateJob, inputs: Inputs, device: torch.device, dtype: torch.dtype):
        """The models; the DiT on the host when it is offloaded, umT5 (when a prompt is not cached) loaded last, so
        whether it fits the GPU whole is judged beside everything else (`place_models`)."""
        from avatarcli.compilation import compile_blocks
        from avatarcli.loading.components import load_text_encoder
        from avatarcli.loading.stableavatar import T5_FILE, TOKENIZER_FOLDER, load_stableavatar, text_dtype_for
        from avatarcli.models.wan import use_numerics
        from avatarcli.runtime import quiet_diffusers

        if job.precision == "fp8":
            from avatarcli.models.fp8 import check_fp8_support

            check_fp8_support(device)  # before any weights load
        weights = self.weights_dir(job)
        disk_prompts = self.prompt_cache(weights, device)
        cached = disk_prompts.get((job.negative_prompt, job.prompt)) is not None
        offloaded = job.offload != "none"
        components = load_stableavatar(weights, inputs.checkpoint, device, dtype, with_text_encoder=False,
                                       transformer_device="cpu" if offloaded else device)
        components.weights_dir, components.disk_prompts = weights, disk_prompts
        # "auto" is decided before loading (compilation.py); offloaded blocks are not compiled
        compiling = job.compile == "on" and device.type == "cuda" and not offloaded
        use_numerics(components.transformer, job.preset.numerics)  # before compiling
        with quiet_diffusers():
            if compiling:
                components.transformer.fuse_qkv_projections()
            if job.precision == "fp8":
                from avatarcli.models.fp8 import use_fp8

                use_fp8(components.transformer)  # after fusing (it quantizes the fused layers), before compiling
        if compiling:
            compile_blocks(components.transformer)
        if job.preset.decoder == "tiny":
            from avatarcli.loading.taehv import load_tiny_decoder
            from avatarcli.runtime import resolve_dtype

            components.tiny_decoder = load_tiny_decoder(self.tiny_decoder_file(job),
                                                        dtype=resolve_dtype(job.vae_dtype, device), device=device)
        if not cached:
            components.text_encoder, components.tokenizer = load_text_encoder(
                weights / T5_FILE, weights / TOKENIZER_FOLDER, dtype=text_dtype_for(device), device="cpu")
        place_models(components, job.offload, device, dtype)
        return components

    def reuse(self, components, previous_key: tuple, job: AnimateJob, inputs: Inputs, device: torch.device,
              dtype: torch.dtype):
        """Models for `job` from the ones loaded for `previous_key` (a batch switching jobs): when only the checkpoint
        differs, only the transformer is loaded; the VAE, the encoders and the prompt cache are kept. None when
        nothing can be kept."""
        import gc

        import torch

        from avatarcli.loading.transformer import load_stableavatar_transformer
        from avatarcli.models.wan import use_numerics

        key = self.models_key(job, inputs)
        if (previous_key[:2] + previous_key[3:] != key[:2] + key[3:] or job.compile == "on" or job.precision != "auto"
                or job.offload != "none"):
            return None
        components.transformer = None  # free the old DiT before the new one loads
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        weights = self.weights_dir(job)
        components.transformer = load_stableavatar_transformer(weights, inputs.checkpoint, dtype=dtype, device=device)
        use_numerics(components.transformer, job.preset.numerics)
        return components

    def build(self, job: AnimateJob, inputs: Inputs, components, device: torch.device, dtype: torch.dtype,
              clock: StageClock) -> Generation:
        import torch

        from avatarcli.decode.decoders import generation_decoder
        from avatarcli.loading.memory import decode_copy, park_on_host
        from avatarcli.runtime import resolve_dtype
        from avatarcli.sampling.denoiser import StableAvatarDenoiser
        from avatarcli.sampling.guidance import Guidance
        from avatarcli.sampling.schedule import flow_sigmas

        preset = job.preset
        with clock("features"), torch.no_grad():
            text, image_tokens, (condition, encoded) = self.portrait_conditioning(job, inputs, components, device)
        if job.offload == "model":  # off the GPU while the encoders ran; on it from the first window-step on
            components.transformer.to(device)
        # the loaded VAE stays float32: the next job sharing these models encodes its reference with it
        vae = decode_copy(components.vae, resolve_dtype(job.vae_dtype, device))
        if device.type == "cuda":  # not needed until the next job: off the GPU while the DiT runs (2.8 GB at full size)
            park_on_host(components.image_encoder, components.vae if vae is not components.vae else None)
        plan = self.window_plan(job, inputs.frames)
        sigmas = flow_sigmas(preset.steps, preset.shift)
        guidance = Guidance(preset.guidance, preset.text_scale, preset.audio_scale, preset.ang_alpha, preset.ang_beta)
        denoiser = StableAvatarDenoiser(components.transformer, guidance, positive_text=text[1:2],
                                        negative_text=text[0:1], image_tokens=image_tokens, condition=condition,
                                        window_audio=WindowAudio(components, inputs, clock), sigmas=sigmas,
                                        clock=clock)
        blocks = components.transformer.blocks
        return Generation(plan=plan, sigmas=sigmas, denoiser=denoiser, vae=vae, transformer=components.transformer,
                          decoder=generation_decoder(preset.decoder, components.tiny_decoder),
                          latent_shape=(16, inputs.height // 8, inputs.width // 8),
                          probe_blocks=(blocks[0], blocks[-1]), encode_mode=encoded)

    def portrait_conditioning(self, job: AnimateJob, inputs: Inputs, components, device: torch.device):
        """(negative and positive prompt embeddings, CLIP tokens, (the reference condition of one window, how it was
        encoded))."""
        import torch

        from avatarcli.features.image import clip_features, reference_condition_in_budget
        from avatarcli.features.prompt_cache import prompt_embeddings
        from avatarcli.loading.stableavatar import T5_FILE, TOKENIZER_FOLDER

        text = prompt_embeddings(components, (job.negative_prompt, job.prompt), components.disk_prompts,
                                 WeightsFolder(self, components, job), T5_FILE, TOKENIZER_FOLDER, device,
                                 job.keep_text_encoder, job.offload)
        # .to(device): a no-op unless an earlier job of a batch parked them on the host (build)
        image_tokens = clip_features(components.image_encoder.to(device), inputs.portrait, inputs.width, inputs.height)
        if device.type == "cuda":  # CLIP (2.5 GB in float32) off the GPU before the VAE encodes the 81-frame clip
            from avatarcli.loading.memory import park_on_host

            park_on_host(components.image_encoder)
            torch.cuda.empty_cache()
        condition = reference_condition_in_budget(components.vae.to(device), inputs.portrait, inputs.width,
                                                  inputs.height, 4 * (WINDOW_LATENT_FRAMES - 1) + 1, device,
                                                  movable=components.transformer)
        return text, image_tokens, condition


def place_models(components, offload: str, device: torch.device, dtype: torch.dtype) -> None:
    """Put the DiT and umT5, loaded on the host, where they run (loading/memory.py): with `offload` the DiT gets
    diffusers' offloading hooks (`group`, `sequential`: its weights stream to the GPU block by block, or leaf by leaf,
    as its forward reaches them; `model`: the whole DiT moves to the GPU once the encoders are done, `build`), else
    it is already on the device; umT5 runs whole on the device, or offloaded with `offload` or where it does not fit
    beside the rest. The frames are the same either way."""
    from avatarcli.loading.memory import place_text_encoder, place_transformer

    if offload != "none":
        place_transformer(components.transformer, device, offload=offload, compute_dtype=dtype)
    if components.text_encoder is not None:
        place_text_encoder(components.text_encoder, device, offload)


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
