"""`batch` over many machines: shards of a manifest (`--shard K/N`, a SLURM array task's variables,
`--merge-reports`) and Ray actors (`--ray`) on a local cluster of 2 CPU slots, whose videos must equal a
single-process batch's frame for frame (lossless --crf 0), also when an actor's process is killed mid-job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from avatarcli.batch_shards import Shard, parse_shard, shard_from_environment
from avatarcli.cli import main
from avatarcli.errors import AvatarError
from avatarcli.testing import make_tiny_weights

PORTRAIT = Path(__file__).resolve().parents[1] / "examples" / "portrait.png"
SEEDS = range(6)  # six good jobs, after one naming a weights folder without the model files (it fails on its actor)


def speech(path: Path, seconds: float) -> Path:
    t = np.arange(int(seconds * 16000)) / 16000
    voice = 0.3 * np.sin(2 * np.pi * 165 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes((voice * 32767).astype(np.int16).tobytes())
    return path


def frames(path: Path) -> np.ndarray:
    reader = imageio_ffmpeg.read_frames(str(path))
    width, height = next(reader)["size"]
    return np.stack([np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader])


def run(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cluster-inputs")
    (folder / "no-weights").mkdir()
    return {"weights": make_tiny_weights(folder / "weights", model="stableavatar"),
            "audio": speech(folder / "talk.wav", 0.2), "no weights": folder / "no-weights"}


def write_manifest(folder: Path, inputs, bad: bool = True) -> Path:
    """The bad job first (so its failed load comes before the actors load the good jobs' models, once each), then
    the tiny good jobs (5 frames, 2 steps each, so a job saves its state once midway with AVATARCLI_SAVE_EVERY=0),
    writing beside the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"  - {{output: bad.mp4, weights: {inputs['no weights']}}}"] if bad else []
    lines += [f"  - {{output: seed{seed}.mp4, seed: {seed}}}" for seed in SEEDS]
    manifest = folder / "jobs.yaml"
    manifest.write_text(f"""defaults: {{portrait: {PORTRAIT}, audio: {inputs['audio']}, weights: {inputs['weights']},
            size: 64x64, steps: 2, crf: 0}}
jobs:
""" + "\n".join(lines) + "\n")
    return manifest


def comparable(report: dict, folder: Path) -> list[dict]:
    """A report's jobs without what differs between two runs of them: the time taken and the manifest's folder."""
    return [{**{k: v for k, v in job.items() if k != "seconds"}, "output": Path(job["output"]).name,
             "error": job["error"] and job["error"].replace(str(folder), "")} for job in report["jobs"]]


@pytest.fixture(scope="module")
def single(tmp_path_factory, inputs) -> dict:
    """The reference: the manifest as one single-process `batch --continue-on-error`, one torch thread (as each
    CPU actor has)."""
    import contextlib
    import io

    import torch

    manifest = write_manifest(tmp_path_factory.mktemp("single"), inputs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["batch", str(manifest), "--continue-on-error", "--json", "--quiet"])
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.getvalue())
    videos = {Path(job["output"]).name: frames(Path(job["output"])) for job in report["jobs"] if job["status"] == "ok"}
    return {"code": code, "report": report, "folder": manifest.parent, "frames": videos}


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster of 2 CPU slots for the module (starting one takes seconds)."""
    import builtins
    import logging

    import ray

    from avatarcli.batch_ray import keep_sigterm_handler

    own_print = builtins.print
    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # no token written to the home folder for a throwaway cluster
    with keep_sigterm_handler():  # the other tests' SIGTERM stays theirs
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()
    assert builtins.print is own_print  # Ray left the process's print alone (avatarcli.batch_ray.connect)
    if before is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = before


# ---- Ray ----------------------------------------------------------------------------------------------------------


class KillOnSave:
    """Watches one job's resume folder; once the job saved its state midway, SIGKILLs the process that holds its
    output's lock: the actor running it."""

    def __init__(self, output: Path) -> None:
        self.output, self.killed_pid = output, None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self) -> None:
        from avatarcli.resume import LOCK_NAME, ResumeFolder

        saved = ResumeFolder(self.output)
        while not self.done.is_set():
            try:
                pid = int((saved.path / LOCK_NAME).read_text().strip())
            except (OSError, ValueError):
                pid = None
            if pid not in (None, os.getpid()) and saved.exists() and not self.output.exists():
                os.kill(pid, signal.SIGKILL)
                self.killed_pid = pid
                return
            time.sleep(0.005)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


@pytest.fixture(scope="module")
def on_ray(tmp_path_factory, inputs, cluster) -> dict:
    """The manifest through `batch --ray --device cpu --continue-on-error` on the 2-slot cluster, every job saving its
    state after each window-step; the actor running the last good job is SIGKILLed once that job saved its state
    (then no other job waits for an actor, so none is started in its place)."""
    import contextlib
    import io

    folder = tmp_path_factory.mktemp("ray")
    manifest = write_manifest(folder, inputs)
    victim = folder / f"seed{SEEDS[-1]}.mp4"
    before = os.environ.get("AVATARCLI_SAVE_EVERY")
    os.environ["AVATARCLI_SAVE_EVERY"] = "0"
    watcher = KillOnSave(victim)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["batch", str(manifest), "--ray", "--device", "cpu", "--continue-on-error", "--report",
                         str(folder / "report.json")])
    finally:
        watcher.stop()
        if before is None:
            os.environ.pop("AVATARCLI_SAVE_EVERY", None)
        else:
            os.environ["AVATARCLI_SAVE_EVERY"] = before
    return {"code": code, "out": out.getvalue(), "err": err.getvalue(), "folder": folder, "victim": victim.name,
            "killed": watcher.killed_pid, "report": json.loads((folder / "report.json").read_text())}


def test_ray_batch_gives_the_single_process_report_exit_code_and_frames(on_ray, single):
    """A bad job and six good ones over 2 actors: every report field but the times (and the killed job's forwards, see
    below) and the exit code are the single run's, and so is every frame."""
    report = on_ray["report"]
    assert on_ray["code"] == single["code"] == 3  # the bad job's missing model files: an environment problem
    assert on_ray["out"] == ""  # Ray's own notices (an actor died) went to stderr
    ours, theirs = comparable(report, on_ray["folder"]), comparable(single["report"], single["folder"])
    for job in (*ours, *theirs):
        if job["output"] == on_ray["victim"]:
            del job["nfe"]
    assert ours == theirs
    assert report["model_loads"] == 2  # each actor loaded the models once, for all the jobs it ran
    assert "batch: 2 model load(s)" in on_ray["err"]  # the summary table
    for name, reference in single["frames"].items():
        assert np.array_equal(frames(on_ray["folder"] / name), reference), name


def test_a_job_whose_actor_is_killed_continues_on_another_from_its_saved_state(on_ray, single):
    assert on_ray["killed"] is not None, "the job was not seen midway"
    jobs = {Path(job["output"]).name: job for job in on_ray["report"]["jobs"]}
    reference = {Path(job["output"]).name: job for job in single["report"]["jobs"]}
    victim = on_ray["victim"]
    assert jobs[victim]["status"] == "ok"
    assert jobs[victim]["nfe"] == reference[victim]["nfe"] - 1 == 1  # its first window-step was not redone
    assert "retry: its Ray actor died" in " ".join(on_ray["err"].split())
    assert not list(on_ray["folder"].glob(".*.resume"))
    assert np.array_equal(frames(on_ray["folder"] / victim), single["frames"][victim])


def test_a_bad_job_fails_on_its_actor_without_stopping_the_others(on_ray):
    jobs = on_ray["report"]["jobs"]
    assert [job["status"] for job in jobs] == ["failed"] + ["ok"] * len(SEEDS)
    assert "no-weights" in jobs[0]["error"] and jobs[0]["exit_code"] == 3
    assert on_ray["err"].strip().endswith(f"error: 1 of {len(SEEDS) + 1} jobs failed")


def test_an_address_nothing_answers_on_is_an_environment_problem_at_once():
    from avatarcli.batch_ray import _check_reachable
    from avatarcli.errors import EnvironmentProblem

    with pytest.raises(EnvironmentProblem, match="cannot reach the Ray cluster at 127.0.0.1:1"):
        _check_reachable("127.0.0.1:1")
    _check_reachable("auto")  # Ray's own ways of finding a cluster are left to it
    _check_reachable(None)


def test_ray_needs_its_extra_and_help_does_not_import_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    code, out, err = run(["batch", tmp_path / "jobs.yaml", "--ray"], capsys)
    assert code == 3
    assert err.count("\n") == 1 and 'pip install "avatarcli[ray]"' in err
    probe = ("import sys\nfrom avatarcli.cli import main\nassert main(['batch', '--help']) == 0\n"
             "print('ray' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "False False"
    assert "--ray [ADDRESS]" in done.stdout and "--shard K/N" in done.stdout and "--merge-reports" in done.stdout


@pytest.mark.parametrize("args, address", [(["--ray"], ""), (["--ray", "--json"], ""), (["--ray", "head:6379"],
                                           "head:6379"), (["--ray=ray://head:10001"], "ray://head:10001"), ([], None)])
def test_ray_takes_an_optional_address(args, address):
    import typer

    from avatarcli.cli import app

    command = typer.main.get_command(app).commands["batch"]
    context = command.make_context("batch", ["jobs.yaml", *args])
    assert context.params["ray"] == address and context.params["manifest"] == Path("jobs.yaml")


# ---- shards -------------------------------------------------------------------------------------------------------


def test_slurm_array_variables_give_the_shard():
    assert shard_from_environment({}) is None
    assert shard_from_environment({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}) == Shard(2, 3)
    assert shard_from_environment({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3",
                                   "SLURM_ARRAY_TASK_MIN": "1"}) == Shard(2, 3)  # --array=1-3
    assert shard_from_environment({"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_COUNT": "8",
                                   "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2"}) == Shard(7, 8)
    with pytest.raises(AvatarError, match="--shard K/N"):
        shard_from_environment({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3",
                                "SLURM_ARRAY_TASK_MIN": "1"})
    assert parse_shard("1/3") == Shard(1, 3)
    for bad in ("3/3", "1", "-1/3", "a/b", "0/0"):
        with pytest.raises(AvatarError, match="--shard"):
            parse_shard(bad)


def test_shards_cover_the_manifest_once_and_merge_into_the_single_runs_report(tmp_path, inputs, monkeypatch,
                                                                               capsys):
    """Scheduling only (the models and `animate` are replaced): seven jobs, one invalid and one whose output exists;
    shard 1/3 from SLURM's variables of an array counted from 1, the others from --shard."""
    from avatarcli.drivers import stableavatar
    from avatarcli.pipeline import AnimateResult

    monkeypatch.setattr(stableavatar.DRIVER, "load", lambda job, inputs, device, dtype: object())
    monkeypatch.setattr("avatarcli.pipeline.animate", lambda job, models=None, prepared=None, stop=None: AnimateResult(
        job.output, "audio", 5 + job.seed, 25, 64, 64, 0.2, 0.0, 1, 2, nfe=2))
    folders = {"single": tmp_path / "single", "sharded": tmp_path / "sharded"}
    for folder in folders.values():
        manifest = write_manifest(folder, inputs, bad=False)
        manifest.write_text(manifest.read_text() + "  - {output: missing.mp4, audio: nowhere.wav}\n")
        (folder / "seed4.mp4").write_bytes(b"made before")  # skipped
    code, out, _ = run(["batch", folders["single"] / "jobs.yaml", "--continue-on-error", "--json"], capsys)
    one = json.loads(out)
    assert code == 2 and [job["status"] for job in one["jobs"]] == ["ok"] * 4 + ["skipped", "ok", "invalid"]

    manifest, report = folders["sharded"] / "jobs.yaml", folders["sharded"] / "report.json"
    shards = {}
    for k in range(3):
        if k == 1:
            monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
            monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
            monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
        args = ["batch", manifest, "--continue-on-error", "--report", report, "--quiet"]
        run(args if k == 1 else [*args, "--shard", f"{k}/3"], capsys)
        for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
            monkeypatch.delenv(name, raising=False)
        shards[k] = json.loads((folders["sharded"] / f"report.shard-{k}-of-3.json").read_text())
        if k == 1:  # two shards of three: merging is refused, naming the missing one
            code, _, err = run(["batch", manifest, "--merge-reports", "--report", report], capsys)
            assert code == 2 and "shard 2/3" in err and "--shard 2/3" in err
    indices = [job["index"] for k in range(3) for job in shards[k]["jobs"]]
    assert sorted(indices) == list(range(1, 8))  # every job once
    assert all(shards[k]["shard"] == f"{k}/3" for k in range(3))

    code, out, _ = run(["batch", manifest, "--merge-reports", "--report", report, "--json", "--quiet"], capsys)
    merged = json.loads(out)
    assert code == 2 and json.loads(report.read_text()) == merged
    assert comparable(merged, folders["sharded"]) == comparable(one, folders["single"])
    assert merged["counts"] == one["counts"] and merged["interrupted"] is False
    assert merged["model_loads"] == 3  # one per shard, each a machine of its own
