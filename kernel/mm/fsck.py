"""fsck for memory: every invariant of the frame pool, page tables, page cache, shm and swap, from scratch.

Raises KernelPanic naming the first broken invariant. Costs O(frames + pages);
tests call it after every operation, the kernel at shutdown, root through the
fsck syscall whenever it likes.
"""
from collections import Counter

from kernel.errors import KernelPanic
from kernel.mm.pagecache import page_name


def _panic(why: str):
    raise KernelPanic(f"fsck: {why}")


def fsck(mm) -> None:
    frames, cache = mm.frames, mm.page_cache
    n = frames.num_frames
    free = frames.free_list
    if len(set(free)) != len(free):
        _panic("a frame is on the free list twice")
    free_set = set(free)
    lru = set(frames.lru)
    if free_set & lru:
        _panic(f"frames both free and cached: {sorted(free_set & lru)[:5]}")

    # references recomputed from page tables and segments
    refs, pins = Counter(), Counter()
    for space in mm.spaces.values():
        refs.update(space.frames)
    for seg in mm.segments.values():
        refs.update(seg.frames)
        pins.update(seg.frames)
    for f in range(n):
        if frames.refcount[f] != refs.get(f, 0):
            _panic(f"frame {f}: refcount {frames.refcount[f]} but {refs.get(f, 0)} mappings")
        if frames.pins[f] != pins.get(f, 0):
            _panic(f"frame {f}: pinned {frames.pins[f]} times but {pins.get(f, 0)} segments map it")
        state = (f in free_set) + (f in lru) + (refs.get(f, 0) > 0)
        if state != 1:
            _panic(f"frame {f} is in {state} of the states free/cached/mapped")
        if f in free_set and f in cache:
            _panic(f"free frame {f} is named in the page cache")
        if f in lru and f not in cache:
            _panic(f"cached frame {f} has no name")
        mapped = refs.get(f, 0) > 0
        if mapped != (frames.owner[f] is not None):
            _panic(f"frame {f}: mapped={mapped} but charged to {frames.owner[f]}")

    if frames.num_pinned != sum(1 for f in range(n) if frames.pins[f]):
        _panic(f"{frames.num_pinned} frames counted pinned but {sum(1 for f in range(n) if frames.pins[f])} are")

    # charges
    charged = Counter(id(o) for o in frames.owner if o is not None)
    live = {id(cg) for cg in mm.cgroups.values()}
    for o in frames.owner:
        if o is not None and id(o) not in live:
            _panic(f"a frame is charged to removed cgroup {o.name!r}")
    for cg in mm.cgroups.values():
        if cg.charged != charged.get(id(cg), 0):
            _panic(f"cgroup {cg.name!r} charged {cg.charged} frames but owns {charged.get(id(cg), 0)}")

    # page tables, swap slots and names
    slots = Counter()
    for holder in list(mm.spaces.values()) + list(mm.segments.values()):
        who = f"address space {getattr(holder, 'asid', None)}" if hasattr(holder, "asid") \
            else f"segment {holder.shmid}"
        swapped = getattr(holder, "swap_slots", [])
        if swapped and holder.frames:
            _panic(f"{who} has both device frames and swap slots")
        mapped_pages = len(swapped) if swapped else len(holder.frames)
        reserved = mapped_pages - holder.num_pages     # pre-allocated pages hold no tokens yet
        if reserved < 0 or (reserved and (swapped or not hasattr(holder, "asid"))):
            _panic(f"{who}: {holder.num_pages} pages of tokens but {mapped_pages} mapped")
        slots.update(swapped)
        if len(holder.names) > holder.num_full_pages:
            _panic(f"{who} names {len(holder.names)} pages but has {holder.num_full_pages} full")
        for vpn, name in enumerate(holder.names):
            if page_name(holder.parent_name(vpn), holder.page_tokens(vpn)) != name:
                _panic(f"{who}: page {vpn}'s name does not match its tokens")
            if holder.frames and holder.frames[vpn] in cache:
                if cache.page_of[holder.frames[vpn]].name != name:
                    _panic(f"{who}: page {vpn} maps frame {holder.frames[vpn]} named for other content")
    if any(c > 1 for c in slots.values()):
        _panic("a swap slot is used by two pages")
    if set(slots) != mm.swap.used:
        _panic(f"swap slots in use {len(mm.swap.used)} but {len(slots)} mapped")
    if set(mm.swap.free_slots) & mm.swap.used or len(mm.swap.free_slots) + len(mm.swap.used) != mm.swap.num_slots:
        _panic("swap free list and used set disagree")

    # page cache: names match what the frames hold
    for frame, page in cache.page_of.items():
        if cache.frame_of.get(page.name) != frame:
            _panic(f"page cache maps name of frame {frame} elsewhere")
        if page_name(page.parent, page.tokens) != page.name:
            _panic(f"page cache: frame {frame}'s name does not match its tokens")
    if len(cache.frame_of) != len(cache.page_of):
        _panic("page cache name and frame maps differ in size")
