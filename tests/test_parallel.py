"""Several processes: the tick schedule, the window-parallel sampler (ranks simulated by threads), and real launches
of 2 gloo processes as 2 nodes (torchrun --nnodes 2 on localhost) and of 3 on one node (--gpus 3) whose videos must
equal one process's frame for frame (lossless --crf 0), plus one Ulysses-split transformer forward against one
process's."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from avatarcli.cli import main
from avatarcli.parallel.schedule import HeldLatents, Read, TickSchedule
from avatarcli.sampling.predict import Prediction
from avatarcli.sampling.sampler import sample_joint, sample_window_parallel
from avatarcli.sampling.schedule import flow_sigmas
from avatarcli.sampling.windows import plan_windows
from avatarcli.testing import make_tiny_weights
from avatarcli.testing.flashportrait_face import synthetic_driving_frames, write_driving_clip

ROOT = Path(__file__).resolve().parents[1]
PORTRAIT = ROOT / "examples" / "portrait.png"

# (latent frames, window, overlap): 1, 2 and 7 windows; overlaps above half a window make a window's frames
# owned by windows two or more ahead (reach > 1).
PLANS = {"1 window": (9, 9, 3), "2 windows": (14, 9, 3), "7 windows": (39, 9, 4), "7 windows, reach 3": (21, 9, 7)}


def noise(start: int, end: int) -> torch.Tensor:
    return torch.cat([torch.randn(1, 3, 1, 2, 3, generator=torch.Generator().manual_seed(f))
                      for f in range(start, end)], dim=2)


def denoise(window, step: int, latents: torch.Tensor) -> torch.Tensor:
    frames = torch.arange(latents.shape[2], dtype=latents.dtype).view(1, 1, -1, 1, 1)
    return torch.sin(1.7 * latents) + 0.3 * latents + 0.05 * window.index - 0.02 * step + 0.01 * frames


# ---- the schedule -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PLANS)
@pytest.mark.parametrize("world", [2, 3])
def test_every_window_step_runs_once_after_everything_it_reads(name, world):
    plan, steps = plan_windows(*PLANS[name]), 4
    schedule = TickSchedule(plan, steps, world)
    tasks = [t for tick in range(schedule.ticks) for t in schedule.tasks(tick)]
    assert sorted(tasks) == [(k, s) for k in range(len(plan.windows)) for s in range(steps)]
    for k, s in tasks:
        for read in schedule.reads(k, s):
            assert schedule.tick(read.window, read.step) < schedule.tick(k, s)


def test_a_ticks_windows_go_round_robin_to_the_ranks():
    plan = plan_windows(200, 21, 8)  # 14 windows, reach 1: windows of one tick are 2 apart
    schedule = TickSchedule(plan, 10, 4)
    assert schedule.stride == 2
    busiest = max((schedule.tasks(t) for t in range(schedule.ticks)), key=len)
    for tick in range(schedule.ticks):
        ranks = [schedule.rank(k) for k, _ in schedule.tasks(tick)]
        assert max(ranks.count(r) for r in range(4)) - min(ranks.count(r) for r in range(4)) <= 1
    assert len(busiest) >= 4
    assert all(schedule.rank(k) == (k // 2) % 4 for k in range(len(plan.windows)))


@pytest.mark.parametrize("name", PLANS)
def test_transfers_carry_exactly_what_other_ranks_read(name):
    """Every read of another rank's window is covered by a transfer after the producing tick; nothing else moves
    except the final frames rank 0 decodes, and no transfer is larger than a window's overlap region."""
    plan, steps, world = plan_windows(*PLANS[name]), 3, 2
    schedule = TickSchedule(plan, steps, world)
    transfers = [t for tick in range(schedule.ticks) for t in schedule.transfers(tick)]
    assert all(t.source != t.dest and t.source == schedule.rank(t.read.window) for t in transfers)
    needed = [(schedule.rank(k), r) for k in range(len(plan.windows)) for s in range(steps)
              for r in schedule.reads(k, s)]
    needed += [(0, r) for r in schedule.runs(0, plan.latent_frames, steps - 1)]
    for rank, read in needed:
        if schedule.rank(read.window) == rank:
            continue
        [t] = [t for t in transfers if t.dest == rank and t.read.window == read.window and t.read.step == read.step]
        assert t.read.start <= read.start and read.end <= t.read.end
        assert t in schedule.transfers(schedule.tick(read.window, read.step))
    for t in transfers:
        if t.read.step < steps - 1:
            assert t.read.end - t.read.start < plan.window_frames  # an overlap, never a whole window


def test_held_latents_refuse_frames_they_do_not_hold():
    held = HeldLatents()
    held.put(3, 1, 10, torch.zeros(1, 2, 4, 1, 1))
    assert held.read(Read(3, 1, 11, 13)).shape[2] == 2
    with pytest.raises(KeyError):
        held.read(Read(3, 1, 9, 12))


# ---- the sampler, ranks as threads ----------------------------------------------------------------------------------


class ThreadGroup:
    """`world` ranks in one process, one thread each: the exchange goes through a shared mailbox between two
    barriers, in the schedule's order, like ProcessGroup.exchange."""

    def __init__(self, world: int):
        self.world, self.mailbox, self.barrier = world, {}, threading.Barrier(world)

    def member(self, rank: int):
        group = self

        class Member:
            def __init__(self):
                self.rank, self.world_size = rank, group.world

            def exchange(self, transfers, held, frame):
                for t in transfers:
                    if t.source == rank:
                        group.mailbox[(t.read, t.dest)] = held.read(t.read).clone()
                group.barrier.wait()
                for t in transfers:
                    if t.dest == rank:
                        held.put(t.read.window, t.read.step, t.read.start, group.mailbox.pop((t.read, t.dest)))
                group.barrier.wait()

        return Member()


def run_threads(plan, sigmas, world: int, predictor_settings=None):
    group, out, calls = ThreadGroup(world), {}, {}

    def rank_main(rank: int):
        counted = []

        def counting(window, step, latents):
            counted.append(window.index)
            return denoise(window, step, latents)

        chunks = list(sample_window_parallel(plan, sigmas, noise, counting, group.member(rank),
                                             predictor=predictor_settings))
        out[rank], calls[rank] = chunks, counted

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, calls


@pytest.mark.parametrize("name", PLANS)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_window_parallel_sampler_equals_the_joint_loop(name, world):
    plan, sigmas = plan_windows(*PLANS[name]), flow_sigmas(4)
    out, calls = run_threads(plan, sigmas, world)
    assert all(not out[r] for r in range(1, world))  # only rank 0 yields frames
    starts = [c.start for c in out[0]]
    assert starts == sorted(starts) and starts[0] == 0
    joint = sample_joint(plan, sigmas, noise(0, plan.latent_frames), denoise)
    assert torch.equal(torch.cat([c.latents for c in out[0]], dim=2), joint)
    schedule = TickSchedule(plan, 4, world)
    for rank in range(world):  # each rank evaluated exactly its own windows
        assert sorted(calls[rank]) == sorted(k for k in range(len(plan.windows)) if schedule.rank(k) == rank
                                             for _ in range(4))


def test_window_parallel_sampler_with_step_prediction_equals_the_joint_loop():
    plan, sigmas = plan_windows(39, 9, 4), flow_sigmas(10)
    settings = Prediction(order=2, max_predicted=3, tolerance=1e3)
    out, calls = run_threads(plan, sigmas, 3, settings)
    joint = sample_joint(plan, sigmas, noise(0, plan.latent_frames), denoise, predictor=settings)
    assert torch.equal(torch.cat([c.latents for c in out[0]], dim=2), joint)
    assert 0 < sum(len(c) for c in calls.values()) < len(plan.windows) * 10  # steps were predicted


# ---- real launches ----------------------------------------------------------------------------------------------


def frames(path: Path) -> np.ndarray:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return np.stack([np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader])


def speech(path: Path, seconds: float) -> Path:
    import wave

    t = np.arange(int(seconds * 16000)) / 16000
    voice = 0.3 * np.sin(2 * np.pi * 175 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes((voice * 32767).astype(np.int16).tobytes())
    return path


AUDIO = ["--size", "64x64", "--steps", "2", "--overlap", "14", "--crf", "0", "--quiet", "--json"]
# 1.0 s: 1 window; 4.36 s (28 latent frames): 2 windows; 9.96 s (63 latent frames): 7 windows, overlap 14 (reach 2:
# windows 0-2, 3-5 and 6 go to ranks 0, 1, 2 in turn). The 7-window job also predicts steps (6 steps, 35 forwards).
AUDIO_JOBS = {"1 window": (1.0, []), "2 windows": (4.36, []),
              "7 windows": (9.96, ["--steps", "6", "--predict", "--predict-tolerance", "1"])}
DRIVING_WINDOW = 3  # latent frames per driving-video window in these tests (51 in the model), overlap 1:
DRIVING = ["--size", "64x64", "--steps", "2", "--overlap", "1", "--crf", "0", "--quiet", "--json"]
DRIVING_FRAMES = 24  # 7 latent frames: 3 windows
WINDOWS = {"1 window": 1, "2 windows": 2, "7 windows": 7, "driving": 3}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    return {
        "weights": make_tiny_weights(folder / "sa", model="stableavatar"),
        "driving weights": make_tiny_weights(folder / "fp", model="flashportrait"),
        "audio": {name: speech(folder / f"talk{i}.wav", seconds) for i, (name, (seconds, _)) in
                  enumerate(AUDIO_JOBS.items())},
        "clip": write_driving_clip(folder / "drive.mp4", synthetic_driving_frames(DRIVING_FRAMES), fps=20.0),
        "folder": folder,
    }


def audio_args(inputs, name: str, output: Path) -> list[str]:
    return ["animate", str(PORTRAIT), "--audio", str(inputs["audio"][name]), "-o", str(output), "--weights",
            str(inputs["weights"]), *AUDIO, *AUDIO_JOBS[name][1]]


def driving_args(inputs, output: Path) -> list[str]:
    return ["animate", str(PORTRAIT), "--driving", str(inputs["clip"]), "-o", str(output), "--weights",
            str(inputs["driving weights"]), *DRIVING]


@pytest.fixture(scope="module")
def one_process(inputs):
    """The videos of one ordinary process (the reference), with their --json summaries."""
    import avatarcli.drivers.flashportrait as driving

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    window, driving.WINDOW_LATENT_FRAMES = driving.WINDOW_LATENT_FRAMES, DRIVING_WINDOW
    results = {}
    try:
        jobs = {name: audio_args(inputs, name, inputs["folder"] / f"one-{i}.mp4") for i, name in enumerate(AUDIO_JOBS)}
        jobs["driving"] = driving_args(inputs, inputs["folder"] / "one-driving.mp4")
        for name, args in jobs.items():
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                assert main(args) == 0
            summary = json.loads(stdout.getvalue())
            results[name] = (frames(Path(summary["output"])), summary)
    finally:
        driving.WINDOW_LATENT_FRAMES = window
        torch.set_num_threads(threads)
    return results


def environment() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def launch(world: int, inputs, tmp_path: Path, names: list[str]) -> dict:
    """`world` nodes of one process each, as `torchrun --nnodes` starts them on as many machines (README,
    multi-node): one launcher per node, meeting at a c10d rendezvous, here all on localhost."""
    import socket

    jobs = [driving_args(inputs, tmp_path / f"{world}-{name}.mp4") if name == "driving" else
            audio_args(inputs, name, tmp_path / f"{world}-{name}.mp4".replace(" ", "-")) for name in names]
    spec, result = tmp_path / "jobs.json", tmp_path / "result.json"
    spec.write_text(json.dumps({"jobs": jobs, "driving_window": DRIVING_WINDOW}))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(world), "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "nodes",
            str(ROOT / "tests" / "parallel_worker.py"), str(result), str(spec)]
    logs = [tmp_path / f"node{n}.log" for n in range(world)]
    nodes = [subprocess.Popen(node, env=environment(), stdout=log.open("w"), stderr=subprocess.STDOUT)
             for log in logs]
    codes = [process.wait(timeout=600) for process in nodes]
    assert codes == [0] * world, [log.read_text()[-3000:] for log in logs]
    return json.loads(result.read_text())


def check_summary(name: str, summary: dict, world: int, one: dict) -> None:
    assert summary["windows"] == one["windows"] == WINDOWS[name]
    assert summary["world_size"] == world and len(summary["nfe_per_rank"]) == world
    assert sum(summary["nfe_per_rank"]) == summary["nfe"] == one["nfe"], name  # the same work, split
    if name == "7 windows":
        assert all(n > 0 for n in summary["nfe_per_rank"])  # every rank evaluated windows
        assert summary["nfe"] < 7 * 6  # step prediction skipped some
    if WINDOWS[name] <= 2:  # overlapping windows read each other at every step: they run one after the other
        assert summary["nfe_per_rank"][1:] == [0] * (world - 1)


# Starting processes is the slow part (each imports torch), so one launch runs all the checks of 2 processes: the
# sampler on its own (1, 2 and 7 windows, with step prediction) and whole videos of both drivers. They are 2 nodes
# (`torchrun --nnodes 2`); three processes of one node are checked by the `--gpus 3` test below.
LAUNCHES = {2: ["1 window", "2 windows", "7 windows", "driving"]}


@pytest.mark.parametrize("world", [2])
def test_processes_under_torchrun_write_the_one_process_frames(world, inputs, one_process, tmp_path):
    report = launch(world, inputs, tmp_path, LAUNCHES[world])
    assert report["sampler"] and all(v for k, v in report["sampler"].items() if not k.endswith(": windows"))
    split = report["ulysses"]  # one tiny forward, Ulysses over the processes against one process
    assert split["shape_equal"] and split["tokens"] == [64, 64 // world]  # blocks saw 1/world of the tokens
    assert split["max_abs"] <= 1e-5 * split["scale"]
    assert len(report["jobs"]) == len(LAUNCHES[world])
    for name, job in zip(LAUNCHES[world], report["jobs"]):
        assert job["codes"] == [0] * world, (name, job)
        [line] = job["stdout"].strip().splitlines()  # rank 0's summary only
        summary = json.loads(line)
        reference, one = one_process[name]
        check_summary(name, summary, world, one)
        assert np.array_equal(frames(Path(summary["output"])), reference), name


def test_gpus_flag_launches_three_processes_that_write_the_one_process_frames(inputs, one_process, tmp_path):
    output = tmp_path / "launched.mp4"
    done = subprocess.run([sys.executable, "-m", "avatarcli", *audio_args(inputs, "7 windows", output), "--gpus", "3",
                           "--device", "cpu"], env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = done.stdout.strip().splitlines()  # rank 0's summary only
    check_summary("7 windows", json.loads(line), 3, one_process["7 windows"][1])
    assert np.array_equal(frames(output), one_process["7 windows"][0])


def test_resume_with_several_processes_is_refused(inputs, tmp_path, capsys):
    args = audio_args(inputs, "1 window", tmp_path / "out.mp4")
    assert main([*args, "--gpus", "2", "--resume"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert not (tmp_path / "out.mp4").exists()


def test_gpus_needs_that_many_gpus_unless_on_the_cpu(inputs, tmp_path, capsys):
    assert main([*audio_args(inputs, "1 window", tmp_path / "out.mp4"), "--gpus", "64", "--device", "cuda"]) == 3
    assert "--gpus 64" in capsys.readouterr().err
