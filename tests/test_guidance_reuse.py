"""Guidance reuse (avatarcli/sampling/guidance_reuse.py): off, nothing changes; on, the branches drop as the rule
says and `--json` counts them; the reused combination is exact when the guidance differences are; each window keeps
its own state (also through a resumable save)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from avatarcli.models.stableavatar import AudioConditioning
from avatarcli.presets import load_preset
from avatarcli.sampling.denoiser import StableAvatarDenoiser
from avatarcli.sampling.flashportrait import ExpressionGuidance, FlashPortraitDenoiser
from avatarcli.sampling.guidance import Guidance
from avatarcli.sampling.guidance_reuse import GuidanceReuse, estimate, merge_extras, split_extras
from avatarcli.sampling.sampler import sample_streaming
from avatarcli.sampling.schedule import flow_sigmas
from avatarcli.sampling.windows import plan_windows

CHANNELS, SIZE = 4, 2
ALWAYS = 1000.0  # a tolerance no estimate reaches: only warmup and max_reused decide


class BranchModel:
    """Stands in for the DiT: every branch gets the same function of the latents plus an offset that depends only on
    what tells the branches apart (prompt, audio row or expression scale), times (a + b sigma). So the guidance
    differences are constant along the path (b = 0) or linear in sigma."""

    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, a: float = 1.0, b: float = 0.0) -> None:
        self.a, self.b, self.batches = a, b, []

    def pad_text(self, text):
        return text

    def __call__(self, x, t, text, image, conditioning):
        self.batches.append(x.shape[0])
        prompt = text.mean(dim=(1, 2))  # positive 1, negative 0
        if isinstance(conditioning, AudioConditioning):  # real 1, silent 0, none -1
            signal = torch.tensor([-1.0 if r is None else float(conditioning.features[r].mean())
                                   for r in conditioning.branch_audio])
        else:
            signal = torch.tensor(conditioning.scales)
        offset = (2 * prompt + signal) * (self.a + self.b * t / 1000)
        latents = x[:, :CHANNELS]
        return 0.9 * latents + torch.sin(latents) + offset.view(-1, 1, 1, 1, 1)


def audio_denoiser(model, sigmas, mode="cfg"):
    return StableAvatarDenoiser(model, Guidance(mode), positive_text=torch.ones(1, 3, 6),
                                negative_text=torch.zeros(1, 3, 6), image_tokens=torch.zeros(1, 2, 6),
                                condition=torch.zeros(1, 20, 21, SIZE, SIZE),
                                window_audio=lambda window: torch.ones(1, 5, 8), sigmas=sigmas)


def expression_denoiser(model, sigmas, mode=None):
    return FlashPortraitDenoiser(model, ExpressionGuidance(emo_scale=4.0, text_scale=2.0),
                                 positive_text=torch.ones(1, 3, 6), negative_text=torch.zeros(1, 3, 6),
                                 image_tokens=torch.zeros(1, 2, 6), condition=torch.zeros(1, 20, 21, SIZE, SIZE),
                                 window_tokens=lambda w: torch.ones(1, w.end - w.start, 3, 8), sigmas=sigmas)


def sample(denoise, sigmas, plan):
    noise = torch.randn(1, CHANNELS, plan.latent_frames, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    chunks = sample_streaming(plan, sigmas, lambda s, e: noise[:, :, s:e], denoise)
    return torch.cat([chunk.latents for chunk in chunks], dim=2)


def before(denoiser):
    """The window denoiser's call as it was before guidance reuse: every branch, one forward, combined."""
    def call(window, step, latents):
        n, frames = denoiser.branches, latents.shape[2]
        x = torch.cat([latents.expand(n, -1, -1, -1, -1), denoiser.condition[:, :, :frames]], dim=1)
        pred = denoiser.model(x, denoiser.timesteps[step].expand(n), denoiser.text, denoiser.image,
                              denoiser.conditioning_for(window))
        return denoiser.guidance.combine(pred.float())

    return call


# ---- off: nothing changes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [audio_denoiser, expression_denoiser], ids=["audio", "driving"])
def test_off_and_never_reusing_are_bit_identical_to_the_denoiser_before(make):
    sigmas, plan = flow_sigmas(6), plan_windows(60, 21, 5, "linear")
    old = sample(before(make(BranchModel(b=3.0), sigmas)), sigmas, plan)
    denoiser = make(BranchModel(b=3.0), sigmas)
    assert torch.equal(sample(denoiser, sigmas, plan), old)
    assert denoiser.branch_forwards == len(denoiser.guidance.branches) * 6 * len(plan.windows)
    never = GuidanceReuse(warmup=7, tolerance=ALWAYS).bind(make(BranchModel(b=3.0), sigmas), sigmas)
    assert torch.equal(sample(never, sigmas, plan), old) and never.reused_steps == 0


def test_presets_reference_has_no_guidance_reuse_and_the_stack_adds_none_when_off():
    from avatarcli.pipeline import denoiser_stack

    assert load_preset("reference").guidance_reuse is None
    model, sigmas = BranchModel(), flow_sigmas(4)
    generation = SimpleNamespace(denoiser=audio_denoiser(model, sigmas), sigmas=sigmas, probe_blocks=None)
    job = SimpleNamespace(preset=load_preset("reference"), compile=False, context_parallel=1)
    stack = denoiser_stack(job, generation)
    assert stack.reuse is None and stack.counter.denoise is generation.denoiser
    job.preset = job.preset.with_overrides(guidance_reuse={"warmup": 2})
    stack = denoiser_stack(job, generation)
    assert stack.counter.denoise is stack.reuse and stack.reuse.denoiser is generation.denoiser


# ---- on: the rule, the counts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, alone", [("cfg", 2), ("ang", 0)])
def test_the_branches_drop_as_the_rule_says(mode, alone):
    steps, model = 8, BranchModel()
    sigmas, plan = flow_sigmas(steps), plan_windows(40, 21, 5, "linear")
    denoiser = audio_denoiser(model, sigmas, mode)
    reuse = GuidanceReuse(warmup=2, max_reused=1, tolerance=ALWAYS).bind(denoiser, sigmas)
    reuse.trace = []
    sample(reuse, sigmas, plan)
    windows = len(plan.windows)
    for k in range(windows):  # per window: full, full, then reused and full alternating
        assert [r for w, _, r in reuse.trace if w == k] == [False, False, True, False, True, False, True, False]
    assert reuse.reused_steps == 3 * windows and reuse.full_steps == 5 * windows
    assert denoiser.branch_forwards == (5 * 3 + 3 * 1) * windows
    assert sorted(set(model.batches)) == [1, 3] and model.batches.count(1) == 3 * windows
    assert reuse.conditional == alone
    longer = GuidanceReuse(warmup=3, max_reused=3, tolerance=ALWAYS).bind(audio_denoiser(BranchModel(), sigmas),
                                                                          sigmas)
    longer.trace = []
    sample(longer, sigmas, plan)
    assert [r for w, _, r in longer.trace if w == 0] == [False, False, False, True, True, True, False, True]


def test_the_error_estimate_keeps_full_guidance_where_the_differences_bend():
    sigmas, plan = flow_sigmas(8), plan_windows(21, 21, 5, "linear")
    strict = GuidanceReuse(warmup=2, max_reused=3, order=0, tolerance=1e-4)
    held = strict.bind(audio_denoiser(BranchModel(b=0.0), sigmas), sigmas)
    sample(held, sigmas, plan)
    bending = strict.bind(audio_denoiser(BranchModel(b=5.0), sigmas), sigmas)
    sample(bending, sigmas, plan)
    assert held.reused_steps > 0 and bending.reused_steps == 0  # constant: reused; linear in sigma: a hold errs


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from avatarcli.testing import make_tiny_weights

    return make_tiny_weights(tmp_path_factory.mktemp("weights"), model="stableavatar")


def test_json_reports_branch_forwards(tmp_path, weights, capsys, one_thread):
    import json
    from pathlib import Path

    from avatarcli.cli import main

    examples = Path(__file__).resolve().parents[1] / "examples"
    preset = tmp_path / "reuse.yaml"
    head = "description: t\nsteps: 6\nguidance: cfg\noverlap: 5\nblend: log\nsize: 64x64\nfps: 25\nprediction: null\n"
    preset.write_text(head + "guidance_reuse:\n  warmup: 2\n  max_reused: 1\n  tolerance: 1000\n", encoding="utf-8")
    results = {}
    for name, extra in (("off", ["--preset", "reference"]), ("on", ["--preset", str(preset)])):
        code = main([str(a) for a in ["animate", examples / "portrait.png", "--audio", examples / "speech.wav", "-o",
                                      tmp_path / f"{name}.mp4", "--weights", weights, "--size", "64x64", "--steps",
                                      "6", "--json", *extra]])
        out = capsys.readouterr().out
        assert code == 0
        results[name] = json.loads(out)
    off, on = results["off"], results["on"]
    assert off["nfe"] == 6 * off["windows"] and off["branch_forwards"] == 3 * off["nfe"]
    # per window: F F R F R F -> 4 full forwards of 3 branches, 2 of the conditional branch alone
    assert on["nfe"] == 6 * on["windows"] and on["branch_forwards"] == (4 * 3 + 2) * on["windows"]


# ---- exactness -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, mode", [(audio_denoiser, "cfg"), (audio_denoiser, "ang"),
                                        (expression_denoiser, None)], ids=["cfg", "ang", "expression"])
def test_reused_guidance_equals_full_guidance_when_the_differences_are_constant(make, mode):
    sigmas, plan = flow_sigmas(10), plan_windows(60, 21, 5, "linear")
    full = sample(make(BranchModel(a=0.7), sigmas, mode), sigmas, plan)
    for order in (0, 1):
        reuse = GuidanceReuse(warmup=2, max_reused=3, order=order, tolerance=ALWAYS)
        reusing = reuse.bind(make(BranchModel(a=0.7), sigmas, mode), sigmas)
        latents = sample(reusing, sigmas, plan)
        assert reusing.reused_steps >= 5 * len(plan.windows)
        torch.testing.assert_close(latents, full, rtol=1e-5, atol=1e-5)


def test_one_full_step_is_enough_to_hold_and_its_error_estimate_is_the_whole_correction():
    sigmas, plan = flow_sigmas(6), plan_windows(21, 21, 5, "linear")
    full = sample(audio_denoiser(BranchModel(a=0.7), sigmas), sigmas, plan)
    reusing = GuidanceReuse(warmup=1, max_reused=5, order=0, tolerance=ALWAYS).bind(
        audio_denoiser(BranchModel(a=0.7), sigmas), sigmas)
    reusing.trace = []
    torch.testing.assert_close(sample(reusing, sigmas, plan), full, rtol=1e-5, atol=1e-5)
    assert [reused for _, _, reused in reusing.trace] == [False] + [True] * 5  # one full step, then held
    correction = torch.full((2, 3), 0.5)
    held, error = estimate([0.9], [correction], 0.5, order=0)
    torch.testing.assert_close(held, correction)
    assert error == pytest.approx(float(correction.norm()))
    # ... so under a tight tolerance a single correction is not held: the rule waits for a second full step
    strict = GuidanceReuse(warmup=1, max_reused=5, order=0, tolerance=1e-3).bind(
        audio_denoiser(BranchModel(a=0.7), sigmas), sigmas)
    strict.trace = []
    sample(strict, sigmas, plan)
    assert [reused for _, _, reused in strict.trace][:2] == [False, False]


def test_linear_extrapolation_is_exact_for_differences_linear_in_sigma_and_a_hold_is_not():
    sigmas, plan = flow_sigmas(10), plan_windows(21, 21, 5, "linear")
    full = sample(audio_denoiser(BranchModel(b=4.0), sigmas), sigmas, plan)
    results = {}
    for order in (0, 1):
        reuse = GuidanceReuse(warmup=2, max_reused=2, order=order, tolerance=ALWAYS)
        results[order] = sample(reuse.bind(audio_denoiser(BranchModel(b=4.0), sigmas), sigmas), sigmas, plan)
    torch.testing.assert_close(results[1], full, rtol=1e-4, atol=1e-4)
    assert float((results[0] - full).abs().max()) > 1e-2


# ---- per-window state ----------------------------------------------------------------------------------------------


class WindowOffsets:
    """A WindowDenoiser stand-in whose branch differences are constant per window but differ between windows."""

    guidance = Guidance("cfg")

    def __init__(self):
        self.calls = []

    def branch_predictions(self, window, step, latents, rows=None):
        rows = rows if rows is not None else [0, 1, 2]
        self.calls.append((window.index, len(rows)))
        offsets = torch.tensor([[0.0, 1.0, 3.0], [10.0, -4.0, 7.0]])[window.index, rows]
        return latents.expand(len(rows), -1, -1) + offsets.view(-1, 1, 1)


def test_each_window_keeps_its_own_state_when_interleaved_and_through_a_resumable_save():
    sigmas = flow_sigmas(6)
    windows = [SimpleNamespace(index=0), SimpleNamespace(index=1)]
    settings = GuidanceReuse(warmup=2, max_reused=1, order=1, tolerance=ALWAYS)
    denoiser = WindowOffsets()
    reuse = settings.bind(denoiser, sigmas)
    latents = torch.zeros(1, 2, 2)
    expected = [Guidance("cfg").combine(torch.tensor([[0.0, 1.0, 3.0], [10.0, -4.0, 7.0]])[k].view(3, 1, 1)
                                        .expand(3, 2, 2)) for k in (0, 1)]
    for step in range(3):  # interleaved: window 0, window 1, window 0, ...; step 2 reuses guidance
        for window in windows:
            torch.testing.assert_close(reuse(window, step, latents), expected[window.index])
    assert [n for _, n in denoiser.calls[-2:]] == [1, 1] and reuse.reused_steps == 2
    resumed = settings.bind(WindowOffsets(), sigmas)
    predictor = {0: {"sigmas": torch.zeros(2)}}
    saved = merge_extras(predictor, reuse.extras())
    back_predictor, back_reuse = split_extras(saved)
    assert set(back_predictor) == {0} and set(back_predictor[0]) == {"sigmas"} and set(back_reuse) == {0, 1}
    resumed.load_extras(back_reuse)
    for step in range(3, 6):
        for window in windows:
            a, b = reuse(window, step, latents), resumed(window, step, latents)
            assert torch.equal(a, b)
            torch.testing.assert_close(a, expected[window.index])
    assert resumed.reused_steps == reuse.reused_steps - 2 == 2
    assert len(reuse.windows) == 0  # dropped after each window's last step


def test_settings_are_checked_by_the_preset_schema(tmp_path):
    from avatarcli.errors import AvatarError

    path = tmp_path / "p.yaml"
    head = "description: t\nsteps: 20\nguidance: cfg\noverlap: 6\nblend: log\nsize: auto\nfps: 25\n"
    for section, message in (("guidance_reuse:\n  warmup: 0\n", "guidance_reuse.warmup"),
                             ("guidance_reuse:\n  order: 2\n", "guidance_reuse.order"),
                             ("guidance_reuse:\n  skip: 2\n", "unknown key 'guidance_reuse.skip'")):
        path.write_text(head + section, encoding="utf-8")
        with pytest.raises(AvatarError, match=message):
            load_preset(path)
    with pytest.raises(ValueError):
        GuidanceReuse(max_reused=0)
    path.write_text(head + "guidance_reuse:\n  max_reused: 2\n", encoding="utf-8")
    assert load_preset(path).guidance_reuse == GuidanceReuse(max_reused=2)
