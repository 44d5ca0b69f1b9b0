"""Helpers shared by the benchmark scripts in this folder.

The scripts import from here (`from common import ...`) and from `avatarcli`, never from each other. Running
`python benchmarks/bench_x.py` puts this folder on sys.path; avatarcli itself must be installed (`pip install -e .`)
or on PYTHONPATH.

- paths: ROOT (the repository), EXAMPLES (its example portrait and speech);
- timing: synchronize, timed (CUDA events on a GPU, perf_counter on the CPU);
- inputs: synthetic_speech, full_size_components (every StableAvatar component at its real size, random weights);
- decoders: build_decoders, stream, random_latents, timed_decode (the full Wan VAE and the tiny TAEHV decoder through
  the pipeline's streaming interface);
- sampling: run (the window sampler with NFE counting), UniPCWindows, model_setup (a weights folder set up as the
  pipeline does for one clip).
"""

from __future__ import annotations

import copy
import time
import wave
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


# --- timing -----------------------------------------------------------------------------------------------------


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, warmup: int, repeat: int, device: torch.device) -> list[float]:
    """Seconds of each of `repeat` calls of `fn` after `warmup` untimed ones (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times


# --- inputs -----------------------------------------------------------------------------------------------------


def synthetic_speech(path: Path, seconds: float, pitch: float = 160.0) -> Path:
    """A 16 kHz mono WAV: a `pitch` Hz tone whose loudness swings at 4 Hz (syllable-like)."""
    sr = 16000
    t = np.arange(int(seconds * sr)) / sr
    voice = 0.3 * np.sin(2 * np.pi * pitch * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes((voice * 32767).astype(np.int16).tobytes())
    return path


def full_size_components(device: torch.device, dtype: torch.dtype, tokenizer_dir: Path, tiny: bool,
                         on_host: tuple[str, ...] = ()):
    """StableAvatarComponents with random weights: the DiT through the strict loading code of the published
    checkpoint, VAE, umT5-XXL, CLIP ViT-H/14 and wav2vec2-base from their real configs (`tiny`: toy sizes).
    `on_host`: "transformer" and/or "text_encoder", built on the CPU instead (where the audio driver loads them
    before placing them: drivers/stableavatar.py `place_models`)."""
    from diffusers import AutoencoderKLWan
    from transformers import (AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel,
                              Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model)

    from avatarcli.loading.stableavatar import StableAvatarComponents
    from avatarcli.loading.transformer import build_transformer
    from avatarcli.testing import TINY_STABLEAVATAR
    from avatarcli.testing.stableavatar import FULL_SIZE, random_state_dict, wan_config

    sizes = TINY_STABLEAVATAR if tiny else FULL_SIZE
    dit_device = torch.device("cpu") if "transformer" in on_host else device
    transformer = build_transformer(random_state_dict(sizes, 0, str(dit_device), dtype), wan_config(sizes),
                                    dtype=dtype, device=dit_device)
    with torch.device(device):
        if tiny:
            vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
            t5 = UMT5EncoderModel(UMT5Config(vocab_size=256, d_model=sizes["text_dim"], d_kv=8, d_ff=64,
                                             num_layers=1, num_heads=4))
            clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=sizes["image_dim"], intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=2, image_size=224,
                                                    patch_size=14))
            wav2vec = Wav2Vec2Model(Wav2Vec2Config(num_hidden_layers=1, intermediate_size=64))
        else:
            vae = AutoencoderKLWan()  # the Wan2.1 VAE configuration
            t5_config = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
            t5 = None if "text_encoder" in on_host else UMT5EncoderModel(t5_config).to(torch.bfloat16)
            clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                    num_attention_heads=16, image_size=224, patch_size=14,
                                                    hidden_act="gelu"))
            wav2vec = Wav2Vec2Model(Wav2Vec2Config())  # wav2vec2-base

    if "text_encoder" in on_host:
        t5 = host_umt5(t5_config) if not tiny else t5.cpu()
    else:
        t5 = t5.to(device)
    # .to(device) again: some modules create parameters with legacy constructors that ignore the device context.
    return StableAvatarComponents(
        transformer=transformer, vae=vae.to(device).eval(), text_encoder=t5.eval(),
        tokenizer=AutoTokenizer.from_pretrained(str(tokenizer_dir)), image_encoder=clip.to(device).eval(),
        audio_encoder=wav2vec.to(device).eval(),
        feature_extractor=Wav2Vec2FeatureExtractor(return_attention_mask=False))


def host_umt5(config) -> torch.nn.Module:
    """umT5-XXL in bf16 on the CPU, quickly: built without initialising, then filled by repeating one random block
    (11 GB of normal draws would take minutes on the CPU; the values do not matter for time or memory)."""
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(config).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    block = (torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            flat = parameter.view(-1)
            for start in range(0, flat.numel(), block.numel()):
                piece = flat[start : start + block.numel()]
                piece.copy_(block[: piece.numel()])
    model.tie_weights()
    return model


# --- decoders ---------------------------------------------------------------------------------------------------

TINY_WAN_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                    temperal_downsample=[False, True, True])


def build_decoders(tiny: bool, device: torch.device, dtype: torch.dtype):
    """(full Wan2.1 VAE, tiny TAEHV decoder), random weights (`tiny`: toy sizes)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLWan(**TINY_WAN_VAE) if tiny else AutoencoderKLWan()  # the default config is Wan2.1's
    vae = (vae if dtype == torch.float32 else vae.to(dtype)).eval().requires_grad_(False)
    return vae, build_tiny_vae(tiny, device, dtype)


def build_tiny_vae(tiny: bool, device: torch.device, dtype: torch.dtype):
    """The tiny TAEHV decoder (FlashPortrait's fast_vae.pth) at its published widths, random weights (`tiny`: toy
    widths)."""
    from avatarcli.loading.taehv import build_tiny_decoder
    from avatarcli.models.taehv import TAEHVConfig
    from avatarcli.testing.flashportrait_turbo import TINY_TAEHV, tiny_fast_vae_state_dict

    state = tiny_fast_vae_state_dict(TINY_TAEHV if tiny else TAEHVConfig(), encoder_width=8 if tiny else 64)
    return build_tiny_decoder(state, source="random TAEHV", dtype=dtype, device=device)


def stream(decoder, latents: torch.Tensor, chunk: int, device: torch.device) -> tuple[np.ndarray, float, float]:
    """Frames, seconds and peak GiB of one streamed decode."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        pieces = [decoder.push(latents[:, :, s : s + chunk]) for s in range(0, latents.shape[2], chunk)]
    synchronize(device)
    seconds = time.perf_counter() - start
    decoder.close()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return np.concatenate(pieces), seconds, peak


def random_latents(latent_frames: int, width: int, height: int, device: torch.device) -> torch.Tensor:
    return torch.randn(1, 16, latent_frames, height // 8, width // 8,
                       generator=torch.Generator().manual_seed(1)).to(device)


def timed_decode(kind: str, vae, tiny_vae, latents: torch.Tensor, chunk: int,
                 device: torch.device) -> tuple[np.ndarray, float, float]:
    """Frames, seconds and peak GiB of one streamed decode with the `kind` decoder, after a 2-latent warm-up."""
    from avatarcli.decode.decoders import streaming_decoder

    decoder = streaming_decoder(kind, vae=vae, tiny_vae=tiny_vae)
    stream(decoder, latents[:, :, : min(2, latents.shape[2])], chunk, device)
    return stream(decoder, latents, chunk, device)


# --- sampling ---------------------------------------------------------------------------------------------------


def run(plan, sigmas, noise, denoise, predictor=None, streaming=False, probe=None):
    """Final latents and transformer calls per window of the joint loop (or the streaming wavefront). `probe`: the
    step predictor's per-layer signal (a BlockProbe, or any () -> (first, last) summaries), if any."""
    from avatarcli.sampling.predict import CountedDenoiser
    from avatarcli.sampling.sampler import sample_joint, sample_streaming

    counted = CountedDenoiser(denoise)
    velocity = predictor.bind(counted, sigmas, probe=probe) if predictor is not None else counted
    if streaming:
        chunks = sample_streaming(plan, sigmas, lambda s, e: noise[:, :, s:e], velocity)
        out = torch.cat([c.latents for c in chunks], dim=2)
    else:
        out = sample_joint(plan, sigmas, noise, velocity)
    return out, counted.calls / len(plan.windows)


class UniPCWindows:
    """diffusers' UniPCMultistepScheduler (flow mode) as a window Denoiser: one scheduler per window, and the
    velocity handed to the sampler's Euler step is the one that lands on UniPC's next sample."""

    def __init__(self, denoise, steps: int, shift: float, order: int = 2):
        from diffusers import UniPCMultistepScheduler

        self.denoise = denoise
        self.template = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                flow_shift=shift, solver_order=order, num_train_timesteps=1000)
        self.template.set_timesteps(steps)
        self.sigmas = self.template.sigmas.float()
        self.schedulers: dict[int, object] = {}

    def __call__(self, window, step, latents):
        sched = self.schedulers.setdefault(window.index, copy.deepcopy(self.template))
        v = self.denoise(window, step, latents)
        nxt = sched.step(v, sched.timesteps[step], latents, return_dict=False)[0]
        if step == len(sched.timesteps) - 1:
            del self.schedulers[window.index]
        return (nxt - latents) / (self.sigmas[step + 1] - self.sigmas[step])


def model_setup(weights, portrait, audio, size: str, device, dtype):
    """A StableAvatar weights folder set up as the pipeline does for one clip, under the `reference` preset: the
    window plan, the seeded noise, `denoiser(sigmas)` (the pipeline's StableAvatarDenoiser; wav2vec2 features
    computed once per window) and `frames(latents)` (the decoded uint8 frames)."""
    from types import SimpleNamespace

    from avatarcli.decode.stream import decode_all
    from avatarcli.drivers.stableavatar import WINDOW_LATENT_FRAMES, window_samples
    from avatarcli.features.audio import wav2vec_features
    from avatarcli.features.image import clip_features, reference_condition
    from avatarcli.features.text import encode_prompts
    from avatarcli.loading.stableavatar import load_stableavatar
    from avatarcli.pipeline import AnimateJob, frame_noise, prepare
    from avatarcli.presets import load_preset
    from avatarcli.sampling.denoiser import StableAvatarDenoiser
    from avatarcli.sampling.guidance import Guidance
    from avatarcli.sampling.windows import latent_frames_for, plan_windows

    ref = load_preset("reference").with_overrides(size=size, checkpoint="auto")
    job = AnimateJob(portrait=portrait, audio=audio, output=Path("unused.mp4"), preset=ref, null_sink=True)
    _, inputs = prepare(job)
    c = load_stableavatar(weights, inputs.checkpoint, device, dtype)
    text = encode_prompts(c.text_encoder, c.tokenizer, [job.negative_prompt, job.prompt], device=device)
    image_tokens = clip_features(c.image_encoder, inputs.portrait, inputs.width, inputs.height)
    condition = reference_condition(c.vae, inputs.portrait, inputs.width, inputs.height,
                                    num_frames=4 * (WINDOW_LATENT_FRAMES - 1) + 1)
    plan = plan_windows(latent_frames_for(inputs.frames), WINDOW_LATENT_FRAMES, ref.overlap, ref.blend)
    guidance = Guidance(ref.guidance, ref.text_scale, ref.audio_scale)
    noise = frame_noise(ref.seed, 0, plan.latent_frames, (16, inputs.height // 8, inputs.width // 8), device)
    features: dict[int, torch.Tensor] = {}

    def window_audio(window):
        if window.index not in features:
            features[window.index] = wav2vec_features(c.audio_encoder, c.feature_extractor,
                                                      window_samples(inputs.signal, window, ref.fps))
        return features[window.index]

    def denoiser(sigmas):
        return StableAvatarDenoiser(c.transformer, guidance, positive_text=text[1:2], negative_text=text[0:1],
                                    image_tokens=image_tokens, condition=condition, window_audio=window_audio,
                                    sigmas=sigmas)

    def frames(latents):
        return torch.from_numpy(decode_all(c.vae, latents.to(c.vae.dtype)))

    return SimpleNamespace(ref=ref, inputs=inputs, components=c, plan=plan, noise=noise, denoiser=denoiser,
                           frames=frames)
