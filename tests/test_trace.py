"""`animate --trace FILE` (avatarcli/sampling/trace.py): one record per DiT forward, as `--json` counts them, and
one per predicted window-step; `benchmarks/bench_animate.py --replay` repeats those forwards on other weights."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from avatarcli.cli import main
from avatarcli.sampling.trace import ForwardTrace, ReplayedSteps, TracedStep, check_plan, read_trace
from avatarcli.testing import make_tiny_weights

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# Step prediction and guidance reuse that always skip what their warmup and caps allow: both kinds of saving appear.
PRESET = """description: t
steps: 6
guidance: cfg
overlap: 5
blend: log
size: 64x64
fps: 25
prediction: {order: 1, max_predicted: 2, tolerance: 1000, warmup: 2, layer_ratio: 0}
guidance_reuse: {warmup: 2, max_reused: 1, tolerance: 1000}
"""


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """(the --json summary, the trace) of a tiny 2-window run."""
    folder = tmp_path_factory.mktemp("trace")
    weights = make_tiny_weights(folder / "weights", model="stableavatar")
    (folder / "skips.yaml").write_text(PRESET, encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main([str(a) for a in ["animate", EXAMPLES / "portrait.png", "--audio", EXAMPLES / "speech.wav",
                                          "-o", folder / "out.mp4", "--weights", weights, "--preset",
                                          folder / "skips.yaml", "--json", "--trace", folder / "run.trace"]])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return json.loads(out.getvalue()), folder / "run.trace"


def test_a_trace_has_one_record_per_forward_matching_nfe_and_branch_forwards(traced):
    summary, path = traced
    trace = read_trace(path)
    computed = [step for step in trace.steps if step.computed]
    assert len(computed) == summary["nfe"] and sum(len(s.branches) for s in computed) == summary["branch_forwards"]
    assert (trace.header["forwards"], trace.header["branch_forwards"]) == (summary["nfe"], summary["branch_forwards"])
    # every window-step once, in the order the sampler ran them (no step ran two forwards here)
    keys = [(step.window, step.step) for step in trace.steps]
    assert sorted(keys) == [(w, s) for w in range(summary["windows"]) for s in range(summary["steps"])]
    assert {step.branches for step in trace.steps} == {(0, 1, 2), (2,), ()}  # full, conditional alone, predicted
    head = trace.header
    assert (head["frames"], head["windows"], head["steps"], head["width"], head["height"]) == (
        summary["frames"], summary["windows"], summary["steps"], 64, 64)
    assert head["settings"]["prediction"]["max_predicted"] == 2 and head["overlap"] == 5
    assert summary["compiled"] is False  # --compile auto on the CPU


def test_the_tiny_replay_repeats_the_traced_forwards(traced, tmp_path, monkeypatch, capsys, one_thread):
    summary, path = traced
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["bench_animate.py", "--tiny", "--replay", str(path), "--null-sink"])
    import bench_animate

    bench_animate.main()
    table = capsys.readouterr().out.strip().splitlines()
    cells = dict(zip([c.strip() for c in table[-3].split("|")], [c.strip() for c in table[-1].split("|")]))
    assert (int(cells["forwards"]), int(cells["branch forwards"])) == (summary["nfe"], summary["branch_forwards"])
    assert cells["windows x steps"] == f"{summary['windows']} x {summary['steps']}"


def test_a_replay_that_departs_from_the_trace_fails():
    trace = ForwardTrace({"windows": 1, "steps": 3}, [TracedStep(0, 0, (0, 1, 2)), TracedStep(0, 1),
                                                      TracedStep(0, 2, (0, 1, 2))])
    check_plan(trace, 1, 3)
    with pytest.raises(ValueError, match=r"plan is 1 window\(s\) x 3 steps, this job's 2 x 3"):
        check_plan(trace, 2, 3)
    calls = []
    steps = ReplayedSteps(trace, lambda w, s, x: calls.append(s) or x + 3, torch.tensor([1.0, 0.5, 0.2, 0.0]))
    window, x = SimpleNamespace(index=0), torch.zeros(1, 2)
    assert torch.equal(steps(window, 0, x), x + 3) and calls == [0]
    assert torch.equal(steps(window, 1, x), x + 3) and calls == [0]  # predicted: from the one computed velocity
    with pytest.raises(ValueError, match="reached window 1 step 2 where the trace has window 0 step 2"):
        steps(SimpleNamespace(index=1), 2, x)
