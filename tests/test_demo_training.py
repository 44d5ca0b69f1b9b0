"""Training optimises what inference runs: for one window of one pool video, the demo training forward
(avatarcli.demo.training.dit_velocity with the training's audio slicing, reference condition, CLIP tokens and prompts)
equals the StableAvatar driver's denoiser (cfg at scales 1/1 = the fully conditioned branch), and the saved audio
encoder gives inference the features training used."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image


def test_training_forward_equals_the_inference_denoiser(tmp_path, monkeypatch, one_thread):
    from safetensors.torch import save_file

    import avatarcli.demo.model as demo_model
    from avatarcli.demo import training as T
    from avatarcli.drivers.stableavatar import DRIVER
    from avatarcli.features.image import clip_features
    from avatarcli.features.text import NEGATIVE_PROMPT, encode_prompts
    from avatarcli.loading.components import load_image_encoder, load_text_encoder
    from avatarcli.media.audio import load_audio, write_wav
    from avatarcli.pipeline import AnimateJob
    from avatarcli.presets import load_preset
    from avatarcli.runtime import StageClock
    from avatarcli.testing.components import CLIP_FILE, T5_FILE, T5_TOKENIZER_FOLDER

    config = replace(T.TrainConfig.tiny(), size=64)
    folder = tmp_path / "w"
    T.write_fixed_components(folder, config.sizes, config.seed)
    base = folder / T.BASE
    pool = T.make_pool(config, lambda line: None)
    write_wav(tmp_path / "talk.wav", pool.audio[0].numpy())
    Image.fromarray(pool.portraits[0]).save(tmp_path / "face.png")
    pool.audio[0] = torch.from_numpy(load_audio(tmp_path / "talk.wav"))  # the samples inference decodes

    torch.manual_seed(0)
    wav2vec = T.new_wav2vec(config.sizes).eval()
    vae = T.new_vae(config.sizes).eval()
    T.fold_latent_statistics(vae, torch.randn(16) * 0.1, torch.rand(16) + 0.5)
    model = T.new_transformer(config.sizes).eval()
    with torch.no_grad():  # random everywhere, the zero-initialised audio projections included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    T.save_wav2vec(wav2vec, folder / T.WAV2VEC)
    save_file(T.export_vae(vae, config.sizes), str(base / "Wan2.1_VAE.safetensors"))
    (folder / T.AVATAR).mkdir()
    save_file(T.export_transformer(model, config.sizes), str(folder / T.AVATAR / "transformer3d-square.safetensors"))

    # training side, as train() prepares it
    text_encoder, tokenizer = load_text_encoder(base / T5_FILE, base / T5_TOKENIZER_FOLDER, dtype=torch.float32)
    prompts = encode_prompts(text_encoder, tokenizer, [NEGATIVE_PROMPT, T.PROMPT]).float()
    face = pool.portraits[0]
    tokens = clip_features(load_image_encoder(base / CLIP_FILE), Image.fromarray(face), 64, 64).float()
    with torch.no_grad():
        latents = T.encode_pool(vae, pool)
        conditions = T.reference_conditions(vae, pool.portraits)

    # inference side
    monkeypatch.setattr(demo_model, "demo_weights_dir", lambda: folder)
    preset = load_preset("fast").with_overrides(size="64x64", guidance="cfg", text_scale=1.0, audio_scale=1.0)
    job = AnimateJob(portrait=tmp_path / "face.png", output=tmp_path / "o.mp4", preset=preset,
                     audio=tmp_path / "talk.wav", model="demo", device="cpu", dtype="fp32")
    inputs = DRIVER.prepare(job)
    device = torch.device("cpu")
    parts = DRIVER.load(job, inputs, device, torch.float32)
    gen = DRIVER.build(job, inputs, parts, device, torch.float32, StageClock(device))
    assert [w.start for w in gen.plan.windows] == [0, 1]

    hop = T.world.SAMPLE_RATE // T.world.FPS
    span = T.WINDOW_VIDEO_FRAMES * hop
    gen_noise = torch.Generator().manual_seed(1)
    for window in gen.plan.windows:
        s = window.start
        x0 = latents[:, :, s : s + T.WINDOW]
        clip = pool.audio[:, 4 * s * hop : 4 * s * hop + span]
        with torch.no_grad():
            features = wav2vec(T.normalise_audio(clip)).last_hidden_state
        for step in (0, len(gen.sigmas) - 2):  # the first step and the last
            sigma = gen.sigmas[step].view(1)
            noise = torch.randn(x0.shape, generator=gen_noise)
            xt = (1 - sigma) * x0 + sigma * noise
            with torch.no_grad():
                trained = T.dit_velocity(model, xt, conditions, sigma, prompts[1:2], tokens, features, [0])
                inferred = gen.denoiser(window, step, xt)
                silent = T.dit_velocity(model, xt, conditions, sigma, prompts[1:2], tokens, features * 0, [0])
            torch.testing.assert_close(inferred, trained, rtol=1e-4, atol=1e-4)
            assert (silent - trained).abs().max() > 1e-2  # the audio path matters: a misaligned slice would show
        # the saved and reloaded audio encoder gives inference the features training used
        torch.testing.assert_close(gen.denoiser.window_audio(window), features, rtol=1e-5, atol=1e-5)
    # flow sign: one Euler step to sigma 0 with the training target (noise - x0) lands on x0
    from avatarcli.sampling.schedule import euler_step

    torch.testing.assert_close(euler_step(xt, noise - x0, float(sigma), 0.0), x0, rtol=1e-5, atol=1e-5)
    assert np.isfinite(float(trained.abs().max()))


def test_branch_table_covers_every_guidance_branch_at_its_rates():
    from avatarcli.demo.training.dit import _branch_table, branch_inputs, draw_branches
    from avatarcli.sampling.guidance import Guidance

    table = dict(_branch_table())
    assert abs(sum(table.values()) - 1.0) < 1e-9 and min(table.values()) > 0
    for mode in ("cfg", "ang", "none"):
        assert set(Guidance(mode=mode).branches) <= set(table), mode  # inference runs only trained branches
    drawn = draw_branches(20000, torch.Generator().manual_seed(0))
    for branch, rate in table.items():
        assert abs(sum(b == branch for b in drawn) / len(drawn) - rate) < 0.015, branch
    # what each branch feeds the DiT: prompt row (0 negative, 1 positive), zeroed features, dropped adapter rows
    branches = list(table)
    features = torch.ones(len(branches), 3, 2)
    prompts = torch.stack([torch.zeros(4, 2), torch.ones(4, 2)])
    kept, rows, text = branch_inputs(branches, features, prompts)
    for i, branch in enumerate(branches):
        assert float(text[i].mean()) == float(branch.prompt == "positive")
        assert float(kept[i].abs().sum()) == (0.0 if branch.audio == "silent" else 6.0)
        assert rows[i] == (None if branch.audio == "none" else i)


def test_audio_path_parameters_get_the_audio_learning_rate_scale():
    from avatarcli.demo.training import AUDIO_MODULES, TrainConfig, dit_param_groups, new_transformer

    model = new_transformer(TrainConfig.tiny().sizes)
    groups = dit_param_groups(model, 3.0)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert len(by_id) == len(list(model.parameters()))  # every parameter in exactly one group
    audio = 0
    for name, p in model.named_parameters():
        is_audio = any(part in name for part in AUDIO_MODULES)
        audio += is_audio
        assert by_id[id(p)]["scale"] == (3.0 if is_audio else 1.0), name
        assert by_id[id(p)]["weight_decay"] == (0.01 if p.ndim >= 2 and "norm" not in name
                                                and "modulation" not in name and "scale_shift" not in name else 0.0)
    assert audio > 0 and any("vocal_projector" in n for n, _ in model.named_parameters())
    assert any("attn2.k_vocal" in n for n, _ in model.named_parameters())


def test_dark_pixels_marks_exactly_the_open_mouth_luma():
    """The VAE loss weighs up pixels at most world.DARK_LUMA dark (BT.601 luma, unit range)."""
    from avatarcli.demo import world
    from avatarcli.demo.training import dark_pixels, to_unit

    grey = torch.tensor([0, world.DARK_LUMA, world.DARK_LUMA + 1, 255], dtype=torch.uint8)
    video = grey.view(1, 4, 1, 1).expand(1, 4, 1, 3).contiguous()  # [F=1, H=4, W=1, 3] uint8
    mask = dark_pixels(to_unit(video[None]))
    assert mask.shape == (1, 1, 1, 4, 1)
    assert mask.flatten().tolist() == [1.0, 1.0, 0.0, 0.0]


def test_every_audio_branch_is_trained_under_both_prompts_alike():
    """The prompt carries nothing in the demo world: cfg's text term (b2 - b1) has nothing to learn, and its b0 / b1
    (negative prompt) are trained as often as the positive-prompt branches."""
    from avatarcli.demo.training.dit import _branch_table

    table = dict(_branch_table())
    for audio in ("real", "silent", "none"):
        rates = {b.prompt: rate for b, rate in table.items() if b.audio == audio}
        assert set(rates) == {"positive", "negative"} and rates["positive"] == rates["negative"], audio


def test_a_share_of_dit_windows_starts_at_the_first_latent_frame():
    from avatarcli.demo.training.data import Pool, latent_windows

    latents = torch.arange(40, dtype=torch.float32).view(1, 1, 40, 1, 1).expand(2, 16, 40, 2, 2)
    hop = 16000 // 25
    pool = Pool(videos=None, audio=torch.zeros(2, 40 * 4 * hop), portraits=None, openness=None)
    for first in (0.0, 0.3, 1.0):
        x0, _, clips = latent_windows(pool, latents, 4000, torch.Generator().manual_seed(0), first)
        starts = x0[:, 0, 0, 0, 0]
        share = float((starts == 0).float().mean())
        uniform = (1 - first) / (40 - 21 + 1)  # a uniform start is 0 once in 20
        assert abs(share - (first + uniform)) < 0.03, (first, share)
        assert x0.shape == (4000, 16, 21, 2, 2) and clips.shape[1] == 81 * hop


def test_whole_run_budget_splits_what_is_left_between_vae_and_dit():
    from avatarcli.demo.training import Budget, TrainConfig, estimate

    config = TrainConfig(minutes=9)
    plan = estimate(config)
    assert abs(plan["total"] - (9 * 60 - config.margin_seconds)) < 1e-6
    assert abs(plan["vae"] / plan["dit"] - config.vae_seconds / config.dit_seconds) < 1e-6
    unlimited = estimate(TrainConfig(vae_steps=30, dit_steps=70))
    assert unlimited["vae"] < 30 and unlimited["dit"] < 30  # step counts end these stages first
    budget = Budget(9, start=__import__("time").perf_counter() - 120)  # 2 minutes spent
    assert abs(budget.share(200.0, 100.0, reserve=60.0) - (540 - 120 - 60) * 2 / 3) < 1.0
    assert Budget(None).share(123.0, 1.0, reserve=1e9) == 123.0


def test_float16_export_loads_strictly_and_a_new_vae_starts_with_little_posterior_noise():
    from avatarcli.demo.training import DemoSizes, export_vae, new_vae, posterior_noise
    from avatarcli.loading.components import vae_from_state_dict

    torch.manual_seed(0)
    sizes = DemoSizes(vae_base=4)
    vae = new_vae(sizes).eval()
    state = export_vae(vae, sizes, torch.float16)
    assert {v.dtype for v in state.values()} == {torch.float16}
    loaded = vae_from_state_dict(state, dtype=torch.float32)
    for key, value in vae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value.half().float(), rtol=0, atol=0, msg=key)
    video = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8)
    assert float(posterior_noise(vae, video).max()) < 0.5  # not the std-1 posterior a default init starts with


def test_a_new_vae_trains_on_stills_first_and_a_continued_one_does_not(one_thread):
    """vae_still_share > 0: the first phase feeds single frames (each a stream's first frame) at vae_still_batch;
    a VAE continued from a weights folder (decoder only) keeps to streamed clips."""
    from dataclasses import replace

    import avatarcli.demo.training.vae as V
    from avatarcli.demo.training import TrainConfig, make_pool, new_vae, train_vae

    config = replace(TrainConfig.tiny(), vae_still_share=0.5, vae_still_batch=3, vae_steps=2)
    pool = make_pool(config, lambda line: None)
    shapes = []
    original = V.piece_losses

    def spy(stream, x, *args, **kwargs):
        shapes.append(tuple(x.shape[:3]))
        return original(stream, x, *args, **kwargs)

    V.piece_losses = spy
    try:
        lines: list[str] = []
        train_vae(pool, config, lines.append)
        assert shapes[:2] == [(3, 3, 1), (3, 3, 1)] and all(s[0] == config.vae_batch for s in shapes[2:])
        assert any(line.startswith("vae stills: 2 steps") for line in lines)
        shapes.clear()
        train_vae(pool, config, lines.append, vae=new_vae(config.sizes))
        assert shapes and all(s[0] == config.vae_batch for s in shapes)
    finally:
        V.piece_losses = original


def test_a_new_vae_can_spend_a_share_of_its_time_on_the_decoder_alone(one_thread):
    """vae_decoder_share: the whole VAE trains for the rest of the time, its latent statistics are folded in, then
    only its decoder side trains on (the encoder, and so the DiT's latents, stay as they were)."""
    from dataclasses import replace

    import avatarcli.demo.training.run as R
    from avatarcli.demo.training import Budget, TrainConfig, make_pool

    config = replace(TrainConfig.tiny(), vae_decoder_share=0.25, vae_seconds=100.0, vae_steps=2)
    pool = make_pool(config, lambda line: None)
    calls, encoders = [], []
    original = R.train_vae

    def spy(pool, config, log, vae=None, seconds=None):
        calls.append((vae is None, seconds, config.vae_lr))
        out = original(pool, config, log, vae=vae, seconds=seconds)
        encoders.append({k: v.clone() for k, v in out.encoder.state_dict().items()})
        return out

    R.train_vae = spy
    try:
        R.audio_encoder_and_vae(pool, config, lambda line: None, torch.device("cpu"), Budget(None))
    finally:
        R.train_vae = original
    assert calls == [(True, 75.0, config.vae_lr), (False, 25.0, config.vae_decoder_lr)]
    for key, value in encoders[1].items():
        assert torch.equal(value, encoders[0][key]), key


def test_a_run_stopped_after_its_vae_goes_on_from_there(tmp_path, one_thread):
    """train(stop_after="vae") writes the VAE and the audio encoder with the progress file and ends; the next train()
    of the same config into the folder takes them up (the VAE file is not rewritten) and finishes the folder; another
    config is refused."""
    from dataclasses import replace

    from avatarcli.demo.training import TrainConfig, train, verify
    from avatarcli.demo.training.run import PROGRESS, VAE_FILE

    config, out = TrainConfig.tiny(), tmp_path / "w"
    first = train(out, config, stop_after="vae")
    vae_file = out / "Wan2.1-Fun-V1.1-1.3B-InP" / VAE_FILE
    written = vae_file.read_bytes()
    assert first["stopped_after"] == "vae" and (out / PROGRESS).exists()
    assert not (out / "StableAvatar-1.3B").exists()
    with pytest.raises(ValueError, match="other settings"):
        train(out, replace(config, seed=1))
    second = train(out, config)
    assert second["resumed_after_seconds"] == pytest.approx(first["seconds"], abs=0.1)
    assert not (out / PROGRESS).exists() and vae_file.read_bytes() == written
    verify(out)
