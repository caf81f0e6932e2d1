"""One replica: a whole kernel booted inside a Ray actor, driven through syscall handles.

The actor is asynchronous (Ray runs its coroutines on one event loop, many at a time): a
syscall runs in the actor's thread pool, so a blocking one (wait, read with a timeout) holds
a thread of the replica, never the gateway's; a watch is a coroutine that awaits the kernel's
callback, so a thousand idle watchers hold no thread at all. Errors travel back as values
(errno, message), not as pickled exceptions, and the gateway raises them again.

Ray is imported by the caller (cluster.py wraps this class with ray.remote), so this module is
plain Python that a test can also drive without Ray.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import kernel
from kernel.errors import KernelPanic, KvosError

SYSCALL_THREADS = 64         # syscalls of one replica running at once (blocking waits hold one each)


class Replica:
    def __init__(self, index: int, boot: dict):
        self.index = index
        # Random pids, as kvosd: a tenant learns nothing of the others from pid numbers.
        self.kernel = kernel.boot(**{"pids": "random", **boot, "loop": True})
        self.root = self.kernel.syscalls()
        self.handles: dict = {None: self.root}        # tid -> that tenant's handle
        self.pool = ThreadPoolExecutor(SYSCALL_THREADS, thread_name_prefix=f"replica{index}")
        self.watches: dict = {}                       # watch id -> [asyncio.Event, cancel or None, fired]

    def _handle(self, tid):
        handle = self.handles.get(tid)
        if handle is None or not handle.alive:
            handle = self.handles[tid] = self.kernel.syscalls(as_tenant=tid)
        return handle

    def _run(self, tid, name, kwargs):
        try:
            return ("ok", getattr(self._handle(tid), name)(**kwargs))
        except KvosError as err:
            return ("error", err.errno, err.reason)
        except KernelPanic as err:
            return ("panic", str(err))

    async def call(self, tid, name: str, kwargs: dict):
        """One syscall as tenant `tid` (None: root), in the pool. -> ("ok", result) | ("error", errno,
        reason) | ("panic", message)"""
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._run, tid, name, kwargs)

    def ping(self) -> int:
        return self.index

    # -- watches: the asynchronous read and wait (userspace/daemon/waiting.py) ----------------------
    # A watch is three calls from the gateway -- watch (register), fired (await), unwatch -- which Ray
    # may start in any order on an async actor; the slot is made by whichever comes first and
    # forgotten when all three have come.
    def _slot(self, wid) -> dict:
        slot = self.watches.get(wid)
        if slot is None:
            slot = self.watches[wid] = {"event": asyncio.Event(), "cancel": None, "fired": False,
                                        "cancelled": False, "seen": set()}
        return slot

    def _seen(self, wid, slot, part: str) -> None:
        slot["seen"].add(part)
        if len(slot["seen"]) == 3:
            self.watches.pop(wid, None)

    async def watch(self, wid, tid, pid: int, events) -> tuple:
        """Register watch `wid` on local process `pid`; the kernel's callback sets its event.
        -> ("ok", None) or an error (ESRCH, EAGAIN past the tenant's max_blocked, ...)"""
        loop = asyncio.get_running_loop()
        slot = self._slot(wid)
        try:
            if slot["cancelled"]:                 # unwatch came first: nothing to register
                return ("ok", None)

            def fired():                          # on the kernel's thread: only signal
                slot["fired"] = True
                loop.call_soon_threadsafe(slot["event"].set)
            try:
                slot["cancel"] = self._handle(tid).watch(pid, fired, tuple(events))
            except KvosError as err:
                slot["event"].set()
                return ("error", err.errno, err.reason)
            return ("ok", None)
        finally:
            self._seen(wid, slot, "watch")

    async def fired(self, wid) -> bool:
        """Wait until watch `wid` fires (True), fails to register or is cancelled (False)."""
        slot = self._slot(wid)
        try:
            await slot["event"].wait()
            return slot["fired"]
        finally:
            self._seen(wid, slot, "fired")

    async def unwatch(self, wid) -> None:
        slot = self._slot(wid)
        slot["cancelled"] = True
        if slot["cancel"] is not None:
            slot["cancel"]()                      # the kernel's cancel: no lock, once
            slot["cancel"] = None
        slot["event"].set()
        self._seen(wid, slot, "unwatch")

    def shutdown(self, kill: bool = True, timeout: float | None = None) -> dict:
        """Stop the kernel (kill or finish what runs), free everything, fsck. -> a short report"""
        try:
            self.kernel.shutdown(kill=kill, timeout=timeout)
        except KernelPanic as err:
            return {"fsck": f"panic: {err}"}
        info = self.root.meminfo()        # the pool stays: meminfo and friends answer after shutdown
        return {"frames_total": info.total, "frames_free": info.free, "frames_cached": info.cached,
                "frames_mapped": info.mapped, "swap_used": info.swap_used, "fsck": "clean"}
