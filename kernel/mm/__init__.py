"""kernel/mm: physical memory (frames), page tables, copy-on-write, the page cache, shm and swap.

Public names: MemoryManager and the errors it raises for lack of memory
(MemoryPressure, SwapFull, both ENOMEM). Everything else is reached through
MemoryManager's methods.
"""
from kernel.mm.memory import MemoryManager, MemoryPressure
from kernel.mm.pagecache import namespace_name, page_name
from kernel.mm.swap import SwapFull

__all__ = ["MemoryManager", "MemoryPressure", "SwapFull", "namespace_name", "page_name"]
