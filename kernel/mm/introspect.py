"""/proc for memory: pagemap and meminfo as plain dataclasses (JSON-ready via asdict)."""
from kernel.mm.pagetable import AddressSpace, PageHolder
from kernel.results import CgroupInfo, MemInfo, PageEntry, PageMap


def pagemap(mm, holder: PageHolder) -> PageMap:
    frames = mm.frames
    swapped = isinstance(holder, AddressSpace) and holder.is_swapped
    out = PageMap(holder.page_size, holder.num_tokens)
    for vpn in range(holder.num_pages):
        tokens = holder.page_tokens(vpn)
        if swapped:
            out.pages.append(PageEntry(vpn, None, holder.swap_slots[vpn], 0, tokens,
                                       False, False, False, True, False))
            continue
        frame = holder.frames[vpn]
        refs = frames.refcount[frame]
        full = len(tokens) == holder.page_size
        out.pages.append(PageEntry(vpn, frame, None, refs, tokens, refs > 1, refs > 1 and not full,
                                   frame in mm.page_cache, False, frames.pins[frame] > 0))
    return out


def meminfo(mm) -> MemInfo:
    frames = mm.frames
    fill = {}                # frame -> (tokens held, page size), each frame once
    for holder in list(mm.spaces.values()) + list(mm.segments.values()):
        for vpn, frame in enumerate(holder.frames):
            fill[frame] = (len(holder.page_tokens(vpn)), holder.page_size)
    stats = mm.page_cache.stats
    return MemInfo(
        frame_bytes=mm.frame_bytes, total=frames.num_frames, free=frames.num_free,
        cached=frames.num_cached, mapped=frames.num_mapped,
        shared=sum(1 for r in frames.refcount if r > 1), pinned=sum(1 for p in frames.pins if p),
        watermark=mm.watermark, swap_total=mm.swap.num_slots, swap_used=len(mm.swap.used),
        cow_faults=mm.cow_faults, page_cache_hits=stats.hits, page_cache_evictions=stats.evictions,
        swapped_out_pages=mm.swapped_out_pages, swapped_in_pages=mm.swapped_in_pages,
        tokens_stored=sum(t for t, _ in fill.values()), token_capacity=sum(p for _, p in fill.values()),
        cgroups={cg.name: CgroupInfo(cg.name, cg.charged, cg.limit) for cg in mm.cgroups.values()},
        page_cache_lookups=stats.lookups,
    )


def frame_map(mm, mappers=None) -> list:
    """Every frame as [state, refcount, owning cgroup, pids mapping it]: state is free, cached,
    mapped (one reference), shared (several) or pinned (an shm segment maps it). The memory map of
    the TUI; `mappers` is {frame: [pid]} (Kernel.mappers)."""
    mappers = mappers or {}
    frames = mm.frames
    out = []
    for f in range(frames.num_frames):
        refs = frames.refcount[f]
        if refs == 0:
            state = "cached" if f in frames.lru else "free"
        elif frames.pins[f]:
            state = "pinned"
        else:
            state = "shared" if refs > 1 else "mapped"
        owner = frames.owner[f]
        out.append([state, refs, owner.name if owner is not None else None, mappers.get(f, [])])
    return out
