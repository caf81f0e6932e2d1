"""Swap: slots of host memory, one frame each, and moving a preempted process's pages out and back.

SwapArea hands out the slots. Swapping is part of MemoryManager (kernel/mm/memory.py): swap_out
queues a copy of every page to a slot and drops the frames; swap_in maps the pages back, from the
page cache where it still holds them (no copy), else into fresh frames copied from their slots.
Both only queue device operations; the bytes move at the kernel's next flush(). The scheduler
checks swap_in_plan's counts before calling swap_in, which reserves first and then cannot fail.
"""
from kernel.devices.base import MemOp
from kernel.errors import ENOMEM, KernelPanic, KvosError
from kernel.mm.pagetable import AddressSpace


class SwapFull(KvosError):
    def __init__(self, needed: int, free: int):
        super().__init__(ENOMEM, f"swap out: {needed} slot(s) needed, {free} free")


class SwapArea:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.used = set()

    @property
    def num_free(self) -> int:
        return len(self.free_slots)

    def alloc(self) -> int:
        if not self.free_slots:
            raise KernelPanic("SwapArea.alloc: no free slot (caller did not check num_free)")
        slot = self.free_slots.pop()
        self.used.add(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot not in self.used:
            raise KernelPanic(f"SwapArea.release: slot {slot} is not in use")
        self.used.remove(slot)
        self.free_slots.append(slot)


class Swapping:
    """MemoryManager's swap half: these methods use its frames, page cache and address spaces, and these."""
    swap: SwapArea
    pending: list[MemOp]      # device operations, run in order at flush()
    swapped_out_pages: int
    swapped_in_pages: int

    def swap_out(self, asid: int) -> int:
        """Move every page to the swap area; device frames lose this reference. Returns pages moved.

        Raises SwapFull (nothing changes) when the swap area lacks room.
        """
        space = self.space(asid)
        if space.is_swapped or not space.frames:
            return 0
        self._remapped(asid)
        # LAB(swap): BEGIN
        pages = space.num_pages
        if pages > self.swap.num_free:
            raise SwapFull(pages, self.swap.num_free)
        for frame in space.frames[pages:]:
            self.frames.decref(frame)
        for frame in space.frames[:pages]:
            slot = self.swap.alloc()
            self.pending.append(MemOp("swap_out", frame, slot))
            space.swap_slots.append(slot)
            self.frames.decref(frame)
        space.frames = []
        self.swapped_out_pages += len(space.swap_slots)
        return len(space.swap_slots)
        # LAB(swap): END

    def swap_in_plan(self, asid: int):
        """(frames to allocate, charges, cached frames reused) for swapping `asid` in."""
        space = self.space(asid)
        hits = self._swap_in_hits(space)
        cached_hits = sum(1 for f in hits if f is not None and self.frames.refcount[f] == 0)
        new = sum(1 for f in hits if f is None)
        return new, new + cached_hits, cached_hits

    def _swap_in_hits(self, space: AddressSpace) -> list:
        """Per swapped page, a frame of the page cache that still holds it, or None."""
        hits = []
        for vpn in range(len(space.swap_slots)):
            frame = None
            if vpn < len(space.names):
                frame = self.page_cache.lookup(space.names[vpn], space.parent_name(vpn), space.page_tokens(vpn))
            hits.append(frame)
        return hits

    def swap_in(self, asid: int) -> int:
        """Bring a swapped address space back, into any frames. Pages still in the page
        cache are mapped from there (no copy). Returns pages copied from swap."""
        space = self.space(asid)
        if not space.is_swapped:
            return 0
        self._remapped(asid)
        # LAB(swap): BEGIN
        hits = self._swap_in_hits(space)
        cached_hits = sum(1 for f in hits if f is not None and self.frames.refcount[f] == 0)
        new = sum(1 for f in hits if f is None)
        self._reserve(space.cgroup, new, new + cached_hits, f"swap in address space {asid}",
                      pinned_cached=cached_hits)
        for frame in hits:          # map the hits first so that allocation cannot evict them
            if frame is not None:
                self.frames.incref(frame, space.cgroup)
        copied = 0
        for vpn, slot in enumerate(space.swap_slots):
            frame = hits[vpn]
            if frame is None:
                frame = self.frames.alloc(space.cgroup)
                self.pending.append(MemOp("swap_in", slot, frame))
                copied += 1
            else:
                self.page_cache.stats.hits += 1
            space.frames.append(frame)
            self.swap.release(slot)
        space.swap_slots = []
        self.swapped_in_pages += copied
        return copied
        # LAB(swap): END
