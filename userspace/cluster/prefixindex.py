"""What a router believes each replica holds: prefixes as chains of block keys, with eviction.

Two kinds, both per replica and both answering "how many leading blocks of this
prompt does the replica hold?":

- ApproxIndex: built from what was routed (cache_aware). A prompt is cut into
  blocks of `block` tokens; block i's key is a hash of (block i-1's key, its
  tokens), the first's parent being the tenant. A set of such keys is a prefix
  tree (each key names one path from the root); an LRU order over them with a
  capacity in blocks stands for the replica's own eviction.
- ResidentIndex: built from the replica's own page-cache events (prefix_events):
  the set of page names published and not yet evicted, exactly the kernel's.
  A gap in the events' sequence numbers means events were lost: the index
  forgets everything it knew (a missed eviction would leave a phantom page).
"""
from __future__ import annotations

from collections import OrderedDict


def block_keys(tid, token_ids, block: int) -> list:
    """The keys of the full blocks of `token_ids` (a chain: each covers the whole prefix)."""
    keys, parent = [], ("tenant", tid)
    for start in range(0, len(token_ids) - block + 1, block):
        parent = hash((parent, tuple(token_ids[start:start + block])))
        keys.append(parent)
    return keys


class ApproxIndex:
    """Block keys a replica was sent, least recently used first, at most `capacity` of them."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self.keys)

    def match(self, keys) -> int:
        """Leading keys held."""
        n = 0
        for key in keys:
            if key not in self.keys:
                break
            n += 1
        return n

    def insert(self, keys) -> None:
        """The replica now holds this prefix: its keys become the most recently used; the
        least recently used go beyond capacity (as a page cache's LRU would)."""
        for key in keys:
            if key in self.keys:
                self.keys.move_to_end(key)
            else:
                self.keys[key] = None
        while len(self.keys) > self.capacity:
            self.keys.popitem(last=False)

    def clear(self) -> None:
        self.keys.clear()


class ResidentIndex:
    """Page names a replica's page cache holds, from its publish/evict events."""

    def __init__(self):
        self.names: set = set()
        self.seq = 0             # the last event applied
        self.gaps = 0            # times events were lost and the index started over

    def __len__(self) -> int:
        return len(self.names)

    def match(self, names) -> int:
        n = 0
        for name in names:
            if name not in self.names:
                break
            n += 1
        return n

    def apply(self, events) -> None:
        """Events in order (objects with seq, kind, page). A first seq beyond seq + 1 (lost
        events) or at most seq (the replica started over) clears the index first."""
        for e in events:
            if e.seq <= self.seq and self.seq:
                continue                                   # already applied
            if self.seq and e.seq != self.seq + 1:
                self.gaps += 1
                self.names.clear()
            elif not self.seq and e.seq != 1:
                self.gaps += 1                             # we never saw the start: what came before is lost
            self.seq = e.seq
            if e.kind == "publish":
                self.names.add(e.page)
            elif e.kind == "evict":
                self.names.discard(e.page)

    def clear(self) -> None:
        self.names.clear()
