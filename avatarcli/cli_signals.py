"""The CLI's handling of a running job: Ctrl-C / SIGTERM as a saved stop, and the progress bar (shared by
`animate` and `batch`; the library itself never touches signals or the terminal)."""

from __future__ import annotations

from rich.console import Console

from avatarcli.errors import Interrupted

err = Console(stderr=True)


class stop_on_signals:
    """SIGINT / SIGTERM ask the running job to stop after its current window-step (it saves its resume state);
    a second signal stops at once. On a requested stop: one line on stderr, exit 130."""

    def __enter__(self):
        import signal
        import threading

        from avatarcli.resume import StopFlag

        self.stop = StopFlag()

        def handler(signum, frame):
            if self.stop.requested:
                raise KeyboardInterrupt
            self.stop.request(f"interrupted by {signal.Signals(signum).name}")

        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self.stop

    def __exit__(self, exc_type, exc, traceback):
        import signal

        from avatarcli.resume import AnimateInterrupted

        for number, previous in self.previous.items():
            signal.signal(number, previous)
        if isinstance(exc, AnimateInterrupted):
            raise Interrupted(str(exc)) from None  # one line on stderr, exit 130 (main)
        return False


class progress_bar:
    """Windows done/total, window-steps done/total (windows x steps), ETA, and seconds of video per wall second.

    Shown from the first progress event on, so input errors print nothing but their one line."""

    def __init__(self, fps: float):
        self.fps, self.bar = fps, None

    def __enter__(self):
        return self.update

    def update(self, p):
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
        if self.bar is not None:
            self.bar.__exit__(*exc)
