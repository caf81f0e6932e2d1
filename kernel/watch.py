"""Waking callers: watches on one process's events, and each tenant's count of blocking calls.

A caller that blocks (wait, read with a timeout, kvosd's streams) sleeps on its own process: it
registers a callback for the events it cares about, and the kernel runs exactly those callbacks,
under its lock, when the process produces one. A step therefore wakes only the waiters of its
own processes, and a wait (turn and exit) is not woken by every token. Each blocking call or
asynchronous watch counts against its tenant's max_blocked, so no tenant can park unbounded
waiters on the kernel.
"""
from __future__ import annotations

import threading

from kernel.errors import EAGAIN, KvosError

WAKE_EVENTS = frozenset({"output", "turn", "exit"})      # what a watcher of a process may wait for


def watch(proc, callback, events=WAKE_EVENTS):
    """Run callback() once (under the kernel lock) at the next of `events` of `proc`: "output"
    (a token), "turn" (its turn ended: it sleeps) or "exit" (it exited or was reaped). Returns
    cancel(), which needs no lock."""
    entry = (frozenset(events), callback)
    proc.watchers.append(entry)

    def cancel():
        try:
            proc.watchers.remove(entry)
        except ValueError:
            pass                                   # already run
    return cancel


def wake(proc, event: str) -> None:
    """Run and forget the callbacks waiting for `event` of `proc` (call under the kernel lock)."""
    if proc.watchers:
        fire = [w for w in proc.watchers if event in w[0]]
        if fire:
            proc.watchers = [w for w in proc.watchers if event not in w[0]]
            for _, callback in fire:
                callback()


class BlockingCount:
    """Tenant.blocked, under its own small lock: releases come from wherever a wait ends, the
    daemon's event loop included, so they must not need the kernel lock."""

    def __init__(self):
        self._mutex = threading.Lock()

    def begin(self, tenant):
        """Count one blocking call (or asynchronous watch) of `tenant` in flight: EAGAIN beyond its
        max_blocked. Returns release(), to call exactly once; root (tenant None) is not counted."""
        if tenant is None:
            return _nothing
        with self._mutex:
            if tenant.blocked >= tenant.max_blocked:
                raise KvosError(EAGAIN, f"tenant {tenant.name!r} has {tenant.blocked} blocking calls in flight; "
                                        f"its limit is {tenant.max_blocked}")
            tenant.blocked += 1
        released = []

        def release():
            with self._mutex:
                if not released:
                    released.append(True)
                    tenant.blocked -= 1
        return release


def _nothing() -> None:
    pass
