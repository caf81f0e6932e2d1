"""The memory manager: address spaces, segments, the page cache and swap over one frame pool
(swap_out and swap_in live in kernel/mm/swap.py, mixed into MemoryManager).

Bookkeeping happens here in Python; the bytes move on the device. Every
operation that moves bytes (copy-on-write copies, swap traffic) is queued and
runs when the kernel calls flush(), in queue order, before the step's forward
pass. Operations that can fail for lack of memory check first and raise
MemoryPressure (ENOMEM, never shown to users: the scheduler preempts instead)
before changing anything.
"""
from kernel.devices.base import Device, MemOp
from kernel.errors import EINVAL, ENOMEM, ESRCH, KernelPanic, KvosError
from kernel.mm.cgroup import ROOT_CGID, MemCgroup
from kernel.mm.frames import FrameTable
from kernel.mm.pagecache import PageCache, page_name
from kernel.mm.pagetable import AddressSpace, PageHolder, Segment
from kernel.mm.swap import SwapArea, Swapping


class MemoryPressure(KvosError):
    """Not enough frames now: in the pool (cgroup None) or under a cgroup's limit."""

    def __init__(self, needed: int, cgroup: MemCgroup | None, what: str):
        where = f"cgroup {cgroup.name!r} (limit {cgroup.limit})" if cgroup else "the frame pool"
        super().__init__(ENOMEM, f"{what}: {needed} frame(s) needed, not available in {where}")
        self.needed = needed
        self.cgroup = cgroup


class MemoryManager(Swapping):
    def __init__(self, device: Device, num_frames: int, frame_bytes: int, swap_slots: int = 0,
                 watermark: int | None = None):
        if num_frames < 1:
            raise KvosError(ENOMEM, f"a pool of {num_frames} frames cannot run anything")
        self.device = device
        self.frame_bytes = frame_bytes
        device.create_pool(num_frames, frame_bytes)
        device.create_swap(swap_slots)
        self.page_cache = PageCache()
        self.frames = FrameTable(num_frames, self.page_cache)
        self.swap = SwapArea(swap_slots)
        # Admission keeps this many frames free for the growth of running processes.
        self.watermark = max(0, num_frames // 100) if watermark is None else watermark
        self.cgroups: dict[int, MemCgroup] = {ROOT_CGID: MemCgroup(ROOT_CGID, "root")}
        self.spaces: dict[int, AddressSpace] = {}
        self.segments: dict[int, Segment] = {}
        self.pending: list[MemOp] = []
        self.cow_faults = 0
        self.remapped = None     # asids whose frames changed other than by appends, once kernel/pagerows.py asks
        self.swapped_out_pages = 0
        self.swapped_in_pages = 0
        self._next_id = 1

    # -- names and lookups ------------------------------------------------------
    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def space(self, asid: int) -> AddressSpace:
        space = self.spaces.get(asid)
        if space is None:
            raise KvosError(ESRCH, f"no address space {asid}")
        return space

    def segment(self, shmid: int) -> Segment:
        seg = self.segments.get(shmid)
        if seg is None:
            raise KvosError(ESRCH, f"no shm segment {shmid}")
        return seg

    def cgroup(self, cgid: int) -> MemCgroup:
        cg = self.cgroups.get(cgid)
        if cg is None:
            raise KvosError(ESRCH, f"no memory cgroup {cgid}")
        return cg

    @property
    def num_frames(self) -> int:
        return self.frames.num_frames

    # -- cgroups -----------------------------------------------------------------
    def create_cgroup(self, name: str, limit: int | None = None) -> int:
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise KvosError(EINVAL, f"cgroup limit must be a positive number of frames, got {limit!r}")
        cgid = self._new_id()
        self.cgroups[cgid] = MemCgroup(cgid, name, limit)
        return cgid

    def remove_cgroup(self, cgid: int) -> None:
        """Remove an emptied cgroup; frames other tenants still map are recharged to root."""
        cg = self.cgroup(cgid)
        if cgid == ROOT_CGID:
            raise KvosError(EINVAL, "the root cgroup cannot be removed")
        users = [s for s in self.spaces.values() if s.cgroup is cg] + \
                [s for s in self.segments.values() if s.cgroup is cg]
        if users:
            raise KvosError(EINVAL, f"cgroup {cg.name!r} still has {len(users)} address space(s) or segment(s)")
        root = self.cgroups[ROOT_CGID]
        if cg.charged:
            for frame, owner in enumerate(self.frames.owner):
                if owner is cg:
                    self.frames.owner[frame] = root
            root.charged += cg.charged
            cg.charged = 0
        del self.cgroups[cgid]

    def _reserve(self, cgroup: MemCgroup, new_frames: int, new_charges: int, what: str,
                 pinned_cached: int = 0) -> None:
        """Raise MemoryPressure unless `new_frames` can be allocated and `new_charges` charged."""
        if new_frames > self.frames.available - pinned_cached:
            raise MemoryPressure(new_frames, None, what)
        room = cgroup.room()
        if room is not None and new_charges > room:
            raise MemoryPressure(new_charges, cgroup, what)

    def can_allocate(self, cgid: int, frames: int, admission: bool = False) -> bool:
        """Whether `frames` new frames fit now; admission also keeps the watermark free."""
        cg = self.cgroup(cgid)
        reserve = self.watermark if admission else 0
        room = cg.room()
        return frames + reserve <= self.frames.available and (room is None or frames <= room)

    # -- address spaces ---------------------------------------------------------
    def create(self, cgid: int, page_size: int, namespace: bytes) -> int:
        """A new, empty address space in cgroup `cgid`; returns its asid."""
        cg = self.cgroup(cgid)
        if not isinstance(page_size, int) or page_size < 1:
            raise KvosError(EINVAL, f"page size must be a positive number of tokens, got {page_size!r}")
        asid = self._new_id()
        self.spaces[asid] = AddressSpace(cg, page_size, namespace, asid=asid)
        return asid

    def frames_needed(self, asid: int, num_tokens: int) -> int:
        """New frames that appending `num_tokens` would take (copy-on-write fault included)."""
        space = self.space(asid)
        return self._new_pages(space, num_tokens) + (num_tokens > 0 and self._faults(space, space.num_tokens))

    def _new_pages(self, space: AddressSpace, num_tokens: int) -> int:
        """Frames to map for `num_tokens` more tokens: a partly filled last page still has room."""
        # LAB(pagetable): BEGIN
        return max(0, -(-(space.num_tokens + num_tokens) // space.page_size) - len(space.frames))
        # LAB(pagetable): END

    def _faults(self, space: AddressSpace, start: int) -> bool:
        """Whether writing token `start` hits a shared, partly filled page (copy-on-write)."""
        # LAB(cow): BEGIN -> return False
        vpn, offset = divmod(start, space.page_size)
        return offset != 0 and self.frames.is_shared(space.frames[vpn])
        # LAB(cow): END

    def append(self, asid: int, tokens) -> list:
        """Map slots for `tokens` after the current ones; returns their slots (frame * page_size + offset).

        Frames are allocated on demand (or taken from a reservation). Appending
        into a shared, partly filled page is a copy-on-write fault: the page is
        copied to a private frame first. Full pages are never written, so they
        are never copied.
        """
        space = self.space(asid)
        if space.is_swapped:
            raise KernelPanic(f"MemoryManager.append: address space {asid} is swapped out")
        n = len(tokens)
        if n == 0:
            return []
        ps = space.page_size
        start = space.num_tokens
        new_pages = self._new_pages(space, n)
        cow = self._faults(space, start)
        needed = new_pages + cow
        if needed:      # checked before anything changes: an append maps all its tokens or none
            self._reserve(space.cgroup, needed, needed, f"append to address space {asid}")
        if cow:
            self._cow_fault(space, start // ps)
            self._remapped(asid)
        # LAB(pagetable): BEGIN
        for _ in range(new_pages):
            space.frames.append(self.frames.alloc(space.cgroup))
        space.tokens.extend(tokens)
        frames = space.frames
        return [frames[i // ps] * ps + i % ps for i in range(start, start + n)]
        # LAB(pagetable): END

    def truncate(self, asid: int, num_tokens: int) -> int:
        """Forget the tokens past `num_tokens` (a speculation's rejected drafts): pages past the new end
        are unmapped, their frames lose this reference. Only unnamed tokens may go (publish names a
        page once its K/V is kept). Returns the frames unmapped."""
        space = self.space(asid)
        if space.is_swapped:
            raise KernelPanic(f"MemoryManager.truncate: address space {asid} is swapped out")
        if not len(space.names) * space.page_size <= num_tokens <= space.num_tokens:
            raise KernelPanic(f"MemoryManager.truncate: {num_tokens} tokens of address space {asid}, which "
                              f"holds {space.num_tokens} and names {len(space.names)} page(s)")
        if -(-num_tokens // space.page_size) < len(space.frames):
            self._remapped(asid)          # the batch builder's copy of the row must not keep the frames that go
        # LAB(speculate): BEGIN
        del space.tokens[num_tokens:]
        dropped = space.frames[space.num_pages:]
        del space.frames[space.num_pages:]
        for frame in dropped:
            self.frames.decref(frame)
        return len(dropped)
        # LAB(speculate): END

    def reserve(self, asid: int, num_tokens: int) -> int:
        """Pre-allocate frames for `num_tokens` tokens in all (legacy alloc="prealloc").

        Reserved frames are mapped but hold no tokens until appends fill them;
        they are charged and counted as mapped, which is the waste that paging
        avoids. Returns frames newly reserved.
        """
        space = self.space(asid)
        if space.is_swapped:
            raise KernelPanic(f"MemoryManager.reserve: address space {asid} is swapped out")
        new = max(0, -(-num_tokens // space.page_size) - len(space.frames))
        if new:
            self._reserve(space.cgroup, new, new, f"reserve for address space {asid}")
        for _ in range(new):
            space.frames.append(self.frames.alloc(space.cgroup))
        return new

    def _remapped(self, asid: int) -> None:
        """Tell the batch builder's copy of this page table (kernel/pagerows.py) that it is stale: a frame
        replaced in place (copy-on-write), every frame gone or new (swap), a segment mapped (attach).
        Reported here, around the lab regions, so that it holds however those are written."""
        if self.remapped is not None:
            self.remapped.add(asid)

    def _cow_fault(self, space: AddressSpace, vpn: int) -> None:
        """Give `space` a private copy of its shared page `vpn` (the caller reserved the frame)."""
        # LAB(cow): BEGIN
        shared = space.frames[vpn]
        private = self.frames.alloc(space.cgroup)
        self.pending.append(MemOp("copy", shared, private))     # the bytes move at flush(), before the forward
        self.frames.decref(shared)
        space.frames[vpn] = private
        self.cow_faults += 1
        # LAB(cow): END

    def publish(self, asid: int) -> int:
        """Name the full pages that have no name yet; call once their K/V is computed.

        Named pages outlive their users in the page cache. If another frame
        already holds the same page, this one stays unnamed (private).
        Returns the number of pages newly named.
        """
        space = self.space(asid)
        return self._publish(space)

    def _publish(self, holder: PageHolder) -> int:
        named = 0
        for vpn in range(len(holder.names), holder.num_full_pages):
            parent = holder.parent_name(vpn)
            tokens = holder.page_tokens(vpn)
            name = page_name(parent, tokens)
            holder.names.append(name)
            if holder.frames and self.page_cache.insert(holder.frames[vpn], name, parent, tokens, holder.namespace):
                named += 1
        return named

    def map_cached(self, asid: int, tokens, max_tokens: int | None = None) -> int:
        """Map the pages of `tokens` that the page cache holds, continuing this address space.

        `tokens` are what would come next; only whole pages are mapped, at most
        `max_tokens` tokens (the caller keeps at least one token to compute).
        Returns how many tokens were mapped (and need no prefill). A cgroup
        without room for the cached frames maps fewer; nothing fails.
        """
        space = self.space(asid)
        ps = space.page_size
        if space.is_swapped or space.num_tokens % ps or len(space.names) != space.num_full_pages \
                or len(space.frames) != space.num_pages:
            return 0
        # LAB(pagecache): BEGIN -> return 0
        limit = len(tokens) if max_tokens is None else min(max_tokens, len(tokens))
        room = space.cgroup.room()
        hits = []
        parent = space.parent_name(space.num_full_pages)
        for p in range(limit // ps):
            page = tokens[p * ps:(p + 1) * ps]
            name = page_name(parent, page)
            frame = self.page_cache.lookup(name, parent, page)
            if frame is None:
                break
            if self.frames.refcount[frame] == 0:
                if room is not None and room <= 0:
                    break
                room = None if room is None else room - 1
            hits.append((frame, name))
            parent = name
        for frame, name in hits:
            self.frames.incref(frame, space.cgroup)
            space.frames.append(frame)
            space.names.append(name)
        self.page_cache.stats.hits += len(hits)
        space.tokens.extend(tokens[:len(hits) * ps])
        return len(hits) * ps
        # LAB(pagecache): END

    def fork(self, asid: int) -> int:
        """A child address space sharing every page of the parent (copy-on-write)."""
        parent = self.space(asid)
        if parent.is_swapped:
            raise KvosError(EINVAL, f"address space {asid} is swapped out; swap it in before fork")
        # LAB(cow): BEGIN
        child_id = self._new_id()
        child = AddressSpace(parent.cgroup, parent.page_size, parent.namespace, asid=child_id,
                             frames=parent.frames[:parent.num_pages], tokens=list(parent.tokens),
                             names=list(parent.names), segment=parent.segment)
        for frame in child.frames:
            self.frames.incref(frame, child.cgroup)
        self.spaces[child_id] = child
        return child_id
        # LAB(cow): END

    def free(self, asid: int) -> None:
        """Destroy an address space: frames lose a reference (named ones stay cached), slots free."""
        # LAB(pagetable): BEGIN -> pass
        space = self.space(asid)
        for frame in space.frames:
            self.frames.decref(frame)
        for slot in space.swap_slots:
            self.swap.release(slot)
        # LAB(pagetable): END
        del self.spaces[asid]

    # -- shm segments -----------------------------------------------------------
    def make_segment(self, asid: int) -> int:
        """Turn an address space into a pinned shm segment (its pages are named first)."""
        space = self.space(asid)
        if space.is_swapped:
            raise KvosError(EINVAL, f"address space {asid} is swapped out")
        if not space.tokens:
            raise KvosError(EINVAL, "an empty address space cannot become a segment")
        self._publish(space)
        for frame in space.frames[space.num_pages:]:     # a reservation does not become shared
            self.frames.decref(frame)
        del space.frames[space.num_pages:]
        shmid = self._new_id()
        seg = Segment(space.cgroup, space.page_size, space.namespace, frames=space.frames,
                      tokens=space.tokens, names=space.names, shmid=shmid)
        for frame in seg.frames:     # the references move from the page table to the segment
            self.frames.pin(frame)
        del self.spaces[asid]
        self.segments[shmid] = seg
        return shmid

    def attach(self, asid: int, shmid: int) -> int:
        """Map a segment's pages into an empty address space. Returns tokens mapped."""
        space, seg = self.space(asid), self.segment(shmid)
        if space.tokens or space.is_swapped:
            raise KvosError(EINVAL, f"address space {asid} is not empty; attach the segment first")
        if seg.page_size != space.page_size or seg.namespace != space.namespace:
            raise KvosError(EINVAL, f"segment {shmid} belongs to another program or namespace")
        self._remapped(asid)
        # LAB(pagecache): BEGIN
        for frame in seg.frames:
            self.frames.incref(frame, space.cgroup)
        space.frames = list(seg.frames)      # a partly filled last page is shared: the first write faults
        space.tokens = list(seg.tokens)
        space.names = list(seg.names)
        space.segment = shmid
        return len(space.tokens)
        # LAB(pagecache): END

    def remove_segment(self, shmid: int) -> None:
        """Unpin a segment; processes attached to it keep their own references."""
        seg = self.segment(shmid)
        for frame in seg.frames:
            self.frames.unpin(frame)
            self.frames.decref(frame)
        del self.segments[shmid]

    # -- the device ----------------------------------------------------------------
    def flush(self) -> int:
        """Run the queued memory operations on the device, in order. Returns how many ran."""
        ops, self.pending = self.pending, []
        if ops:
            self.device.run(ops)
        return len(ops)

    # -- introspection (kernel/mm/introspect.py) -------------------------------------
    def pagemap(self, asid: int):
        from kernel.mm.introspect import pagemap
        return pagemap(self, self.space(asid))

    def segment_pagemap(self, shmid: int):
        from kernel.mm.introspect import pagemap
        return pagemap(self, self.segment(shmid))

    def meminfo(self):
        from kernel.mm.introspect import meminfo
        return meminfo(self)

    def fsck(self) -> None:
        from kernel.mm.fsck import fsck
        fsck(self)
