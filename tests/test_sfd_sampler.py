"""Semantic-first schedule, guidance and integrators, checked against their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from avatarcli.models.sfd import LightningDiT, LightningDiTConfig
from avatarcli.sampling import sfd as sampling

TEXTURE, SEMANTIC = 6, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0) -> LightningDiT:
    torch.manual_seed(seed)
    config = LightningDiTConfig(input_size=2, in_channels=TEXTURE + SEMANTIC, hidden_size=16, depth=1, num_heads=1,
                                mlp_hidden_dim=32, semantic_chans=SEMANTIC, semfirst_delta_t=0.3)
    model = LightningDiT(config).eval().requires_grad_(False)
    with torch.no_grad():  # default init leaves nothing zeroed, but make adaLN matter clearly
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model_velocity():
    model = tiny_model()
    y = torch.tensor([3, 7])
    return sampling.guided_velocity(model, y, sampling.Guidance("none"), texture_chans=TEXTURE)


# ---- schedule --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, delta_t", [(3, 0.3), (10, 0.3), (100, 0.3), (7, 0.1), (9, 1.0), (5, 0.0)])
def test_phase_grid_has_the_requested_steps_and_the_phase_boundaries(steps, delta_t):
    grid = sampling.phase_grid(steps, delta_t)
    assert len(grid) == steps + 1
    assert grid[0] == 0.0 and grid[-1] == pytest.approx(1.0 + delta_t)
    assert all(b > a for a, b in zip(grid[:-1], grid[1:]))
    for boundary in (delta_t, 1.0):
        assert boundary in grid


def test_stream_times_run_semantics_delta_t_ahead():
    tau = torch.tensor([0.0, 0.2, 0.3, 0.65, 1.0, 1.15, 1.3])
    t_tex, t_sem = sampling.stream_times(tau, 0.3)
    torch.testing.assert_close(t_sem, torch.tensor([0.0, 0.2, 0.3, 0.65, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(t_tex, torch.tensor([0.0, 0.0, 0.0, 0.35, 0.7, 0.85, 1.0]))


@pytest.mark.parametrize("delta_t", [0.0, 0.15, 0.3, 0.7])
def test_each_stream_integrates_exactly_one_unit_of_its_own_time(delta_t):
    steps = sampling.plan_steps(sampling.phase_grid(40, delta_t), delta_t)
    assert sum((s.tau_next - s.tau) * s.mask_tex for s in steps) == pytest.approx(1.0)
    assert sum((s.tau_next - s.tau) * s.mask_sem for s in steps) == pytest.approx(1.0)


def test_texture_stays_noise_in_phase_one_and_semantics_freeze_in_phase_three():
    unit = lambda x, t_tex, t_sem: torch.ones_like(x)  # noqa: E731
    grid = sampling.phase_grid(13, 0.3)
    steps = sampling.plan_steps(grid, 0.3)
    states = {}
    x0 = torch.zeros(1, TEXTURE + SEMANTIC, 2, 2)
    out = sampling.euler(unit, x0, steps, delta_t=0.3, texture_chans=TEXTURE,
                         callback=lambda i, x: states.__setitem__(steps[i].tau_next, x))
    at_delta, at_one = states[0.3], states[1.0]
    assert torch.all(at_delta[:, :TEXTURE] == 0) and torch.allclose(at_delta[:, TEXTURE:], torch.tensor(0.3))
    assert torch.allclose(at_one[:, TEXTURE:], torch.tensor(1.0))
    assert torch.allclose(out.x, torch.tensor(1.0))


# ---- delta_t = 0 is ordinary synchronous flow sampling ---------------------------------------------------------


def plain_euler(velocity, x, grid):
    for t, t_next in zip(grid[:-1], grid[1:]):
        t_batch = torch.full((x.shape[0],), t)
        x = x + (t_next - t) * velocity(x, t_batch, t_batch)
    return x


def plain_heun(velocity, x, grid):
    for t, t_next in zip(grid[:-1], grid[1:]):
        t0, t1 = torch.full((x.shape[0],), t), torch.full((x.shape[0],), t_next)
        v0 = velocity(x, t0, t0)
        v1 = velocity(x + (t_next - t) * v0, t1, t1)
        x = x + 0.5 * (t_next - t) * (v0 + v1)
    return x


def test_delta_t_zero_plan_gives_both_streams_the_same_time_and_no_masks():
    steps = sampling.plan_steps(sampling.phase_grid(8, 0.0), 0.0)
    assert [s.tau for s in steps] == pytest.approx([k / 8 for k in range(8)])
    assert all(s.mask_tex == 1.0 and s.mask_sem == 1.0 for s in steps)
    t_tex, t_sem = sampling.stream_times(torch.tensor([s.tau for s in steps]), 0.0)
    assert torch.equal(t_tex, t_sem)


@pytest.mark.parametrize("solver, plain", [("euler", plain_euler), ("heun", plain_heun)])
def test_delta_t_zero_reduces_to_synchronous_flow_sampling(model_velocity, solver, plain):
    noise = torch.randn(2, TEXTURE + SEMANTIC, 2, 2, generator=torch.Generator().manual_seed(1))
    ours = sampling.sample(model_velocity, noise, texture_chans=TEXTURE, delta_t=0.0, solver=solver, num_steps=12)
    expected = plain(model_velocity, noise, [k / 12 for k in range(13)])
    torch.testing.assert_close(ours.x, expected, rtol=1e-5, atol=1e-6)
    assert ours.nfe == (12 if solver == "euler" else 24)


def test_delta_t_zero_dopri5_is_dopri5_on_the_plain_flow(model_velocity):
    noise = torch.randn(2, TEXTURE + SEMANTIC, 2, 2, generator=torch.Generator().manual_seed(2))
    ours = sampling.sample(model_velocity, noise, texture_chans=TEXTURE, delta_t=0.0, solver="dopri5")

    def plain_drift(t, x):
        t_batch = torch.full((x.shape[0],), t)
        return model_velocity(x, t_batch, t_batch)

    expected = sampling.dopri5(plain_drift, noise, 0.0, 1.0)
    assert ours.nfe == expected.nfe
    torch.testing.assert_close(ours.x, expected.x, rtol=0, atol=0)


def test_positive_delta_t_differs_from_synchronous_sampling(model_velocity):
    noise = torch.randn(2, TEXTURE + SEMANTIC, 2, 2, generator=torch.Generator().manual_seed(3))
    sync = sampling.sample(model_velocity, noise, texture_chans=TEXTURE, delta_t=0.0, num_steps=12)
    asynchronous = sampling.sample(model_velocity, noise, texture_chans=TEXTURE, delta_t=0.3, num_steps=12)
    assert (sync.x - asynchronous.x).abs().max() > 1e-3


# ---- integrators -----------------------------------------------------------------------------------------------


def rotating_field(x, t_tex, t_sem):
    # dx/dt = A(t) x with a smooth time dependence, per stream: exact solution known in closed form.
    t = torch.cat([t_tex[:, None].expand(-1, TEXTURE), t_sem[:, None].expand(-1, SEMANTIC)], dim=1)
    return x * torch.cos(3 * t)[:, :, None, None]


def exact_rotating(x0):
    # Each stream integrates one unit of its own time from 0 to 1: x(1) = x0 * exp(sin(3) / 3).
    return x0 * math.exp(math.sin(3.0) / 3)


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_fixed_step_solvers_converge_at_their_order(solver, order):
    x0 = torch.ones(1, TEXTURE + SEMANTIC, 1, 1, dtype=torch.float64)
    errors = [
        (sampling.sample(rotating_field, x0, texture_chans=TEXTURE, solver=solver, num_steps=n).x
         - exact_rotating(x0)).abs().max().item()
        for n in (26, 52)
    ]
    assert errors[0] / errors[1] == pytest.approx(2**order, rel=0.25)


def test_dopri5_error_shrinks_with_its_tolerance_on_a_smooth_ode():
    oscillator = lambda t, x: torch.stack([x[1], -x[0]])  # noqa: E731
    x0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    exact = torch.tensor([math.cos(1.3), -math.sin(1.3)], dtype=torch.float64)
    for rtol in (1e-4, 1e-7):
        out = sampling.dopri5(oscillator, x0, 0.0, 1.3, rtol=rtol, atol=rtol * 1e-3)
        assert (out.x - exact).abs().max().item() < 10 * rtol


def test_dopri5_steps_across_the_phase_boundaries_of_the_semantic_first_ode():
    x0 = torch.ones(1, TEXTURE + SEMANTIC, 1, 1, dtype=torch.float64)
    out = sampling.sample(rotating_field, x0, texture_chans=TEXTURE, solver="dopri5", rtol=1e-6, atol=1e-9)
    assert (out.x - exact_rotating(x0)).abs().max().item() < 1e-3


def test_dopri5_never_evaluates_past_the_end():
    times = []

    def drift(t, x):
        times.append(t)
        return -x

    out = sampling.dopri5(drift, torch.ones(3, dtype=torch.float64), 0.0, 1.3)
    assert max(times) <= 1.3 and out.nfe == len(times)
    torch.testing.assert_close(out.x, torch.full((3,), math.exp(-1.3), dtype=torch.float64), rtol=5e-3, atol=0)


# ---- guidance --------------------------------------------------------------------------------------------------


class Recorder(torch.nn.Module):
    """Returns a label-dependent constant velocity and records the labels it was called with."""

    def __init__(self, offset: float):
        super().__init__()
        self.offset, self.calls = offset, []

    def forward(self, x, t_tex, t_sem, y):
        self.calls.append(y.tolist())
        return torch.zeros_like(x) + (y.float() + self.offset)[:, None, None, None]


def test_cfg_uses_the_null_label_in_one_doubled_batch():
    model = Recorder(0.0)
    velocity = sampling.guided_velocity(model, torch.tensor([5, 9]), sampling.Guidance("cfg", 2.0, 2.0),
                                        texture_chans=TEXTURE, null_class=1000)
    v = velocity(torch.zeros(2, TEXTURE + SEMANTIC, 1, 1), torch.zeros(2), torch.zeros(2))
    assert model.calls == [[5, 9, 1000, 1000]]
    torch.testing.assert_close(v[:, 0, 0, 0], torch.tensor([1000 + 2 * (5 - 1000), 1000 + 2 * (9 - 1000)]).float())


def test_autoguidance_gives_both_models_the_same_label_and_scales_each_stream():
    strong, weak = Recorder(1.0), Recorder(0.0)
    velocity = sampling.guided_velocity(strong, torch.tensor([4]), sampling.Guidance("autoguidance", 3.0, 0.5),
                                        texture_chans=TEXTURE, guidance_model=weak)
    v = velocity(torch.zeros(1, TEXTURE + SEMANTIC, 1, 1), torch.zeros(1), torch.zeros(1))
    assert strong.calls == [[4]] and weak.calls == [[4]]
    assert torch.all(v[:, :TEXTURE] == 4 + 3.0 * 1.0) and torch.all(v[:, TEXTURE:] == 4 + 0.5 * 1.0)


def test_scale_one_guidance_equals_the_conditional_velocity(model_velocity):
    model = tiny_model()
    x = torch.randn(2, TEXTURE + SEMANTIC, 2, 2)
    t = torch.tensor([0.2, 0.9])
    y = torch.tensor([3, 7])
    for kind in ("cfg", "autoguidance"):
        guided = sampling.guided_velocity(model, y, sampling.Guidance(kind, 1.0, 1.0), texture_chans=TEXTURE,
                                          guidance_model=tiny_model(seed=1))
        torch.testing.assert_close(guided(x, t, t), model_velocity(x, t, t), rtol=1e-5, atol=1e-6)
