"""The frame table: free list, reference counts, the LRU of cached frames, charges.

Every frame is exactly one of: free (on the free list), cached (no references,
named in the page cache, on the LRU list), or mapped (references > 0).
Allocation pops the free list, else evicts the least recently used cached
frame; both O(1). Callers check `available` (and the cgroup's room) before a
multi-frame allocation, so it either completes or changes nothing.
"""
from collections import OrderedDict

from kernel.errors import KernelPanic
from kernel.mm.cgroup import MemCgroup
from kernel.mm.pagecache import PageCache


class FrameTable:
    def __init__(self, num_frames: int, page_cache: PageCache):
        self.num_frames = num_frames
        self.page_cache = page_cache
        # one entry per frame
        self.refcount = [0] * num_frames       # page-table entries + segment mappings
        self.pins = [0] * num_frames           # segment mappings (a subset of refcount)
        self.num_pinned = 0                    # frames with pins > 0
        self.owner: list = [None] * num_frames  # MemCgroup charged while mapped
        # free frames, popped from the end: frame 0 is handed out first
        self.free_list = list(range(num_frames - 1, -1, -1))
        # cached frames, least recently used first
        self.lru: OrderedDict = OrderedDict()

    @property
    def num_free(self) -> int:
        return len(self.free_list)

    @property
    def num_cached(self) -> int:
        return len(self.lru)

    @property
    def num_mapped(self) -> int:
        return self.num_frames - self.num_free - self.num_cached

    @property
    def available(self) -> int:
        """Frames an allocation may take: free ones, then cached ones by eviction."""
        return len(self.free_list) + len(self.lru)

    def alloc(self, cgroup: MemCgroup) -> int:
        """A frame with one reference, charged to `cgroup`. Caller has checked `available`."""
        if self.free_list:
            frame = self.free_list.pop()
        elif self.lru:
            # LAB(pagecache): BEGIN
            frame, _ = self.lru.popitem(last=False)      # the least recently used cached page goes
            self.page_cache.drop(frame)
            self.page_cache.stats.evictions += 1
            # LAB(pagecache): END
        else:
            raise KernelPanic("FrameTable.alloc: no frame available (caller did not reserve)")
        self.refcount[frame] = 1
        self.owner[frame] = cgroup
        cgroup.charged += 1
        return frame

    def incref(self, frame: int, cgroup: MemCgroup) -> None:
        """One more reference. A cached frame comes off the LRU and is charged to `cgroup`."""
        if self.refcount[frame] == 0:
            if frame not in self.lru:
                raise KernelPanic(f"FrameTable.incref: frame {frame} is free")
            del self.lru[frame]
            self.owner[frame] = cgroup
            cgroup.charged += 1
        self.refcount[frame] += 1

    def decref(self, frame: int) -> None:
        """One reference less. The last one uncharges; a named frame stays cached, others go free."""
        count = self.refcount[frame] - 1
        if count < 0:
            raise KernelPanic(f"FrameTable.decref: frame {frame} has no reference")
        self.refcount[frame] = count
        if count == 0:
            self.owner[frame].charged -= 1
            self.owner[frame] = None
            # LAB(pagecache): BEGIN -> self.free_list.append(frame)
            if frame in self.page_cache:
                self.lru[frame] = None                   # newest at the end: evicted last
            else:
                self.free_list.append(frame)
            # LAB(pagecache): END

    def pin(self, frame: int) -> None:
        """A segment maps `frame` (its reference is already counted)."""
        self.pins[frame] += 1
        self.num_pinned += self.pins[frame] == 1

    def unpin(self, frame: int) -> None:
        self.pins[frame] -= 1
        self.num_pinned -= self.pins[frame] == 0

    def is_shared(self, frame: int) -> bool:
        return self.refcount[frame] > 1
