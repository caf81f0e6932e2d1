"""hugepages.py: an arena of 2 MiB pages for a program's weights.

A decode step streams every weight once. With 4 KiB pages that is a TLB miss every 4 KiB (about
25,000 a step for SmolLM2's 98 MB of GGUF blocks, far past what the second-level TLB maps), and in
a VM each miss is a two-level page walk. Where the weights sit in the CPU's last-level cache, those
walks are a visible part of the step: one thread streams 96 MiB at 14-15 GB/s in 4 KiB pages and
19-20 GB/s in 2 MiB ones on the AMX VM of docs/performance.md section 22, where the GGUF step at
one row went from 6.7-7.0 to 6.3 ms.

Arena(nbytes) is one private anonymous mapping, 2 MiB aligned and advised MADV_HUGEPAGE
(transparent huge pages: Linux's default "madvise" mode grants them to such a range), handed out
front to back: take(t) copies t into the next cache-line-aligned slot and gives back the copy. The
GGUF blocks' cache is read one tensor at a time into one (userspace/programs/converted.read_tensors),
so the load holds one copy of the weights plus one tensor, before anything takes a raw pointer into
them (qmm's weights, the C layer loop's tables). arena(nbytes) is None where the system grants no
huge pages (THP "never", no madvise, not Linux) or KVOS_HUGEPAGES=0 says no (A/B measurements):
the loader then reads the weights as before.
"""
from __future__ import annotations

import mmap
import os

import torch

from kernel.errors import KernelPanic

HUGE_PAGE = 2 << 20
ALIGN = 64              # every tensor starts on a cache line (the C kernels' vector loads)
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def available() -> bool:
    """Whether transparent huge pages can back a madvised range here (and the user did not say no)."""
    if os.environ.get("KVOS_HUGEPAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(THP_MODE) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


class Arena:
    """nbytes of huge-page memory, taken front to back (see the header); its user sizes it, so taking
    more than that is a broken invariant."""

    def __init__(self, nbytes: int):
        self.size = max(HUGE_PAGE, -(-nbytes // HUGE_PAGE) * HUGE_PAGE)
        self.mapping = mmap.mmap(-1, self.size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.used = 0
        # LAB(hugepages): BEGIN
        whole = torch.frombuffer(self.mapping, dtype=torch.uint8)    # its storage keeps the mapping alive
        start = -whole.data_ptr() % HUGE_PAGE
        self.mapping.madvise(mmap.MADV_HUGEPAGE, start, self.size)
        self.memory = whole[start:start + self.size]
        # LAB(hugepages): END

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of t in the next slot."""
        nbytes = t.numel() * t.element_size()
        if self.used + nbytes > self.size:
            raise KernelPanic(f"huge-page arena of {self.size} bytes: {nbytes} more do not fit after {self.used}")
        # LAB(hugepages): BEGIN
        out = self.memory[self.used:self.used + nbytes].view(t.dtype).view(t.shape)
        out.copy_(t)
        self.used += -(-nbytes // ALIGN) * ALIGN
        return out
        # LAB(hugepages): END


def arena(nbytes: int) -> Arena | None:
    """An Arena of at least nbytes, or None where huge pages cannot back one."""
    if not available():
        return None
    try:
        return Arena(nbytes)
    except OSError:            # madvise refused (a kernel without THP)
        return None
