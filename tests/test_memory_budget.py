"""The memory budget: which decode mode and text-encoder placement fit the GPU memory left (pure functions of byte
counts), spatial tiles within a stated tolerance of the full decode, `--offload` for the audio driver with the frames
of a run without it, and the modes named by `--json` and forecast by `doctor`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from avatarcli.budget import (
    GIB,
    DecodeMode,
    EncodePlan,
    audio_memory_plan,
    choose_branch_batch,
    choose_decode_mode,
    choose_encode_plan,
    decode_bytes,
    dit_forward_bytes,
    encode_bytes,
    text_encoder_offloaded,
    tile_spans,
    usable_bytes,
)
from avatarcli.decode.stream import StreamingDecoder

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WINDOW_STEP = dit_forward_bytes(21 * 30 * 52, 3, 1536, 8960, 2)  # StableAvatar at 480x832, cfg


# ---- the decisions -----------------------------------------------------------------------------------------------


def test_usable_memory_is_the_free_memory_plus_the_allocators_spare_blocks_within_the_cap():
    assert usable_bytes(free=10, total=100, fraction=1.0, reserved=50, allocated=30) == 30
    assert usable_bytes(free=70 * GIB, total=80 * GIB, fraction=0.1, reserved=3 * GIB, allocated=2 * GIB) == 6 * GIB
    assert usable_bytes(free=0, total=100, fraction=0.1, reserved=20, allocated=20) == 0


@pytest.mark.parametrize("budget_gib,overlap,decoder,mode", [
    (None, "auto", "full", "overlapped"),  # the CPU: no budget to keep
    (None, "off", "full", "inline"),
    (20, "auto", "full", "overlapped"),  # decode and window-step fit together
    (8, "auto", "full", "inline"),  # the decode fits once the window-step has let go of its memory
    (4, "auto", "full", "tiled 2x1"),  # the full frame does not: tiles, fewest first, along the longer side
    (1, "auto", "full", "tiled 3x2"),  # nothing fits: the tiling of the smallest estimate
    (1, "on", "full", "overlapped"),  # asked for
    (1, "auto", "tiny", "inline"),  # the TAEHV decoder does not tile
])
def test_the_decode_mode_is_the_cheapest_that_fits_the_budget(budget_gib, overlap, decoder, mode):
    budget = None if budget_gib is None else budget_gib * GIB
    assert str(choose_decode_mode(budget, 480, 832, 2, WINDOW_STEP, overlap, decoder)) == mode


def test_branches_are_batched_as_far_as_the_budget_allows():
    one = WINDOW_STEP // 3
    assert choose_branch_batch(None, one, 3) is None  # no budget (the CPU): all in one forward
    assert choose_branch_batch(8 * GIB, one, 3) is None
    assert choose_branch_batch(5 * GIB, one, 3) == 2
    assert choose_branch_batch(3 * GIB, one, 3) == 1
    assert choose_branch_batch(1 * GIB, one, 3) == 1  # the fewest there are: the run tries, and says OOM if it fails


@pytest.mark.parametrize("mode", ["cfg", "ang"])
@pytest.mark.parametrize("batch", [1, 2])
def test_forwards_of_fewer_branches_give_the_batched_velocity(mode, batch):
    """Every branch subset runs, the audio-less branch alone too, and the guided velocity is the all-in-one's."""
    from avatarcli.loading.transformer import build_transformer
    from avatarcli.sampling.denoiser import StableAvatarDenoiser
    from avatarcli.sampling.guidance import Guidance
    from avatarcli.sampling.schedule import flow_sigmas
    from avatarcli.sampling.windows import plan_windows
    from avatarcli.testing import TINY_STABLEAVATAR
    from avatarcli.testing.stableavatar import random_state_dict, wan_config

    sizes = TINY_STABLEAVATAR
    model = build_transformer(random_state_dict(sizes, 0, "cpu", torch.float32), wan_config(sizes),
                              dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(0)
    window = plan_windows(5, 5, 1, "linear").windows[0]

    def denoiser():
        text = sizes["text_dim"]
        return StableAvatarDenoiser(model, Guidance(mode), positive_text=torch.randn(1, 4, text, generator=g),
                                    negative_text=torch.randn(1, 4, text, generator=g),
                                    image_tokens=torch.randn(1, 257, sizes["image_dim"], generator=g),
                                    condition=torch.randn(1, 20, 5, 4, 4, generator=g),
                                    window_audio=lambda w: torch.randn(1, 20, 768, generator=g.manual_seed(7)),
                                    sigmas=flow_sigmas(4))

    g.manual_seed(0)
    whole = denoiser()
    g.manual_seed(0)
    split = denoiser()
    split.branch_batch = batch
    latents = torch.randn(1, 16, 5, 4, 4, generator=torch.Generator().manual_seed(3))
    expected, got = whole(window, 0, latents), split(window, 0, latents)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert split.branch_forwards == whole.branch_forwards == 3


def test_tiles_cut_the_working_memory_not_the_caches():
    full, tiled = decode_bytes(480, 832, 2), decode_bytes(480, 832, 2, (2, 2))
    assert 3 * GIB < full < 4 * GIB and 0.7 * full < tiled < 0.8 * full
    assert tile_spans(104, 2) == [(0, 56), (48, 104)] and tile_spans(60, 3) == [(0, 26), (18, 44), (34, 60)]
    assert str(choose_decode_mode(4 * GIB, 832, 480, 2, WINDOW_STEP)) == "tiled 1x2"  # landscape: split the width


def test_the_reference_encode_runs_whole_moves_the_dit_or_tiles_by_the_memory_left():
    need, dit = encode_bytes(480, 832, 4), 3 * GIB
    assert 10.2 * GIB < need < 11 * GIB  # the 81-frame float32 encode at 480x832 (10.2 GiB measured at least)
    assert choose_encode_plan(None, need, dit) == EncodePlan(False, False)  # the CPU
    assert choose_encode_plan(20 * GIB, need, dit) == EncodePlan(False, False)  # a 24 GiB card
    assert choose_encode_plan(10 * GIB, need, dit) == EncodePlan(True, False)  # 16 GiB, the DiT resident
    assert choose_encode_plan(10 * GIB, need, 0) == EncodePlan(False, True)  # the DiT cannot move (offloaded, fp8)
    assert choose_encode_plan(4 * GIB, need, dit) == EncodePlan(True, True)
    assert str(EncodePlan(True, True)) == "tiled, DiT on the host meanwhile" and str(EncodePlan(False, False)) == "whole"


def test_a_longer_reference_clip_adds_its_own_frames_to_the_estimate():
    window = encode_bytes(720, 1280, 4, frames=201)  # a driving-video window: 201 frames
    assert window - encode_bytes(720, 1280, 4) == 3 * 120 * 720 * 1280 * 4  # 120 more frames, 3 values a pixel


def test_umt5_is_offloaded_with_offload_or_where_it_does_not_fit():
    umt5 = round(10.6 * GIB)
    assert not text_encoder_offloaded(None, umt5, "none") and text_encoder_offloaded(None, umt5, "group")
    assert not text_encoder_offloaded(24 * GIB, umt5, "none") and text_encoder_offloaded(8 * GIB, umt5, "none")


def test_doctor_forecasts_the_modes_of_an_audio_run_on_each_gpu(monkeypatch):
    from avatarcli import doctor

    free = {0: 79 * GIB, 1: 8 * GIB}
    for name, value in dict(is_available=lambda: True, device_count=lambda: 2,
                            mem_get_info=lambda index: (free[index], 80 * GIB),
                            get_per_process_memory_fraction=lambda index: 1.0, memory_reserved=lambda index: 0,
                            memory_allocated=lambda index: 0, current_device=lambda: 0).items():
        monkeypatch.setattr(torch.cuda, name, value)
    checks = {check: (status, detail) for check, status, detail in doctor._memory_plan()}
    assert checks["memory plan cuda:0"] == ("ok", "--audio at 480x832: no offload needed, decode overlapped, umT5 on "
                                                  "the GPU")
    assert checks["memory plan cuda:1"] == ("warn", "--audio at 480x832: needs --offload group, decode inline, umT5 "
                                                    "offloaded")
    assert not audio_memory_plan(4 * GIB).fits


# ---- tiles -------------------------------------------------------------------------------------------------------


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


def test_tiled_decode_stays_within_the_stated_tolerance_on_the_trained_demo_vae(one_thread):
    """3 latent frames of a demo-world clip through the demo VAE at 128x128: 2x2 tiles (8 latent pixels of overlap)
    against the untiled stream: 43.3 dB, 99% of the values within 8, none more than 27 off (benchmarks/README.md)."""
    from avatarcli.demo import world
    from avatarcli.demo.model import demo_weights_dir
    from avatarcli.features.image import encode_mode
    from avatarcli.loading.components import load_vae

    vae = load_vae(demo_weights_dir() / "Wan2.1-Fun-V1.1-1.3B-InP" / "Wan2.1_VAE.safetensors")
    frames = world.render_video(1, world.speech(0, 0.4), size=128)[:9]
    video = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    latents = (encode_mode(vae, video) - mean) / std
    full = StreamingDecoder(vae).push(latents)
    tiled = StreamingDecoder(vae, tiles=(2, 2)).push(latents)
    error = np.abs(tiled.astype(int) - full.astype(int))
    assert tiled.shape == full.shape == (9, 128, 128, 3)
    assert psnr(tiled, full) > 43 and np.percentile(error, 99) <= 8 and error.max() <= 32


def test_a_tiled_reference_encode_stays_close_to_the_whole_one_on_the_trained_demo_vae(one_thread):
    """The reference condition of demo faces at 128x128 in 64-pixel tiles (16 pixels of overlap: 9 tiles, the
    overlap's share of diffusers' 256/192 tiles): the reference latents decode to 35.0-36.2 dB of the whole encode's,
    0.4-0.9 dB further from the portrait (28.2-28.9 dB whole; faces 3, 11, 23). The VAE's own tiling setting is
    restored after."""
    from PIL import Image

    from avatarcli.demo import world
    from avatarcli.demo.model import demo_weights_dir
    from avatarcli.features.image import reference_condition
    from avatarcli.loading.components import load_vae

    vae = load_vae(demo_weights_dir() / "Wan2.1-Fun-V1.1-1.3B-InP" / "Wan2.1_VAE.safetensors")
    vae.tile_sample_min_height = vae.tile_sample_min_width = 64
    vae.tile_sample_stride_height = vae.tile_sample_stride_width = 48
    for seed in (3, 11):
        portrait = world.render_video(seed, world.speech(0, 0.04), size=128)[0]
        face = Image.fromarray(portrait)
        whole = reference_condition(vae, face, 128, 128, 13)
        tiled = reference_condition(vae, face, 128, 128, 13, tiled=True)
        assert not vae.use_tiling and torch.equal(reference_condition(vae, face, 128, 128, 13), whole)
        assert tiled.shape == whole.shape and not torch.equal(tiled, whole)
        decoded = [StreamingDecoder(vae).push(c[:, 4:, :1])[0] for c in (whole, tiled)]  # normalised latents
        assert psnr(decoded[1], decoded[0]) > 34.5
        assert psnr(decoded[1], portrait) > psnr(decoded[0], portrait) - 1.0


def test_a_model_on_the_host_has_no_gpu_bytes_to_move_and_stays_there():
    from avatarcli.loading.memory import movable_gpu_bytes, on_host_while

    model = torch.nn.Linear(4, 4)
    assert movable_gpu_bytes(model) == 0 and movable_gpu_bytes(None) == 0  # on the host already
    for move in (False, True):
        with on_host_while(model, torch.device("cpu"), move=move):
            assert model.weight.device.type == "cpu"


def test_a_whole_reference_encode_that_runs_out_of_memory_is_retried_in_tiles(monkeypatch):
    import avatarcli.features.image
    from avatarcli.features.image import reference_condition_in_budget

    calls = []

    def condition(vae, portrait, width, height, frames, tiled=False):
        calls.append(tiled)
        if not tiled:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 884.00 MiB")
        return torch.zeros(1)

    monkeypatch.setattr(avatarcli.features.image, "reference_condition", condition)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    vae = torch.nn.Linear(1, 1)
    condition_, mode = reference_condition_in_budget(vae, None, 64, 64, 81, torch.device("cpu"))
    assert calls == [False, True] and mode == "tiled after a whole encode ran out of memory"


def test_a_tiled_stream_resumes_by_replay_to_the_same_frames(one_thread):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    latents = torch.randn(1, 16, 4, 16, 12, generator=torch.Generator().manual_seed(1))
    whole = StreamingDecoder(vae, cache="auto", tiles=(2, 1))
    expected = [whole.push(latents[:, :, :2]), whole.push(latents[:, :, 2:])]
    first = StreamingDecoder(vae, cache="auto", tiles=(2, 1))
    assert np.array_equal(first.push(latents[:, :, :2]), expected[0])
    state = first.state_dict()
    assert state["cache"] is None  # tiles' caches are rebuilt by the replay
    resumed = StreamingDecoder(vae, cache="auto", tiles=(2, 1))
    resumed.load_state_dict(state)
    assert np.array_equal(resumed.push(latents[:, :, 2:]), expected[1])


# ---- offload and the summary ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from avatarcli.testing import make_tiny_weights

    return make_tiny_weights(tmp_path_factory.mktemp("weights"), model="stableavatar")


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """The first second of the example speech (25 frames: one window)."""
    from avatarcli.media.audio import load_audio, write_wav

    path = tmp_path_factory.mktemp("speech") / "talk.wav"
    write_wav(path, load_audio(EXAMPLES / "speech.wav", 16000)[:16000], 16000)
    return path


def audio_job(weights: Path, speech: Path, tmp_path: Path, **fields):
    from avatarcli.pipeline import AnimateJob
    from avatarcli.presets import load_preset

    preset = load_preset("fast").with_overrides(size="64x64", steps=2)
    return AnimateJob(portrait=EXAMPLES / "portrait.png", audio=speech, output=tmp_path / "o.mp4", preset=preset,
                      weights=weights, device="cpu", null_sink=True, **fields)


def frames_of(job):
    """(the frames of `job` with the audio driver's own load, the loaded models)."""
    from avatarcli.pipeline import animate, prepare
    from avatarcli.sink.memory import MemorySink

    driver, inputs = prepared = prepare(job)
    models = driver.load(job, inputs, torch.device("cpu"), torch.float32)
    text_encoder = models.text_encoder
    sink = MemorySink()
    result = animate(job, models=models, prepared=prepared, sink=sink)
    return sink.frames(), result, models, text_encoder


def test_audio_group_offload_attaches_hooks_and_keeps_the_frames(weights, speech, tmp_path, one_thread):
    """On the CPU the hooks onload to the CPU (no bytes move), but they run on every forward: the wiring is what is
    checked, and that the frames do not change."""
    from avatarcli.loading.memory import has_offload_hooks

    prompt = "a person talks about memory budgets"  # in no cache yet: umT5 is loaded, and placed offloaded
    offloaded, result, models, text_encoder = frames_of(audio_job(weights, speech, tmp_path, offload="group",
                                                                           prompt=prompt))
    assert has_offload_hooks(models.transformer) and has_offload_hooks(text_encoder)
    assert (result.offload, result.decode_mode) == ("group", "inline")
    plain, result, models, _ = frames_of(audio_job(weights, speech, tmp_path, prompt=prompt))
    assert not has_offload_hooks(models.transformer) and result.offload == "none"
    assert len(plain) == result.frames > 0 and np.array_equal(offloaded, plain)


def test_offloaded_umt5_encodes_as_the_resident_one(one_thread):
    from transformers import UMT5Config, UMT5EncoderModel

    from avatarcli.loading.memory import has_offload_hooks, place_text_encoder

    torch.manual_seed(0)
    config = UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    resident, offloaded = UMT5EncoderModel(config).eval(), UMT5EncoderModel(config).eval()
    offloaded.load_state_dict(resident.state_dict())
    assert place_text_encoder(offloaded, "cpu", "group") and has_offload_hooks(offloaded)
    assert not place_text_encoder(resident, "cpu") and not has_offload_hooks(resident)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(offloaded(input_ids=ids).last_hidden_state, resident(input_ids=ids).last_hidden_state)


def test_json_summary_names_the_offload_and_a_tiled_decode(weights, speech, tmp_path, capsys, monkeypatch,
                                                           one_thread):
    """A run whose budget calls for tiles decodes in tiles and says so (the decision itself is tested above)."""
    import avatarcli.budget
    from avatarcli.cli import main

    monkeypatch.setattr(avatarcli.budget, "choose_decode_mode", lambda *args, **kwargs: DecodeMode("tiled", (2, 2)))
    code = main(["animate", str(EXAMPLES / "portrait.png"), "--audio", str(speech), "-o",
                 str(tmp_path / "o.mp4"), "--weights", str(weights), "--size", "128x128", "--steps", "1",
                 "--offload", "model", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and (summary["offload"], summary["decode_mode"]) == ("model", "tiled 2x2")
    assert summary["encode_mode"] == "whole"
