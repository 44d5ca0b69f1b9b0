"""One background thread that works through a bounded queue of items, in order.

Both the overlapped decoder (decode/overlap.py) and the background video sink (sink/ffmpeg.py) hand work to a
thread this way, so it lives here once:
  * `submit` blocks while `max_pending` items wait (memory stays bounded: backpressure on the producer);
  * a failure on the worker is kept and raised on the caller's thread, as the exception the worker met, by the next
    `submit`, `drain` or `close` (and by every later one until `abort`); the items still waiting are dropped and no
    item after the failed one is handled;
  * `drain` returns once everything submitted has been handled; `close` does that, then stops the thread;
  * `abort` drops what waits, lets the item being handled finish, stops the thread and raises nothing; a caller
    blocked in `submit` on another thread is released (with RuntimeError). It never waits for a full queue.

Standard library only, so importing it costs nothing.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any


class Worker:
    """Runs `handle(item)` on a thread named `name` for each submitted item; see the module docstring."""

    def __init__(self, handle: Callable[[Any], None], max_pending: int = 2, name: str = "avatarcli-worker") -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.name = name
        self.max_pending = max_pending
        self._handle = handle
        self._items: deque = deque()
        self._changed = threading.Condition()
        self._busy = False  # an item is being handled
        self._error: BaseException | None = None
        self._state = "running"  # running -> closing (finish what waits) or stopped (drop it)
        self._thread: threading.Thread | None = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Items submitted and not yet finished (the one being handled included)."""
        with self._changed:
            return len(self._items) + self._busy

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._items and self._state == "running":
                    self._changed.wait()
                if not self._items:
                    return  # closing with nothing left, or stopped
                item = self._items.popleft()
                self._busy = True
                self._changed.notify_all()  # room for a blocked submit
            try:
                self._handle(item)
            except BaseException as error:  # handed to the caller's thread
                with self._changed:
                    if self._state != "stopped":  # an abort does not want it
                        self._error = error
                        self._items.clear()  # nothing after a failed item is handled
            finally:
                item = None  # do not keep the last item alive while waiting for the next
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, item: Any) -> None:
        """Queue `item`, waiting while `max_pending` items wait; raise the worker's error, if any."""
        with self._changed:
            while True:
                self._raise_error()
                if self._state != "running":
                    raise RuntimeError(f"the worker {self.name} was stopped; it takes no more work")
                if len(self._items) < self.max_pending:
                    break
                self._changed.wait()
            self._items.append(item)
            self._changed.notify_all()

    def drain(self) -> None:
        """Wait until every submitted item is handled; raise the worker's error, if any."""
        with self._changed:
            while (self._items or self._busy) and self._error is None:
                self._changed.wait()
            self._raise_error()

    def _join(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def close(self) -> None:
        """Handle everything submitted, stop the thread, then raise the worker's error, if any."""
        with self._changed:
            if self._state == "running":
                self._state = "closing"
                self._changed.notify_all()
        self._join()
        self._raise_error()

    def abort(self) -> None:
        """Drop the waiting items, let the one being handled finish, stop the thread. Raises nothing."""
        with self._changed:
            self._state = "stopped"
            self._items.clear()
            self._error = None
            self._changed.notify_all()
        self._join()
