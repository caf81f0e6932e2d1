"""/proc for memory: pagemap and meminfo as plain dataclasses (JSON-ready via asdict)."""
from dataclasses import dataclass, field

from kernel.mm.pagetable import AddressSpace, PageHolder


@dataclass
class PageEntry:
    vpn: int                 # virtual page number
    frame: int | None        # device frame, None when swapped
    swap_slot: int | None    # host swap slot, None when resident
    refcount: int            # references to the frame (page tables + segments)
    tokens: list             # token ids the page holds
    shared: bool             # more than one reference
    cow: bool                # shared and partly filled: the next append here faults
    cached: bool             # named in the page cache (a full page)
    swapped: bool
    pinned: bool             # mapped by a shm segment
    text: str | None = None  # the tokens as text, when pagemap(text=True) asked for it

    @property
    def flags(self) -> str:
        """Compact flags as in /proc: s shared, c copy-on-write, n named (cached), w swapped, p pinned."""
        return "".join(c if on else "-" for c, on in (
            ("s", self.shared), ("c", self.cow), ("n", self.cached), ("w", self.swapped), ("p", self.pinned)))


@dataclass
class PageMap:
    page_size: int
    num_tokens: int
    pages: list = field(default_factory=list)


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


@dataclass
class CgroupInfo:
    name: str
    charged: int             # frames charged
    limit: int | None


@dataclass
class MemInfo:
    frame_bytes: int
    total: int               # frames in the pool
    free: int
    cached: int              # unreferenced, named, reclaimable
    mapped: int              # referenced by page tables or segments
    shared: int              # mapped with more than one reference
    pinned: int              # mapped by shm segments
    watermark: int
    swap_total: int          # swap slots
    swap_used: int
    cow_faults: int
    page_cache_hits: int
    page_cache_evictions: int
    swapped_out_pages: int
    swapped_in_pages: int
    tokens_stored: int       # tokens held in mapped frames (a shared page counts once)
    token_capacity: int      # tokens the mapped frames could hold
    cgroups: dict = field(default_factory=dict)
    page_cache_lookups: int = 0
    frames: list | None = None   # meminfo(frames=True): per frame [state, refcount, cgroup name or None]

    @property
    def utilization(self) -> float:
        """KV memory utilisation: tokens stored over the token capacity of mapped frames."""
        return self.tokens_stored / self.token_capacity if self.token_capacity else 0.0


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


def frame_map(mm) -> list:
    """Every frame as [state, refcount, owning cgroup]: state is free, cached, mapped (one
    reference), shared (several) or pinned (an shm segment maps it). The memory map of the TUI."""
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
        out.append([state, refs, owner.name if owner is not None else None])
    return out
