"""The console script as a shell runs it, for the failure-path tests and benchmarks/bench_failures.py: a subprocess
in its own session (a shell's job), its stderr collected as it comes, signals sent by pid, and a test tone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SCRIPT = Path(sys.executable).parent / "avatarcli"
CLI = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "avatarcli"]
# what the status line and the progress bar draw (redrawn many times over): not message lines
DRAWN = ("animate", "loading torch", "extracting features", "restoring the saved run", "window", "━", "0:0", "-:--")


class ConsoleRun:
    """`avatarcli ARGS` in a subprocess of its own session, rich drawing as on a terminal; stdout is a pipe."""

    def __init__(self, args, env: dict | None = None, cwd: Path | None = None) -> None:
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1",
                    "COLUMNS": "200", **(env or {})}
        self.started, self.signalled = time.monotonic(), None
        self.process = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        env=full_env, cwd=cwd, start_new_session=True)
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.process.stderr.fileno(), 65536):
            self.chunks.append(chunk)

    @property
    def stderr(self) -> str:
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", b"".join(self.chunks).decode(errors="replace"))

    def wait_for(self, found, timeout: float = 240) -> None:
        """Until `found()` (or the text `found` on stderr); AssertionError if the process ends first."""
        test = found if callable(found) else lambda: found in self.stderr
        deadline = time.monotonic() + timeout
        while not test():
            assert self.process.poll() is None, f"ended before {found!r}: {self.stderr[-2000:]}"
            assert time.monotonic() < deadline, f"no {found!r} after {timeout} s"
            time.sleep(0.005)

    def send(self, sig: int) -> None:
        self.signalled = self.signalled or time.monotonic()
        os.kill(self.process.pid, sig)

    def finish(self, timeout: float = 240) -> tuple[int, float]:
        """Exit status, and seconds from the first signal (or, with none sent, from the start) to the exit."""
        code = self.process.wait(timeout)
        ended = time.monotonic()
        self.reader.join(5)
        return code, ended - (self.signalled or self.started)

    def message_lines(self) -> list[str]:
        """stderr without the status line and the bar."""
        lines = [line.strip() for line in self.stderr.replace("\r", "\n").splitlines()]
        return [line for line in lines if re.search(r"[a-z]{3}", line) and not line.startswith(DRAWN)]


def tone(path: Path, seconds: float) -> Path:
    """A 16 kHz WAV of a 180 Hz tone, amplitude-modulated at 3 Hz (speech-like loudness), at `path`."""
    from avatarcli.media.audio import write_wav

    t = np.arange(int(seconds * 16000)) / 16000
    write_wav(path, 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)))
    return path
