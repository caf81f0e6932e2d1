"""The kernel lock: reentrant, first come first served, and usable by threading.Condition.

A step holds the lock for its whole forward pass, and the loop thread asks for it
again as soon as it lets go. CPython's own locks do not hand off: the thread that
releases usually wins the next acquire. With threading.RLock, 32 processes of the
tiny model stepping in a loop thread, 8 threads streaming with read(timeout) and
one calling ps back to back, a read came back with 18 to 29 tokens on average
(one waited 237 steps) and ps once waited 242 steps. Syscalls are the kernel's
interrupts: they must not wait for the run queue to drain.

So waiters queue, and release hands the lock straight to the oldest waiter. With
this lock the same run gives every read one token and ps a turn every step, at
about 10% fewer steps a second on the tiny model (the step now also serves nine
syscalls; on SmolLM2 a step is 10-100x longer and the cost is lost in it).
Through the daemon on SmolLM2, time to first token fell 3.6x to 22x (a spawn no
longer waits out other requests' steps); docs/daemon.md has the numbers, and the
tiny model's cost there. A thread woken from kernel.changed.wait() queues like
any other.
"""
import threading
from collections import deque


class _Waiter:
    __slots__ = ("thread", "depth", "granted")

    def __init__(self, thread: int, depth: int):
        self.thread = thread
        self.depth = depth                    # the recursion depth it gets back (a Condition wait saves it)
        self.granted = threading.Lock()       # held until the lock is handed to this waiter
        self.granted.acquire()


class KernelLock:
    """A FIFO reentrant lock; a drop-in for threading.RLock, Condition included."""

    def __init__(self):
        self._mutex = threading.Lock()        # guards the fields below; held only for a few lines
        self._owner = None                    # thread ident of the holder
        self._depth = 0
        self._queue: deque[_Waiter] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._acquire(1, blocking, timeout)

    def release(self) -> None:
        with self._mutex:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot release un-acquired lock")
            self._depth -= 1
            if self._depth == 0:
                self._hand_off()

    def __enter__(self) -> bool:
        return self._acquire(1, True, -1)

    def __exit__(self, *exc) -> None:
        self.release()

    def _acquire(self, depth: int, blocking: bool, timeout: float) -> bool:
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._depth += depth
                return True
            if self._owner is None and not self._queue:
                self._owner, self._depth = me, depth
                return True
            if not blocking:
                return False
            waiter = _Waiter(me, depth)
            self._queue.append(waiter)
        try:
            got = waiter.granted.acquire(timeout=-1 if timeout is None or timeout < 0 else timeout)
        except BaseException:                            # Ctrl-C while waiting: leave no place behind
            with self._mutex:
                if self._owner == me:                    # handed over meanwhile: hand it on
                    self._hand_off()
                else:
                    self._queue.remove(waiter)
            raise
        if not got:
            with self._mutex:
                # LAB(klock): BEGIN -> self._queue.remove(waiter)
                got = self._owner == me                  # handed over just as the wait timed out
                if not got:
                    self._queue.remove(waiter)
                # LAB(klock): END
        return got

    def _hand_off(self) -> None:
        """Give the free lock to the oldest waiter, or leave it free (caller holds _mutex)."""
        # LAB(klock): BEGIN -> self._owner, self._depth = None, 0
        if self._queue:
            waiter = self._queue.popleft()
            self._owner, self._depth = waiter.thread, waiter.depth
            waiter.granted.release()
        else:
            self._owner, self._depth = None, 0
        # LAB(klock): END

    # -- what threading.Condition calls: wait() releases every level and gets them all back ---------
    def _is_owned(self) -> bool:
        return self._owner == threading.get_ident()

    def _release_save(self) -> int:
        with self._mutex:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot wait on un-acquired lock")
            depth = self._depth
            self._hand_off()
        return depth

    def _acquire_restore(self, depth: int) -> None:
        # Condition.wait() must return holding the lock, or the caller's `with` releases a lock it
        # does not hold: an interrupt while queueing again is kept until the lock is back (as
        # RLock, whose re-acquire cannot be interrupted), then raised.
        interrupted = None
        while True:
            try:
                self._acquire(depth, True, -1)
                break
            except BaseException as exc:               # noqa: BLE001 -- raised below, lock held
                interrupted = exc
        if interrupted is not None:
            raise interrupted
