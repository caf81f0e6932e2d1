"""Grader of lab klock: the FIFO kernel lock (docs/labs/klock.md).

Threads queue for the lock and the order they get it is checked; every wait is bounded, so a lock
that hands itself to nobody fails a test instead of hanging the grader. Then a kernel whose loop
thread steps back to back must let a syscall in between any two steps.
"""
import threading
import time

import pytest

import kernel.klock as klock
from kernel.klock import KernelLock
from tests.kernel_helpers import TINY, frames
from tests.labs.grading import points

LIMIT = 3.0           # seconds any thread may wait here (they get the lock in microseconds)
pytestmark = pytest.mark.timeout(30)      # and a whole test, when a wait is not bounded


def _until(predicate, what):
    deadline = time.monotonic() + LIMIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def _start(target):
    thread = threading.Thread(target=target, daemon=True)       # a stuck one cannot keep the grader alive
    thread.start()
    return thread


def _join(threads):
    for t in threads:
        t.join(LIMIT)
        assert not t.is_alive(), "a thread never got the lock"


@points(4)
def test_release_hands_the_lock_to_the_oldest_waiter():
    lock, order = KernelLock(), []
    lock.acquire()
    threads = []
    for i in range(4):
        def take(i=i):
            with lock:
                order.append(i)
        threads.append(_start(take))
        _until(lambda n=i: len(lock._queue) == n + 1, f"waiter {i} to queue")
    lock.release()
    assert lock.acquire(timeout=LIMIT), "the lock was never free again"   # the releaser asks again at once,
    order.append("releaser")                                                # as the loop thread does
    lock.release()
    _join(threads)
    assert order == [0, 1, 2, 3, "releaser"], f"the lock went in the order {order}"


@points(3)
def test_a_condition_wait_gets_its_depth_back():
    lock = KernelLock()
    cond = threading.Condition(lock)
    woke, released = [], []

    def sleeper():
        with lock:
            with lock:                # depth 2
                cond.wait(LIMIT)
                woke.append(lock._depth)
        released.append(not lock._is_owned())
    t = _start(sleeper)
    _until(lambda: lock._owner is None and not lock._queue and woke == [] and t.is_alive(), "the sleeper to wait")
    time.sleep(0.01)
    with lock:
        cond.notify()
        _until(lambda: len(lock._queue) == 1, "the sleeper to queue again")     # it gets the lock by hand-off
    _join([t])
    assert woke == [2] and released == [True], "a waiter got the lock back at another depth"
    assert lock.acquire(blocking=False), "the lock was not left free"
    lock.release()


@points(3)
def test_a_timed_out_waiter_gives_its_place_up():
    lock, got = KernelLock(), []
    lock.acquire()
    t = _start(lambda: got.append(lock.acquire(timeout=0.05)))
    _join([t])
    assert got == [False]
    lock.release()
    assert lock.acquire(blocking=False), "the lock went to a waiter who had left"
    lock.release()


@points(3)
def test_a_hand_off_racing_a_timeout_is_kept():
    """The waiter's wait times out just as the releaser hands it the lock: it owns the lock now,
    and must say so (returning False would leave the lock held by nobody who knows it)."""
    lock, result = KernelLock(), []
    handed = threading.Event()

    class LateWaiter(klock._Waiter):
        def __init__(self, thread, depth):
            super().__init__(thread, depth)
            real = self.granted

            class Granted:                        # waits for the hand-off, then reports a timeout
                def acquire(self, timeout=-1):
                    real.acquire(timeout=LIMIT)
                    handed.set()
                    return False

                def release(self):
                    real.release()
            self.granted = Granted()
    original, klock._Waiter = klock._Waiter, LateWaiter
    try:
        lock.acquire()

        def late():
            try:
                result.append(lock.acquire(timeout=1.0))
            except Exception as exc:          # noqa: BLE001 -- reported below
                result.append(exc)
            else:
                if result[-1] is True:
                    lock.release()
        t = _start(late)
        _until(lambda: len(lock._queue) == 1, "the waiter to queue")
        lock.release()
        _join([t])
    finally:
        klock._Waiter = original
    assert handed.is_set() and result == [True], f"acquire returned {result} though the lock was handed over"
    assert lock.acquire(blocking=False), "the lock is held by nobody who knows it"
    lock.release()


@points(2)
def test_a_syscall_gets_in_between_two_steps():
    import kernel
    k = kernel.boot(memory=frames(64))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    for i in range(8):
        sys.spawn(tid, [5 + i, 6, 7], max_tokens=400, ignore_eos=True, temperature=0)
    k.start_loop()
    gaps, done = [], []

    def caller():
        last = sys.schedstat().steps
        for _ in range(15):
            now = sys.schedstat().steps
            gaps.append(now - last)
            last = now
        done.append(True)
    thread = _start(caller)
    thread.join(LIMIT)
    assert done, "a syscall never got the lock from the loop thread"      # (a stuck kernel is left to die)
    k.shutdown(kill=True)
    assert max(gaps[1:]) <= 2, f"a syscall waited {max(gaps[1:])} steps for the lock"
