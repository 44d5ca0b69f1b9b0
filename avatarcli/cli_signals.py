"""The CLI's handling of a running job: Ctrl-C / SIGTERM, and what is shown meanwhile (a status line for the stages
before sampling, then the progress bar). Shared by `animate` and `batch`; the library itself never touches signals or
the terminal: it reports its stages through its progress callback (avatarcli/job.py `Progress.stage`).

What a Ctrl-C or SIGTERM (a "stop") does depends on the stage `animate` is in:
  * features, sample: the job stops after its current window-step, saving its state for --resume. A step that takes
    longer than ESCALATE_AFTER is not waited for: the job stops as on a second stop, and the last save is kept.
  * start (torch's import), load, resume (restoring a saved run), finish (the last decode and the encode): at once,
    there is nothing new to save.
A second stop stops at once (the partial files go; a saved run stays). A third stop, or a process still running
HARD_EXIT_AFTER seconds after the first (stuck in a long native call), ends with os._exit. Every way out is exit 130
with one line on stderr saying what was kept. `batch` reports no stages: there the first stop always waits for the
window-step (and is never timed out), as before.
"""

from __future__ import annotations

import os
import sys
import threading

from rich.console import Console

from avatarcli.errors import EXIT_INTERRUPTED, Interrupted

err = Console(stderr=True)

ESCALATE_AFTER = 1.0  # seconds a stop waits for the window-step (and its save) to finish
HARD_EXIT_AFTER = 1.7  # seconds after the first stop at which the process ends whatever it is doing
WAITING_STAGES = ("features", "sample")  # a stop there waits for the next window-step, which saves the state
STAGE_WORDS = {"start": "while starting", "load": "while loading the models", "features": "while extracting features",
               "resume": "while restoring the saved run", "sample": "while sampling",
               "finish": "while writing the last frames"}
STATUS = {"load": "loading torch and the models",
          "features": "extracting features (text, portrait, audio)", "resume": "restoring the saved run"}

_said = threading.Lock()  # held once the one line of an interruption is out
_jobs = [0]  # jobs started by this command (a stop before the first has nothing to report but itself)


def say_interrupted(line: str) -> None:
    """The one line of an interruption on stderr: printed once per process, whoever gets there first."""
    if _said.acquire(blocking=False):
        print(line, file=sys.stderr, flush=True)


def end_process(line: str) -> None:
    """Out at once, whatever the main thread is doing: the line (the status or bar being drawn is wiped and the
    cursor shown again, as rich would on a normal stop), exit 130."""
    if err.is_terminal:
        sys.stderr.write("\r\x1b[2K\x1b[?25h")
    say_interrupted(line)
    os._exit(EXIT_INTERRUPTED)


def interrupted_line() -> str:
    """The line of a stop that reached the command itself: during start-up, or a batch's second stop."""
    return "interrupted" if _jobs[0] else "interrupted while starting: nothing written"


def kept(output, what: str) -> str:
    """`what` happened, and what of the output is kept: a saved run to --resume, the finished file, or nothing."""
    if output is None:
        return what
    from pathlib import Path

    from avatarcli.resume import ResumeFolder

    folder = ResumeFolder(output)
    saved = folder.saved_frames()
    if saved is not None:
        return (f"{what}: the run saved at frame {saved[0]} of {saved[1]} is kept in {folder.path}; run again with "
                "--resume to continue")
    if Path(output).is_file():
        return f"{what}: {output} was complete and is kept"
    return f"{what}: nothing written to {output}"


class interrupts_for_command:
    """Around a whole command: SIGTERM acts as Ctrl-C does (KeyboardInterrupt) until a job's own handling takes
    over, so a stop during start-up is exit 130 too. `console`: the process ends with this command, so once it
    returns any further stop ends it at once (no traceback from the interpreter's shutdown)."""

    def __init__(self, console: bool) -> None:
        self.console, self.previous, self.code = console, {}, EXIT_INTERRUPTED

    def ended(self, code: int) -> int:
        """The command's exit status: also the process's if a stop arrives while it ends."""
        self.code = code
        return code

    def __enter__(self):
        import signal

        global _said
        _said, _jobs[0] = threading.Lock(), 0
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if not self.previous:
            return
        if not self.console:
            for number, previous in self.previous.items():
                signal.signal(number, previous)
            return
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, lambda *_: os._exit(self.code))
        if _said.locked():  # interrupted, and said so: skip the interpreter's teardown (torch's takes a while,
            sys.stdout.flush()  # and restores the default handlers: a stop then would kill the process)
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)


class stop_on_signals:
    """SIGINT / SIGTERM during a job: see the module docstring. `output`: the job's output (named in the line);
    `stage`: the stage it starts in, None when its stages are not reported (batch: every first stop waits)."""

    def __init__(self, output=None, stage: str | None = None) -> None:
        self.output, self.stage = output, stage

    def __enter__(self):
        import signal

        from avatarcli.resume import StopFlag

        self.stop, self.signals, self.active = StopFlag(), 0, True
        _jobs[0] += 1
        self.lock, self.timers = threading.Lock(), []
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.previous = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self.stop

    def handler(self, signum, frame) -> None:
        import signal

        self.signals += 1
        if self.signals == 1:
            self.stop.request(f"interrupted by {signal.Signals(signum).name}")
            if self.stage is None:
                return  # batch: wait for the window-step
            self.later(HARD_EXIT_AFTER, self.exit_now)
            if self.stage in WAITING_STAGES:
                self.later(ESCALATE_AFTER, self.escalate)
                return
        if self.signals <= 2:
            raise KeyboardInterrupt
        self.exit_now()

    def track(self, stage: str) -> None:
        """The job entered `stage` (from its progress callback, on the main thread)."""
        self.stage = stage
        if stage not in WAITING_STAGES and self.stop.requested and self.signals < 2:
            self.signals = 2  # a stop waiting for a window-step that will not come: stop now
            raise KeyboardInterrupt

    def later(self, seconds: float, action) -> None:
        timer = threading.Timer(seconds, action)
        timer.daemon = True
        self.timers.append(timer)
        timer.start()

    def escalate(self) -> None:
        """The window-step took too long: stop as on a second signal (handled on the main thread)."""
        import _thread
        import signal

        with self.lock:
            if self.active and self.signals < 2:
                _thread.interrupt_main(signal.SIGINT)

    def exit_now(self) -> None:
        with self.lock:
            if not self.active:
                return
        end_process(self.line())

    def stopped_again(self, signum, frame) -> None:
        end_process(self.line())

    def line(self) -> str:
        """What happened and what is kept."""
        what = self.stop.reason or "interrupted"
        return kept(self.output, f"{what} {STAGE_WORDS[self.stage]}" if self.stage in STAGE_WORDS else what)

    def __exit__(self, exc_type, exc, traceback):
        import signal

        from avatarcli.resume import AnimateInterrupted

        with self.lock:
            self.active = False
        for timer in self.timers:
            timer.cancel()
        for number, previous in self.previous.items():  # stopped: a further stop while that is said ends it all
            signal.signal(number, previous if not self.stop.requested else self.stopped_again)
        if isinstance(exc, AnimateInterrupted):
            raise Interrupted(str(exc)) from None  # one line on stderr, exit 130 (main)
        if self.signals >= 2 and isinstance(exc, Exception) and not isinstance(exc, Interrupted):
            # A second stop cut off whatever ran then; native code (torch.save's writer, a pipe to ffmpeg) reports
            # the KeyboardInterrupt as its own error. It is still this stop.
            raise Interrupted(self.line()) from None
        return False


class progress_bar:
    """The job's stages on stderr: a status line (rich's status) while torch and the models load, the features are
    extracted or a saved run is restored; then windows done/total, window-steps done/total (windows x steps), ETA,
    and seconds of video per wall second. Each `Progress` also goes to `guard` (what a stop does depends on it).

    `silent`: nothing is drawn (--quiet, --json). Input errors print nothing but their one line: nothing is drawn
    before the first progress event."""

    def __init__(self, fps: float, guard: stop_on_signals | None = None, silent: bool = False):
        self.fps, self.guard, self.silent, self.bar, self.status = fps, guard, silent, None, None

    def __enter__(self):
        return self.update

    def update(self, p):
        if self.guard is not None:
            self.guard.track(p.stage)
        if self.silent:
            return
        if p.stage in STATUS:
            self.show_status(STATUS[p.stage])
            return
        self.stop_status()
        self.show_bar(p)

    def show_status(self, text: str) -> None:
        if self.status is None:
            self.status = err.status(text)
            self.status.start()
        else:
            self.status.update(text)

    def stop_status(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def show_bar(self, p) -> None:
        if self.bar is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]animate"), BarColumn(), TextColumn("{task.fields[windows]}"),
                                TextColumn("{task.fields[steps]}"), TextColumn("{task.fields[speed]}"),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=err)
            self.bar.__enter__()
            self.task = self.bar.add_task("animate", total=p.window_steps_total, windows="", steps="", speed="")
        speed = p.frames_written / self.fps / p.elapsed_seconds if p.elapsed_seconds else 0.0
        self.bar.update(self.task, total=p.window_steps_total, completed=p.window_steps_done,
                        windows=f"windows {p.windows_done}/{p.windows_total} ({p.steps_per_window} steps each)",
                        steps=f"window-steps {p.window_steps_done}/{p.window_steps_total}",
                        speed=f"{speed:.3f} s video/s")

    def __exit__(self, *exc):
        self.stop_status()
        if self.bar is not None:
            self.bar.__exit__(*exc)
