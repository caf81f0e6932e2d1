"""Where the TUI's data comes from: a Snapshot of /proc, and the controls a student pokes.

LocalSource serves an in-process kernel driven by a KernelLoop: everything goes
through syscalls except the frame map, which also names the processes mapping
each frame, so frame_map() reads the memory manager under the kernel lock.
RemoteSource serves the same methods from a running kvosd (its frame map from
meminfo(frames=True)). Both classify frames with kernel.mm.introspect.frame_map.
snapshot() blocks for at most one kernel step: call it off the UI thread.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

FRAME_STATES = ("free", "cached", "private", "shared", "pinned")


@dataclass
class FrameCell:
    state: str                    # one of FRAME_STATES
    tenant: str | None            # the cgroup charged for it (None: free or cached)
    refcount: int
    pids: tuple = ()              # processes whose page tables map it


@dataclass
class FrameMap:
    frame_bytes: int
    cells: list                   # FrameCell per frame, in frame order

    def count(self, state: str) -> int:
        return sum(1 for c in self.cells if c.state == state)


@dataclass
class Snapshot:
    taken_at: float
    procs: list                   # [ProcInfo]
    meminfo: object               # MemInfo
    schedstat: object             # SchedStat
    frames: FrameMap
    dmesg: list                   # [LogEntry] after the `since` asked for
    pagemap_pid: int | None = None
    pagemap: object = None        # PageMap of pagemap_pid, None when it has exited
    page_texts: list = field(default_factory=list)   # the tokens of each page, as text
    paused: bool = False


def frame_cells(rows, mappers=None) -> list:
    """FrameCells from kernel.mm.introspect.frame_map rows ([state, refcount, owner]; the same
    rows meminfo(frames=True) returns over the daemon). A singly mapped frame shows as private."""
    mappers = mappers or {}
    return [FrameCell("private" if state == "mapped" else state, owner, refs, tuple(mappers.get(f, ())))
            for f, (state, refs, owner, *_) in enumerate(rows)]


def frame_map(kernel) -> FrameMap:
    """Every frame's state, charged tenant and mapping processes (call under kernel.lock)."""
    from kernel.mm.introspect import frame_map as frame_rows
    mm = kernel.mm
    if mm is None:
        return FrameMap(kernel.frame_bytes or 0, [])
    mappers: dict = {}
    for proc in kernel.procs.values():
        if proc.asid is not None and proc.asid in mm.spaces:
            for frame in mm.spaces[proc.asid].frames:
                mappers.setdefault(frame, []).append(proc.pid)
    return FrameMap(mm.frame_bytes, frame_cells(frame_rows(mm), mappers))


class _SyscallControls:
    """The controls that are plain syscalls, the same for both sources (self.sys is the handle)."""

    def kill(self, pid: int) -> None:
        self.sys.kill(pid)

    def nice(self, pid: int, inc: int) -> int:
        return self.sys.nice(pid, inc)

    def fork(self, pid: int) -> list:
        return self.sys.fork(pid, 1)

    def wait(self, pid: int):
        return self.sys.wait(pid)


class LocalSource(_SyscallControls):
    """An in-process kernel and its loop thread (userspace/shell/loop.py)."""

    def __init__(self, kernel, loop=None):
        self.kernel = kernel
        self.loop = loop
        self.sys = kernel.syscalls()

    def snapshot(self, pagemap_pid: int | None = None, dmesg_since: int = 0) -> Snapshot:
        k, sys = self.kernel, self.sys
        with k.lock:
            procs = sys.ps()
            pagemap = texts = None
            if pagemap_pid is not None and pagemap_pid in k.procs:
                pagemap = sys.pagemap(pagemap_pid)
                decode = k.procs[pagemap_pid].tenant.program.decode
                texts = [decode(page.tokens) for page in pagemap.pages]
            return Snapshot(time.monotonic(), procs, sys.meminfo(), sys.schedstat(), frame_map(k),
                            sys.dmesg(since=dmesg_since), pagemap_pid, pagemap, texts or [],
                            self.paused)

    # -- controls --------------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        return self.loop is not None and self.loop.paused

    def pause(self) -> None:
        if self.loop is not None:
            self.loop.pause()

    def resume(self) -> None:
        if self.loop is not None:
            self.loop.resume()

    def step_once(self) -> None:
        """One time slice: through the paused loop, or directly when there is no loop."""
        if self.loop is not None and self.loop.running:
            self.loop.step_once()
        else:
            self.kernel.step()


class RemoteSource(_SyscallControls):
    """The same methods over a running kvosd (a userspace.daemon.client.Client with the root key).

    The frame map comes from meminfo(frames=True) and page text from pagemap(text=True). A
    daemon's loop runs on its own: pausing and single-stepping it are refused here.
    """

    def __init__(self, client):
        self.sys = client
        self.paused = False

    def snapshot(self, pagemap_pid: int | None = None, dmesg_since: int = 0) -> Snapshot:
        from kernel.errors import KvosError
        sys = self.sys
        procs = sys.ps()
        info = sys.meminfo(frames=True)
        cells = frame_cells(info.frames or [])
        pagemap, texts = None, []
        if pagemap_pid is not None and any(p.pid == pagemap_pid for p in procs):
            try:
                pagemap = sys.pagemap(pagemap_pid, text=True)
                texts = [page.text or "" for page in pagemap.pages]
            except KvosError:                        # it exited between ps and pagemap
                pagemap = None
        return Snapshot(time.monotonic(), procs, info, sys.schedstat(), FrameMap(info.frame_bytes, cells),
                        sys.dmesg(since=dmesg_since), pagemap_pid, pagemap, texts, False)

    def _refuse(self, what: str):
        from kernel.errors import EPERM, KvosError
        raise KvosError(EPERM, f"{what}: the daemon's loop runs on its own; pause it in-process (kvos top)")

    def pause(self) -> None:
        self._refuse("pause")

    def resume(self) -> None:
        self._refuse("resume")

    def step_once(self) -> None:
        self._refuse("step")
