"""Where the TUI's data comes from: a Snapshot of /proc, and the controls a student pokes.

Source works on a root syscall handle, an in-process kernel's or a kvosd Client's
alike: ps, meminfo(frames=True) for the memory map, schedstat, dmesg and
pagemap(text=True); pause, resume and single steps go through loopctl (root's:
with a tenant's key the views show that tenant, and the loop keys are refused).
snapshot() makes several calls and may wait for a step: call it off the UI thread.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from kernel.errors import EPERM, KvosError

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


def frame_map(info) -> FrameMap:
    """The memory map from meminfo(frames=True): rows of [state, refcount, cgroup, [pids mapping it]].
    A singly mapped frame shows as private."""
    cells = [FrameCell("private" if state == "mapped" else state, owner, refs, tuple(pids))
             for state, refs, owner, pids in info.frames or []]
    return FrameMap(info.frame_bytes, cells)


class Source:
    """A running kernel seen through a root handle (kernel.syscalls() or a Client with the root key)."""

    def __init__(self, sys):
        self.sys = sys
        self.paused = False                   # kept from each loopctl answer: the UI reads it without a call
        self.root = True
        try:
            self.paused = sys.loopctl().paused
        except KvosError as err:
            if err.errno != EPERM:
                raise
            self.root = False                 # a tenant's handle: it may look at its own, not drive the loop

    def snapshot(self, pagemap_pid: int | None = None, dmesg_since: int = 0) -> Snapshot:
        sys = self.sys
        # In-process, atomic() keeps the loop from stepping between the calls, so the panes agree;
        # over HTTP there is no such thing, and a picture a step apart is redrawn a moment later.
        atomic = getattr(sys, "atomic", None)
        with atomic() if atomic is not None else contextlib.nullcontext():
            procs = sys.ps()
            info = sys.meminfo(frames=True)
            pagemap, texts = None, []
            if pagemap_pid is not None and any(p.pid == pagemap_pid for p in procs):
                try:
                    pagemap = sys.pagemap(pagemap_pid, text=True)
                    texts = [page.text or "" for page in pagemap.pages]
                except KvosError:              # it was reaped between ps and pagemap
                    pagemap = None
            stat, log = sys.schedstat(), sys.dmesg(since=dmesg_since)
            if self.root:
                self.paused = sys.loopctl().paused
        return Snapshot(time.monotonic(), procs, info, stat, frame_map(info), log, pagemap_pid, pagemap, texts,
                        self.paused)

    # -- controls --------------------------------------------------------------------------
    def pause(self) -> None:
        self.paused = self.sys.loopctl("pause").paused

    def resume(self) -> None:
        self.paused = self.sys.loopctl("resume").paused

    def step_once(self) -> None:
        """One time slice: the paused loop runs it (this waits), or it runs here when no loop thread runs."""
        if not self.paused:
            self.pause()                       # loopctl refuses to single-step a running loop
        self.paused = self.sys.loopctl("step").paused

    def kill(self, pid: int) -> None:
        self.sys.kill(pid)

    def nice(self, pid: int, inc: int) -> int:
        return self.sys.nice(pid, inc)

    def fork(self, pid: int) -> list:
        return self.sys.fork(pid, 1)

    def wait(self, pid: int):
        return self.sys.wait(pid)
