"""Step prediction in the sliding-window sampler: exactness, re-anchoring, NFE, determinism, presets and flags."""

from __future__ import annotations

import itertools

import pytest
import torch

from avatarcli.errors import AvatarError
from avatarcli.presets import load_preset
from avatarcli.sampling.predict import BlockProbe, CountedDenoiser, Prediction, extrapolate
from avatarcli.sampling.sampler import sample_joint, sample_streaming
from avatarcli.sampling.schedule import flow_sigmas
from avatarcli.sampling.windows import plan_windows

WINDOW = 21


def toy_denoiser(channels: int = 4, seed: int = 0):
    """Nonlinear in the latents, different per window and step (as in test_sampler.py)."""
    mix = torch.randn(channels, channels, generator=torch.Generator().manual_seed(seed))

    def denoise(window, step, x):
        y = torch.einsum("bcfhw,cd->bdfhw", x, mix)
        return torch.tanh(y) * (1 + 0.1 * window.index) + 0.05 * step + x.mean(dim=2, keepdim=True)

    return denoise


def smooth_denoiser(sigmas, channels: int = 4):
    """A velocity that depends smoothly on sigma and (weakly) on the latents: prediction has something to do."""
    base = torch.randn(1, channels, 1, 2, 3, generator=torch.Generator().manual_seed(3))

    def denoise(window, step, x):
        s = float(sigmas[step])
        return base * (1 + s + 0.5 * s * s) - 0.05 * x + 0.01 * window.index

    return denoise


def polynomial_velocity(sigmas, degree: int, channels: int = 4):
    """v(sigma) = sum_k a_k sigma^k, independent of the latents: the latent path is a polynomial in sigma."""
    g = torch.Generator().manual_seed(7)
    coefficients = [torch.randn(1, channels, 1, 2, 3, generator=g, dtype=torch.float64) for _ in range(degree + 1)]

    def denoise(window, step, x):
        s = float(sigmas[step])
        v = sum(a * s**k for k, a in enumerate(coefficients))
        return v.expand(1, channels, x.shape[2], 2, 3).to(x.dtype)

    return denoise


def noise_for(plan, channels: int = 4, dtype=torch.float32):
    return torch.randn(1, channels, plan.latent_frames, 2, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)


def streamed(plan, sigmas, noise, denoise, predictor=None):
    chunks = sample_streaming(plan, sigmas, lambda s, e: noise[:, :, s:e], denoise, predictor=predictor)
    return torch.cat([c.latents for c in chunks], dim=2)


def predicted_runs(trace, window):
    flags = [p for w, _, p in trace if w == window]
    return [len(list(group)) for flag, group in itertools.groupby(flags) if flag]


def test_reference_preset_has_no_prediction_and_matches_the_plain_sampler_bit_for_bit():
    preset = load_preset("reference")
    assert preset.prediction is None
    plan = plan_windows(60, WINDOW, preset.overlap, preset.blend)
    sigmas, noise, denoise = flow_sigmas(8), noise_for(plan), toy_denoiser()
    plain = sample_joint(plan, sigmas, noise, denoise)
    assert torch.equal(sample_joint(plan, sigmas, noise, denoise, predictor=preset.prediction), plain)
    assert torch.equal(streamed(plan, sigmas, noise, denoise, preset.prediction), plain)


def test_prediction_that_never_trusts_itself_computes_every_step_identically():
    plan = plan_windows(40, WINDOW, 5, "log")
    sigmas, noise, denoise = flow_sigmas(10), noise_for(plan), toy_denoiser()
    counted = CountedDenoiser(denoise)
    out = sample_joint(plan, sigmas, noise, counted, predictor=Prediction(tolerance=1e-30))
    assert torch.equal(out, sample_joint(plan, sigmas, noise, denoise))
    assert counted.calls == 10 * len(plan.windows)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_polynomial_trajectory_of_degree_up_to_the_order_is_predicted_exactly(order):
    plan = plan_windows(37, WINDOW, 5, "log")
    sigmas = flow_sigmas(30)
    noise = noise_for(plan, dtype=torch.float64)
    denoise = polynomial_velocity(sigmas, order)
    bound = Prediction(order=order, max_predicted=6, tolerance=1e-6, warmup=2).bind(CountedDenoiser(denoise), sigmas)
    bound.trace = []
    predicted = sample_joint(plan, sigmas, noise, bound)
    assert bound.predicted_steps > len(plan.windows) * 30 // 2  # most steps were skipped
    assert torch.allclose(predicted, sample_joint(plan, sigmas, noise, denoise), rtol=0, atol=1e-9)


def test_a_trajectory_of_higher_degree_than_the_order_is_not_predicted_exactly():
    plan = plan_windows(21, WINDOW, 5, "log")
    sigmas = flow_sigmas(30)
    noise = noise_for(plan, dtype=torch.float64)
    denoise = polynomial_velocity(sigmas, 3)
    predicted = sample_joint(plan, sigmas, noise, denoise, predictor=Prediction(order=1, tolerance=1.0))
    assert (predicted - sample_joint(plan, sigmas, noise, denoise)).abs().max() > 1e-6


def test_extrapolation_reproduces_a_cubic_from_four_points():
    nodes = [0.9, 0.8, 0.65, 0.5]
    cubic = lambda s: torch.tensor([1 - 2 * s + 3 * s**2 - s**3], dtype=torch.float64)  # noqa: E731
    value = extrapolate(nodes, [cubic(s) for s in nodes], 0.2)
    assert torch.allclose(value, cubic(0.2), atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_a_full_step_reanchors_after_at_most_k_predicted_steps(k):
    plan = plan_windows(40, WINDOW, 5, "log")
    sigmas = flow_sigmas(40)
    # a linear velocity has zero estimated error, so every jump runs to the cap
    bound = Prediction(order=2, max_predicted=k, tolerance=0.5).bind(polynomial_velocity(sigmas, 1), sigmas)
    bound.trace = []
    sample_joint(plan, sigmas, noise_for(plan), bound)
    for window in range(len(plan.windows)):
        runs = predicted_runs(bound.trace, window)
        assert runs and max(runs) == k
        flags = [p for w, _, p in bound.trace if w == window]
        assert not any(flags[:2])  # warm-up steps are full


def test_jumps_shrink_where_the_velocity_bends():
    plan = plan_windows(21, WINDOW, 5, "log")
    sigmas = flow_sigmas(40)
    settings = Prediction(order=2, max_predicted=8, tolerance=1e-3)
    straight = settings.bind(CountedDenoiser(polynomial_velocity(sigmas, 2)), sigmas)
    bent = settings.bind(CountedDenoiser(toy_denoiser()), sigmas)
    sample_joint(plan, sigmas, noise_for(plan), straight)
    sample_joint(plan, sigmas, noise_for(plan), bent)
    assert straight.full_steps < bent.full_steps


def test_nfe_counts_every_call_of_a_counted_stub():
    plan = plan_windows(60, WINDOW, 8, "log")
    sigmas = flow_sigmas(20)
    calls = []

    def stub(window, step, x):
        calls.append((window.index, step))
        return smooth_denoiser(sigmas)(window, step, x)

    counted = CountedDenoiser(stub)
    bound = Prediction(order=2, max_predicted=4, tolerance=0.02).bind(counted, sigmas)
    sample_joint(plan, sigmas, noise_for(plan), bound)
    assert counted.calls == len(calls) == bound.full_steps
    assert bound.full_steps + bound.predicted_steps == 20 * len(plan.windows)
    assert 0 < bound.predicted_steps and len(set(calls)) == len(calls)


def test_per_window_state_is_dropped_when_the_window_finishes():
    plan = plan_windows(80, WINDOW, 5, "log")
    sigmas = flow_sigmas(10)
    bound = Prediction().bind(smooth_denoiser(sigmas), sigmas)
    live = []

    def watch(window, step, x):
        live.append(len(bound.windows))
        return bound(window, step, x)

    list(sample_streaming(plan, sigmas, lambda s, e: noise_for(plan)[:, :, s:e], watch))
    assert not bound.windows
    assert max(live) <= 10 + 2  # bounded by the steps, like the wavefront itself


@pytest.mark.parametrize("length,overlap", [(21, 5), (40, 5), (63, 10), (100, 8)])
def test_streaming_equals_joint_with_prediction_on(length, overlap):
    plan = plan_windows(length, WINDOW, overlap, "log")
    sigmas, noise = flow_sigmas(25), noise_for(plan)
    settings = Prediction(order=3, max_predicted=4, tolerance=0.02, layer_ratio=2.0)
    denoise = smooth_denoiser(sigmas)
    joint = sample_joint(plan, sigmas, noise, denoise, predictor=settings)
    assert torch.equal(streamed(plan, sigmas, noise, denoise, settings), joint)
    assert torch.equal(sample_joint(plan, sigmas, noise, denoise, predictor=settings), joint)  # deterministic
    assert not torch.equal(joint, sample_joint(plan, sigmas, noise, denoise))  # prediction did something


def test_layer_probe_whose_change_ratio_grows_shortens_the_jumps():
    plan = plan_windows(21, WINDOW, 5, "log")
    sigmas = flow_sigmas(40)
    denoise = smooth_denoiser(sigmas)

    def probe_for(jump: float):
        state = {"first": 1.0, "last": 1.0, "n": 0}

        def probed(window, step, x):
            # the first block's output changes by 0.1% per call, the last block's by 0.1% or, every other call,
            # by `jump` times that: the change ratio keeps jumping by that factor
            state["n"] += 1
            state["first"] *= 1.001
            state["last"] *= 1 + 0.001 * (jump if state["n"] % 2 else 1.0)
            return denoise(window, step, x)

        def probe():
            return torch.full((4,), state["first"]), torch.full((4,), state["last"])

        return probed, probe

    settings = Prediction(order=2, max_predicted=8, tolerance=1e-4, layer_ratio=2.0)
    steady_denoise, steady_probe = probe_for(1.0)
    growing_denoise, growing_probe = probe_for(10.0)
    steady = settings.bind(CountedDenoiser(steady_denoise), sigmas, probe=steady_probe)
    growing = settings.bind(CountedDenoiser(growing_denoise), sigmas, probe=growing_probe)
    unprobed = settings.bind(CountedDenoiser(denoise), sigmas)
    for bound in (steady, growing, unprobed):
        sample_joint(plan, sigmas, noise_for(plan), bound)
    assert steady.full_steps == unprobed.full_steps < growing.full_steps


def test_block_probe_keeps_a_strided_sample_of_the_first_and_last_block_outputs():
    blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)])
    probe = BlockProbe(blocks[0], blocks[-1], tokens=4)
    x = torch.randn(2, 16, 8)
    first = blocks[0](x)
    last = blocks[2](blocks[1](first))
    kept = probe()
    assert torch.equal(kept[0], first[:, ::4]) and torch.equal(kept[1], last[:, ::4])
    probe.close()
    blocks[0](x)
    assert probe() is None


# ---- presets and flags -----------------------------------------------------------------------------------------


def test_speed_presets_predict_increasingly_aggressively():
    from avatarcli.compilation import computed_steps_per_window

    presets = [load_preset(n) for n in ("quality", "balanced", "fast", "live")]
    assert all(preset.prediction for preset in presets)
    assert [p.prediction.tolerance for p in presets] == sorted(p.prediction.tolerance for p in presets)
    computed = [computed_steps_per_window(preset) for preset in presets]
    assert computed == sorted(computed, reverse=True) and len(set(computed)) == 4


PRESET_HEAD = "description: t\nsteps: 20\nguidance: cfg\noverlap: 6\nblend: log\nsize: auto\nfps: 25\n"


@pytest.mark.parametrize("section, message", [
    ("prediction:\n  order: 4\n", "prediction.order' must be an integer from 1 to 3"),
    ("prediction:\n  max_predicted: 0\n", "prediction.max_predicted"),
    ("prediction:\n  tolerance: 0\n", "prediction.tolerance"),
    ("prediction:\n  tolerance: fast\n", "prediction.tolerance"),
    ("prediction:\n  warmup: 1\n", "prediction.warmup"),
    ("prediction:\n  layer_ratio: -1\n", "prediction.layer_ratio"),
    ("prediction:\n  skip: 3\n", "unknown key 'prediction.skip'"),
    ("prediction: yes\n", "'prediction' must be null or a mapping"),
])
def test_preset_files_validate_the_prediction_section(tmp_path, section, message):
    path = tmp_path / "p.yaml"
    path.write_text(PRESET_HEAD + section, encoding="utf-8")
    with pytest.raises(AvatarError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_preset(path)


def test_prediction_flags_override_the_preset():
    preset = load_preset("balanced")
    assert preset.with_prediction(False).prediction is None
    tuned = preset.with_prediction(None, max_predicted=7, tolerance=0.5)
    assert (tuned.prediction.max_predicted, tuned.prediction.tolerance) == (7, 0.5)
    assert tuned.prediction.order == preset.prediction.order
    assert load_preset("reference").with_prediction(True).prediction == Prediction()
    with pytest.raises(AvatarError):
        preset.with_prediction(None, order=9)
    with pytest.raises(AvatarError):
        preset.with_prediction(False, tolerance=0.1)


# ---- through the CLI, on tiny random weights ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from avatarcli.testing import make_tiny_weights

    return make_tiny_weights(tmp_path_factory.mktemp("weights"), model="stableavatar")


def animate_json(tmp_path, weights, capsys, *flags):
    import json
    from pathlib import Path

    from avatarcli.cli import main

    examples = Path(__file__).resolve().parents[1] / "examples"
    code = main([str(a) for a in ["animate", examples / "portrait.png", "--audio", examples / "speech.wav", "-o",
                                  tmp_path / "out.mp4", "--weights", weights, "--size", "64x64", "--json",
                                  "--overwrite", *flags]])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


def test_json_reports_the_transformer_forwards(tmp_path, weights, capsys, one_thread):
    code, full, _ = animate_json(tmp_path, weights, capsys, "--steps", "6", "--no-predict")
    assert code == 0 and full["nfe"] == 6 * full["windows"]
    code, predicted, _ = animate_json(tmp_path, weights, capsys, "--steps", "6", "--predict", "--predict-order", "1",
                                      "--predict-max", "2", "--predict-tolerance", "1")
    assert code == 0 and predicted["windows"] == full["windows"]
    assert full["windows"] * 2 <= predicted["nfe"] < full["nfe"]  # warm-up steps computed, later ones predicted
    assert predicted["frames"] == full["frames"]


@pytest.mark.parametrize("flags, message", [
    (["--predict-order", "5"], "prediction.order"),
    (["--predict-tolerance", "0"], "prediction.tolerance"),
    (["--predict-max", "0"], "prediction.max_predicted"),
    (["--no-predict", "--predict-max", "3"], "prediction off"),
])
def test_bad_prediction_flags_exit_2_with_one_line(tmp_path, weights, capsys, flags, message):
    code, _, err = animate_json(tmp_path, weights, capsys, "--steps", "2", *flags)
    assert code == 2
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.parametrize("section, message", [
    ("prediction:\n  order: 0\n", "prediction.order"),
    ("prediction:\n  jump: 4\n", "unknown key 'prediction.jump'"),
])
def test_preset_file_with_a_bad_prediction_section_exits_2(tmp_path, weights, capsys, section, message):
    preset = tmp_path / "mine.yaml"
    preset.write_text(PRESET_HEAD + section, encoding="utf-8")
    code, _, err = animate_json(tmp_path, weights, capsys, "--preset", preset)
    assert code == 2
    assert err.count("\n") == 1 and message in err
