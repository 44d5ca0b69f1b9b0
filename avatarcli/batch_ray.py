"""`batch --ray`: a manifest's jobs spread over the actors of a Ray cluster, the resume state as the unit of recovery.

Each actor (`BatchWorker`: one per GPU of the cluster, or per CPU slot for CPU jobs) runs one job at a time and holds
one model set, as a one-machine batch does (avatarcli/batch.py `ModelSets`: loaded for the first job of a models key,
kept for the next job with that key, offered to the next key's driver to adapt). Ray places the actors on the nodes;
this process hands each free actor the next job, one whose models it holds first. When an actor's process dies (a
lost node, a kill), its job goes back to the front of the queue with --resume set (a new actor is started in its
place while more jobs wait than actors live), and whichever actor takes the job next continues from the state it
saved beside its output every AVATARCLI_SAVE_EVERY seconds of work: inputs, outputs and resume states must be on
storage every node sees.

The outcomes, the report and so the exit code are those of `run_batch` on one machine, in manifest order.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avatarcli.batch import BatchEntry, BatchReport, JobOutcome, ModelSets, _model_groups, _run_entry, _unrunnable
from avatarcli.errors import AvatarError, EnvironmentProblem

INSTALL = 'pip install "avatarcli[ray]"'
ATTEMPTS = 3  # actors a job may lose before it is reported failed
POLL_SECONDS = 0.2  # how often a Ctrl-C is looked for while jobs run


def import_ray():
    """The ray module, or EnvironmentProblem (exit 3) naming the extra to install."""
    try:
        import ray
    except ImportError as error:
        raise EnvironmentProblem(f"--ray needs Ray, an optional extra: {INSTALL} (on every node)") from error
    return ray


@contextlib.contextmanager
def connect(address: str | None):
    """Ray, connected to the cluster at `address` (as `ray.init` takes it: host:port, ray://host:10001, auto) or,
    without one, to RAY_ADDRESS, a cluster started on this machine, else a new local one. A connection made here is
    closed on the way out; one the caller made already (`ray.init` beforehand) is used as it is."""
    import builtins
    import logging
    import os

    # Ray swaps builtins.print for its progress-bar-safe one the first time a worker's output reaches this process,
    # and never swaps it back: the rest of the caller's process would print through Ray.
    os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
    ray, own_print = import_ray(), builtins.print
    if ray.is_initialized():
        try:
            yield ray
        finally:
            builtins.print = own_print
        return
    _check_reachable(address)
    try:
        with keep_sigterm_handler():
            ray.init(address=address or None, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"at {address}" if address else "(RAY_ADDRESS, or one on this machine)"
        raise EnvironmentProblem(f"cannot connect to the Ray cluster {where}: {' '.join(str(error).split())}") \
            from error
    try:
        yield ray
    finally:
        ray.shutdown()
        builtins.print = own_print


@contextlib.contextmanager
def keep_sigterm_handler():
    """`ray.init` makes SIGTERM exit the process at once; the caller's handler (the CLI's: stop after the window-step,
    state saved, exit 130) is put back."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and handler is not None:
            signal.signal(signal.SIGTERM, handler)


def _check_reachable(address: str | None) -> None:
    """A HOST:PORT (or ray://HOST:PORT) nothing answers on is an EnvironmentProblem at once (`ray.init` would keep
    retrying for minutes)."""
    import socket

    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local", none: Ray finds the cluster itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as error:
        raise EnvironmentProblem(f"cannot reach the Ray cluster at {address} ({error.strerror or error}): is `ray "
                                 "start --head` running there, and the port open?") from error


class BatchWorker:
    """The body of one actor: jobs one at a time in its own process, one model set held between them. `run` and
    `request_stop` may run concurrently (a threaded actor), so a Ctrl-C of the batch reaches the running job."""

    def __init__(self) -> None:
        self.report = BatchReport(manifest="", jobs=[])  # counts this actor's model loads
        self.models = ModelSets(self.report)
        self.models_key: tuple | None = None
        self.stops: dict[int, Any] = {}  # batch number -> its StopFlag

    def pid(self) -> int:
        return os.getpid()

    def run(self, entry: BatchEntry, batch: int) -> tuple[JobOutcome, int, int]:
        """The job's outcome, and the model loads and partial loads it took."""
        if entry.models_key != self.models_key:
            self.models.end_group()
            self.models_key = entry.models_key
        loads, partial = self.report.model_loads, self.report.partial_loads
        outcome = _run_entry(entry, self.models, self._stop(batch))
        return outcome, self.report.model_loads - loads, self.report.partial_loads - partial

    def request_stop(self, batch: int, reason: str | None) -> None:
        """Stop this batch's job after its current window-step, its state saved (AnimateInterrupted)."""
        self._stop(batch).request(reason or "stop requested")

    def _stop(self, batch: int):
        from avatarcli.resume import StopFlag

        return self.stops.setdefault(batch, StopFlag())


@dataclass
class Actor:
    handle: Any
    pid: int = 0
    models_key: tuple | None = None  # the models it holds, once it ran a job


class Workers:
    """The actors of a batch: started with one GPU (or one CPU) each, told apart as starting, idle and busy; a dead
    one is replaced while more jobs wait than actors live. One set serves any number of `run_batch_ray` calls."""

    def __init__(self, ray, count: int, gpu: bool) -> None:
        self.ray = ray
        resources = {"num_gpus": 1} if gpu else {"num_cpus": 1}
        self.actor_class = ray.remote(max_concurrency=2, **resources)(BatchWorker)
        self.starting: dict[Any, Actor] = {}  # ref of its pid -> actor
        self.idle: list[Actor] = []
        self.busy: dict[Any, tuple[Actor, BatchEntry]] = {}  # ref of its outcome -> (actor, job)
        self.batches = 0
        self.lost_starts = 0
        self.last_loss = ""
        for _ in range(count):
            self.start_one()

    @classmethod
    def for_jobs(cls, ray, entries: list[BatchEntry]) -> Workers:
        """One actor per GPU of the cluster, or per CPU slot when every job runs on the CPU (or the cluster has no
        GPU), and no more actors than jobs."""
        jobs = [entry.job for entry in entries if entry.error is None and not entry.skip]
        if any(job.device.startswith("cuda:") for job in jobs):
            raise AvatarError("--ray gives each actor one GPU: use device cuda or auto, not cuda:N")
        resources = ray.cluster_resources()
        gpu = any(job.device != "cpu" for job in jobs) and resources.get("GPU", 0) >= 1
        slots = int(resources.get("GPU" if gpu else "CPU", 0))
        if slots < 1:
            raise EnvironmentProblem("the Ray cluster has no CPU to run jobs on")
        return cls(ray, min(slots, len(jobs)), gpu)

    def start_one(self) -> None:
        actor = Actor(self.actor_class.remote())
        self.starting[actor.handle.pid.remote()] = actor

    @property
    def alive(self) -> bool:
        return bool(self.starting or self.idle or self.busy)

    def begin(self) -> int:
        self.batches += 1
        return self.batches

    def hand_out(self, queue: JobQueue, batch: int, on_start: Callable[[BatchEntry], None]) -> None:
        """Every idle actor gets the next job, one needing the models it holds first."""
        while self.idle and queue:
            actor = self.idle.pop(0)
            entry = queue.take(actor.models_key)
            actor.models_key = entry.models_key
            self.busy[actor.handle.run.remote(entry, batch)] = (actor, entry)
            on_start(entry)

    def wait(self, timeout: float) -> list[tuple[BatchEntry, Any]]:
        """(job, its result or the exception that ended it) of what finished within `timeout`; actors that have
        started become idle meanwhile."""
        refs = [*self.starting, *self.busy]
        if not refs:
            return []
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
        finished = []
        for ref in ready:
            if ref in self.starting:
                self._started(ref)
                continue
            actor, entry = self.busy.pop(ref)
            try:
                result = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as error:
                self.last_loss = _one_line(error)
                finished.append((entry, ActorLost(self.last_loss)))
                continue
            except self.ray.exceptions.RayError as error:
                result = error
            self.idle.append(actor)
            finished.append((entry, result))
        return finished

    def _started(self, ref) -> None:
        actor = self.starting.pop(ref)
        try:
            actor.pid = self.ray.get(ref)
        except self.ray.exceptions.RayError as error:
            self.lost_starts += 1
            self.last_loss = _one_line(error)
            return
        self.idle.append(actor)

    def replace(self, waiting: int, count: int) -> None:
        """Start an actor in place of one that died while more jobs wait than actors are alive (fewer, the living
        take them as soon as), unless starting actors keeps failing."""
        if waiting > len(self.starting) + len(self.idle) + len(self.busy) and self.lost_starts < count:
            self.start_one()

    def stop_all(self, batch: int, reason: str | None) -> None:
        for actor, _ in self.busy.values():
            actor.handle.request_stop.remote(batch, reason)

    def close(self) -> None:
        for actor in [*self.starting.values(), *self.idle, *(actor for actor, _ in self.busy.values())]:
            self.ray.kill(actor.handle)
        self.starting, self.idle, self.busy = {}, [], {}


@dataclass
class ActorLost:
    """The result of a job whose actor's process died."""

    reason: str


class JobQueue:
    """The jobs not yet handed out, in models-key groups (avatarcli/batch.py `_model_groups`); a job whose actor died
    goes back first, set to resume."""

    def __init__(self, groups: list[list[BatchEntry]]) -> None:
        self.waiting = [entry for group in groups for entry in group]
        self.losses: dict[int, int] = {}  # job index -> actors lost while running it

    def __bool__(self) -> bool:
        return bool(self.waiting)

    def take(self, models_key: tuple | None) -> BatchEntry:
        for position, entry in enumerate(self.waiting):
            if entry.models_key == models_key:
                return self.waiting.pop(position)
        return self.waiting.pop(0)

    def retry(self, entry: BatchEntry) -> bool:
        """Put a job whose actor died back first, to resume; False once it lost ATTEMPTS actors."""
        self.losses[entry.index] = self.losses.get(entry.index, 0) + 1
        if self.losses[entry.index] >= ATTEMPTS:
            return False
        entry.job.resume = True  # whatever it saved is continued, not refused
        self.waiting.insert(0, entry)
        return True

    def drain(self) -> list[BatchEntry]:
        rest, self.waiting = self.waiting, []
        return rest


def run_on_cluster(address: str | None, manifest: Path, entries: list[BatchEntry], continue_on_error: bool = False,
                   stop=None, on_job=None) -> BatchReport:
    """`batch --ray [ADDRESS]`: connect (`connect`), start the actors (`Workers.for_jobs`), run, let the actors go.
    A manifest with nothing to run (every job invalid or skipped) needs no cluster."""
    from avatarcli.batch import run_batch

    if all(entry.error is not None or entry.skip for entry in entries):
        return run_batch(manifest, entries, continue_on_error=continue_on_error, stop=stop, on_job=on_job)
    with connect(address) as ray:
        workers = Workers.for_jobs(ray, entries)
        try:
            return run_batch_ray(manifest, entries, workers, continue_on_error=continue_on_error, stop=stop,
                                 on_job=on_job)
        finally:
            workers.close()


def run_batch_ray(manifest: Path, entries: list[BatchEntry], workers: Workers, continue_on_error: bool = False,
                  stop=None, on_job: Callable[[str, BatchEntry, JobOutcome | None], None] | None = None) -> BatchReport:
    """`run_batch` (avatarcli/batch.py) on the actors of `workers`: the same outcomes and report. `on_job` also gets
    ("retry", entry, outcome) when a job's actor died and the job goes back to the queue."""
    started = time.perf_counter()
    outcomes = _unrunnable(entries)
    report = BatchReport(manifest=str(manifest), jobs=[])
    queue = JobQueue(_model_groups([entry for entry in entries if entry.index not in outcomes]))
    batch, count, halted = workers.begin(), len(workers.starting) + len(workers.idle), False
    tell = on_job or (lambda event, entry, outcome: None)
    while queue or workers.busy:
        if stop is not None and stop.requested and not halted:
            halted = True
            workers.stop_all(batch, stop.reason)
        if halted:
            for entry in queue.drain():
                outcomes[entry.index] = JobOutcome(entry.index, str(entry.output), "not run")
        workers.hand_out(queue, batch, lambda entry: tell("start", entry, None))
        for entry, result in workers.wait(POLL_SECONDS):
            if isinstance(result, ActorLost) and not halted and queue.retry(entry):
                workers.replace(len(queue.waiting), count)
                tell("retry", entry, JobOutcome(entry.index, str(entry.output), "retry", error=(
                    f"its Ray actor died ({result.reason}); another continues it from its saved state")))
                continue
            outcome = outcomes[entry.index] = _outcome(entry, result, report, queue.losses.get(entry.index, 0))
            report.interrupted |= outcome.status == "interrupted"
            halted |= outcome.status == "interrupted" or (outcome.status == "failed" and not continue_on_error)
            tell("done", entry, outcome)
        if queue and not workers.alive:
            for entry in queue.drain():
                outcomes[entry.index] = JobOutcome(entry.index, str(entry.output), "failed", exit_code=3, error=(
                    f"no Ray actor could run it ({workers.last_loss or 'none started'}); is avatarcli installed on "
                    "every node?"))
    report.jobs = [outcomes[entry.index] for entry in entries]
    report.wall_seconds = time.perf_counter() - started
    return report


def _outcome(entry: BatchEntry, result, report: BatchReport, losses: int) -> JobOutcome:
    """A finished job's outcome; its model loads counted into the report."""
    if isinstance(result, ActorLost):
        return JobOutcome(entry.index, str(entry.output), "failed", exit_code=3, error=(
            f"its Ray actor died ({'' if losses < 2 else f'{losses} times, last: '}{result.reason}); what it saved "
            "stays for --resume"))
    if isinstance(result, Exception):  # the actor's method itself failed (not the job): a bug
        return JobOutcome(entry.index, str(entry.output), "failed", exit_code=1,
                          error=f"{type(result).__name__}: {_one_line(result)}")
    outcome, loads, partial = result
    report.model_loads += loads
    report.partial_loads += partial
    return outcome


def _one_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return " ".join((lines[0] if lines else type(error).__name__).split())
