"""The embedded demo model: shipped weights load strictly through the real loaders, `animate --model demo` runs end
to end through the CLI, `demo-face` writes the world's portrait, and the training script's tiny mode runs."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from avatarcli.cli import main
from avatarcli.demo import world
from avatarcli.demo.model import DEMO_SIZE, demo_size, demo_weights_dir
from avatarcli.media.video import probe_video

ROOT = Path(__file__).resolve().parents[1]


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_shipped_weights_are_small_safetensors_in_the_published_layout():
    folder = demo_weights_dir()
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".bin", ".ckpt")]
    for name in ("StableAvatar-1.3B/transformer3d-square.safetensors",
                 "Wan2.1-Fun-V1.1-1.3B-InP/Wan2.1_VAE.safetensors",
                 "Wan2.1-Fun-V1.1-1.3B-InP/config.json",
                 "wav2vec2-base-960h/config.json"):
        assert (folder / name).is_file(), name


def test_shipped_weights_load_strictly_through_the_real_loaders(one_thread):
    from avatarcli.loading.stableavatar import load_stableavatar
    from avatarcli.models.stableavatar import StableAvatarTransformer3DModel

    parts = load_stableavatar(demo_weights_dir(), "square", "cpu", torch.float32)
    assert isinstance(parts.transformer, StableAvatarTransformer3DModel)
    assert parts.transformer.config.num_layers >= 1 and parts.vae.config.z_dim == 16
    # the published layout's names are what the files hold (the loaders convert them; strict on any mismatch)
    from avatarcli.loading.files import read_state_dict

    keys = read_state_dict(demo_weights_dir() / "StableAvatar-1.3B" / "transformer3d-square.pt")
    assert "head.head.weight" in keys and "vocal_projector.proj_model.proj.weight" in keys
    assert "blocks.0.cross_attn.k_vocal.weight" in keys


def test_demo_size_rule():
    assert demo_size(None) == DEMO_SIZE == f"{world.SIZE}x{world.SIZE}"
    assert demo_size("64x64") == "64x64"


def test_demo_face_writes_the_world_portrait(tmp_path, capsys):
    out = tmp_path / "face.png"
    code, _, err = run(["demo-face", "--seed", 3, "-o", out], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(world.portrait(3)))
    code, _, err = run(["demo-face", "-o", tmp_path / "face.jpg"], capsys)
    assert code == 2 and "png" in err


def test_animate_model_demo_end_to_end_through_the_cli(tmp_path, capsys, one_thread):
    face, talk, out = tmp_path / "face.png", tmp_path / "talk.wav", tmp_path / "out.mp4"
    code, _, err = run(["demo-face", "--seed", 1, "-o", face, "--speech", talk, "--seconds", 1], capsys)
    assert code == 0, err
    code, _, err = run(["animate", face, "--audio", talk, "--model", "demo", "--steps", 2, "-o", out, "--quiet"],
                       capsys)
    assert code == 0, err
    info = probe_video(out)
    assert (info["width"], info["height"]) == (world.SIZE, world.SIZE)
    assert info["frames"] == 25 and info["audio_codec"] == "aac"


def test_training_prompt_is_the_pipeline_default():
    from avatarcli.demo.training import PROMPT
    from avatarcli.pipeline import DEFAULT_PROMPT

    assert PROMPT == DEFAULT_PROMPT


def test_training_script_tiny_mode_writes_loadable_weights(tmp_path):
    out = tmp_path / "w"
    # One torch thread, as the CLI subprocesses of the other tests: the tiny run's two threads spin-waited for each
    # other on 2 shared cores (90 s against about 10 s)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_demo.py"), "--out", str(out), "--tiny"],
                            capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "weights load strictly" in result.stdout
    assert (out / "StableAvatar-1.3B" / "transformer3d-square.safetensors").is_file()


def test_export_round_trips_through_the_loaders_value_for_value():
    from avatarcli.demo.training import TrainConfig, export_transformer, export_vae, new_transformer, new_vae, \
        transformer_sizes
    from avatarcli.loading.components import vae_from_state_dict
    from avatarcli.loading.transformer import build_transformer
    from avatarcli.testing.stableavatar import wan_config

    sizes = TrainConfig.tiny().sizes
    torch.manual_seed(0)
    model, vae = new_transformer(sizes), new_vae(sizes)
    loaded = build_transformer(export_transformer(model, sizes), wan_config(transformer_sizes(sizes)))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    loaded_vae = vae_from_state_dict(export_vae(vae, sizes))
    for key, value in vae.state_dict().items():
        torch.testing.assert_close(loaded_vae.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_folded_latent_statistics_normalise_with_the_wan_constants_and_decode_the_same():
    from avatarcli.demo.training import DemoSizes, decode_for_training, fold_latent_statistics, new_vae

    torch.manual_seed(0)
    vae = new_vae(DemoSizes(vae_base=4), per_frame=False).eval()
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    wan_mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    wan_std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        mu = vae.encode(x).latent_dist.mode()
        before = decode_for_training(vae, mu)
        mean, std = mu.mean(dim=(0, 2, 3, 4)), mu.std(dim=(0, 2, 3, 4))
        fold_latent_statistics(vae, mean, std)
        folded = vae.encode(x).latent_dist.mode()
        normalised = (folded - wan_mean) / wan_std
        torch.testing.assert_close(normalised, (mu - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(decode_for_training(vae, folded), before, rtol=1e-4, atol=1e-4)
        # the training decode is diffusers' decode without its final clamp
        torch.testing.assert_close(decode_for_training(vae, folded).clamp(-1, 1), vae.decode(folded).sample)


def test_model_demo_reads_another_demo_folder_when_weights_is_given(tmp_path):
    """`--model demo --weights DIR` tries a retrained demo folder before it replaces the embedded one."""
    from avatarcli.drivers.stableavatar import StableAvatarDriver
    from avatarcli.pipeline import AnimateJob
    from avatarcli.presets import load_preset

    job = AnimateJob(portrait=tmp_path / "p.png", audio=tmp_path / "a.wav", output=tmp_path / "o.mp4",
                     preset=load_preset("balanced"), model="demo")
    assert StableAvatarDriver.weights_dir(job) == demo_weights_dir()
    assert StableAvatarDriver.weights_dir(replace(job, weights=tmp_path)) == tmp_path
