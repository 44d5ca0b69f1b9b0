"""The shared background worker: bounded queue, errors handed to the caller, drain, close and abort."""

from __future__ import annotations

import threading
import time

import pytest

from avatarcli.worker import Worker


class Gate:
    """A handler that records items and can be held: items wait at the gate until it opens."""

    def __init__(self, fail_on: object = None) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.handled: list[object] = []
        self.threads: set[str] = set()
        self.fail_on = fail_on

    def __call__(self, item: object) -> None:
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        assert self.opened.wait(10), "the gate was never opened"
        if item == self.fail_on:
            raise OSError(f"cannot handle {item}")
        self.handled.append(item)


def _alive(name: str) -> bool:
    return any(t.name == name for t in threading.enumerate())


def _in_background(call) -> threading.Thread:
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def test_items_are_handled_in_order_on_the_named_thread_and_close_stops_it():
    gate = Gate()
    gate.opened.set()
    worker = Worker(gate, max_pending=2, name="test-worker-order")
    for item in range(10):
        worker.submit(item)
    worker.close()
    assert gate.handled == list(range(10)) and gate.threads == {"test-worker-order"}
    assert not _alive("test-worker-order")
    with pytest.raises(RuntimeError, match="stopped"):
        worker.submit(10)


def test_submit_blocks_while_the_queue_is_full():
    gate = Gate()
    worker = Worker(gate, max_pending=2, name="test-worker-full")
    worker.submit(0)
    assert gate.entered.wait(10)  # 0 is being handled: 1 and 2 fill the queue
    worker.submit(1)
    worker.submit(2)
    assert worker.pending == 3
    blocked = _in_background(lambda: worker.submit(3))
    blocked.join(0.2)
    assert blocked.is_alive()  # backpressure: no room until the worker takes the next item
    gate.opened.set()
    blocked.join(10)
    assert not blocked.is_alive()
    worker.close()
    assert gate.handled == [0, 1, 2, 3]


def test_drain_waits_until_everything_submitted_is_handled():
    gate = Gate()
    worker = Worker(gate, max_pending=4, name="test-worker-drain")
    for item in range(3):
        worker.submit(item)
    drained = threading.Event()
    drainer = _in_background(lambda: (worker.drain(), drained.set()))
    assert not drained.wait(0.2) and gate.handled == []
    gate.opened.set()
    drainer.join(10)
    assert drained.is_set() and gate.handled == [0, 1, 2] and worker.pending == 0
    worker.submit(3)  # a drained worker keeps working
    worker.close()
    assert gate.handled == [0, 1, 2, 3]


def test_a_worker_error_is_raised_in_the_caller_as_itself_and_nothing_after_it_is_handled():
    gate = Gate(fail_on=1)
    worker = Worker(gate, max_pending=3, name="test-worker-error")
    for item in range(4):
        worker.submit(item)
    gate.opened.set()
    with pytest.raises(OSError, match="cannot handle 1"):
        worker.drain()
    with pytest.raises(OSError, match="cannot handle 1"):  # every later call, until abort
        worker.submit(4)
    with pytest.raises(OSError, match="cannot handle 1"):
        worker.close()
    assert gate.handled == [0] and not _alive("test-worker-error")
    worker.abort()  # the error is dropped, nothing more is taken
    worker.close()
    with pytest.raises(RuntimeError, match="stopped"):
        worker.submit(5)


def test_an_error_releases_a_submit_blocked_on_the_full_queue():
    gate = Gate(fail_on=0)
    worker = Worker(gate, max_pending=1, name="test-worker-release")
    worker.submit(0)
    assert gate.entered.wait(10)
    worker.submit(1)
    failures: list[BaseException] = []

    def submit_more():
        try:
            worker.submit(2)
        except BaseException as error:
            failures.append(error)

    blocked = _in_background(submit_more)
    gate.opened.set()
    blocked.join(10)
    assert not blocked.is_alive() and isinstance(failures[0], OSError)
    worker.abort()
    assert gate.handled == []


def test_abort_with_a_full_queue_drops_what_waits_and_does_not_hang():
    gate = Gate()
    worker = Worker(gate, max_pending=2, name="test-worker-abort")
    worker.submit(0)
    assert gate.entered.wait(10)
    worker.submit(1)
    worker.submit(2)  # full, with 0 held at the gate
    failures: list[BaseException] = []

    def submit_more():
        try:
            worker.submit(3)
        except BaseException as error:
            failures.append(error)

    blocked = _in_background(submit_more)  # waits for room
    time.sleep(0.05)
    aborter = _in_background(worker.abort)
    aborter.join(0.2)
    assert aborter.is_alive()  # abort lets the item being handled finish
    gate.opened.set()
    aborter.join(10)
    blocked.join(10)
    assert not aborter.is_alive() and not blocked.is_alive()
    assert gate.handled == [0] and not _alive("test-worker-abort")
    assert len(failures) == 1 and isinstance(failures[0], RuntimeError)
    worker.abort()  # again: a no-op
    worker.drain()  # nothing pending, nothing raised


def test_an_error_met_while_aborting_is_not_raised():
    gate = Gate(fail_on=0)
    worker = Worker(gate, max_pending=1, name="test-worker-abort-error")
    worker.submit(0)
    assert gate.entered.wait(10)
    aborter = _in_background(worker.abort)
    time.sleep(0.05)
    gate.opened.set()
    aborter.join(10)
    assert not aborter.is_alive()
    worker.drain()
    worker.close()


def test_max_pending_must_be_positive():
    with pytest.raises(ValueError, match="max_pending"):
        Worker(lambda item: None, max_pending=0)
