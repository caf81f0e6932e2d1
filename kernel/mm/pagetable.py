"""Address spaces: a process's page table, from virtual pages to frames.

Virtual page p holds tokens [p * page_size, (p + 1) * page_size). An address
space is resident (`frames` maps every page) or swapped out (`swap_slots`
holds every page, `frames` is empty). `tokens` is what the mapped slots hold
(the process's token "file" up to here); `names` are the content names of its
full pages, computed when the page's K/V exists (MemoryManager.publish).
Segments (shm) hold pages the same way, pinned.
"""
from dataclasses import dataclass, field

from kernel.mm.cgroup import MemCgroup


@dataclass
class PageHolder:
    cgroup: MemCgroup
    page_size: int                  # tokens per page for this program and frame size
    namespace: bytes                # root of the page-name chain (program identity + tenant salt)
    frames: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    names: list = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_pages(self) -> int:
        return -(-len(self.tokens) // self.page_size)

    @property
    def num_full_pages(self) -> int:
        return len(self.tokens) // self.page_size

    def page_tokens(self, vpn: int) -> list:
        return self.tokens[vpn * self.page_size:(vpn + 1) * self.page_size]

    def parent_name(self, vpn: int) -> bytes:
        return self.names[vpn - 1] if vpn else self.namespace


@dataclass
class AddressSpace(PageHolder):
    asid: int = -1
    swap_slots: list = field(default_factory=list)
    segment: int | None = None      # shmid attached at creation, if any

    @property
    def is_swapped(self) -> bool:
        return bool(self.swap_slots)

    def slot(self, index: int) -> int:
        """Pool slot (frame * page_size + offset) of token `index`."""
        vpn, offset = divmod(index, self.page_size)
        return self.frames[vpn] * self.page_size + offset


@dataclass
class Segment(PageHolder):
    """A shm segment: a named, pinned prefix that processes attach to."""
    shmid: int = -1
