"""read and wait over HTTP without a thread each: a waiting request awaits an event of its own.

A waiter registers a watch on its process (handle.watch: the kernel calls back when that
process produces, sleeps or exits, and counts the watch against the tenant's max_blocked),
asks without waiting (timeout 0, in a worker thread for at most one kernel step), and awaits
its event only if there was nothing yet. So a thousand idle waiters hold no thread and no
kernel lock, and a step wakes only the waiters of the processes it touched. A wait whose
client goes away stops before it reaps: the exit status stays for a later wait.
"""
from __future__ import annotations

import asyncio

import anyio.to_thread

from kernel.argcheck import check_timeout
from kernel.errors import EAGAIN, KvosError

DISCONNECT_CHECK = 0.5          # seconds between looks at whether a waiting client is still there


class Disconnected(Exception):
    """The client of a waiting request went away."""


class _Wakeup:
    """The watch callback: runs on the kernel's thread, sets an asyncio event on the server's loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def __call__(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:            # the server's loop has closed (shutdown)
            pass


async def _sleep_until_woken(wake: _Wakeup, seconds: float | None, request) -> None:
    """Until the watch fires or `seconds` pass (None: no limit); Disconnected if the client left."""
    loop = asyncio.get_running_loop()
    deadline = None if seconds is None else loop.time() + seconds
    while not wake.event.is_set():
        step = DISCONNECT_CHECK if deadline is None else min(DISCONNECT_CHECK, deadline - loop.time())
        if step <= 0:
            return
        try:
            await asyncio.wait_for(wake.event.wait(), step)
        except TimeoutError:
            pass
        if request is not None and await request.is_disconnected():
            raise Disconnected()


async def read(handle, pid, timeout=0.0, request=None):
    """handle.read(pid, timeout) without holding a thread while it waits. -> ReadResult"""
    timeout = check_timeout(timeout, default=0.0)
    if not timeout:
        return await anyio.to_thread.run_sync(handle.read, pid, 0.0)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        wake = _Wakeup()
        cancel = handle.watch(pid, wake)
        try:
            result = await anyio.to_thread.run_sync(handle.read, pid, 0.0)
            remaining = deadline - loop.time()
            if result.tokens or result.text or result.turn_done or result.logprobs or remaining <= 0:
                return result
            await _sleep_until_woken(wake, remaining, request)
        finally:
            cancel()


async def wait(handle, pid, timeout=None, request=None):
    """handle.wait(pid, timeout) without holding a thread while it waits; stops without reaping
    (Disconnected) when `request`'s client goes away. -> ExitStatus"""
    timeout = check_timeout(timeout, default=None)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        wake = _Wakeup()
        cancel = handle.watch(pid, wake, ("turn", "exit"))        # not woken by every token
        try:
            if request is not None and await request.is_disconnected():
                raise Disconnected()
            try:
                return await anyio.to_thread.run_sync(handle.wait, pid, 0.0)
            except KvosError as err:
                if err.errno != EAGAIN:
                    raise
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise KvosError(EAGAIN, f"process {pid} still runs after {timeout} s")
            await _sleep_until_woken(wake, remaining, request)
        finally:
            cancel()


async def next_output(handle, pids: list, timeout: float, request=None) -> list:
    """The new output of every pid (a request's choices), waiting up to `timeout` for the first of
    them to produce anything. -> [ReadResult] in pids' order"""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        wake = _Wakeup()
        cancels = []
        try:
            for pid in pids:
                cancels.append(handle.watch(pid, wake))
            results = await anyio.to_thread.run_sync(lambda: [handle.read(pid, 0.0) for pid in pids])
            remaining = deadline - loop.time()
            if any(r.tokens or r.text or r.turn_done or r.logprobs for r in results) or remaining <= 0:
                return results
            await _sleep_until_woken(wake, remaining, request)
        finally:
            for cancel in cancels:
                cancel()
