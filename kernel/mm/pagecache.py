"""The page cache: full KV pages named by their content, for automatic prefix sharing.

A page's name is a keyed hash of (its parent page's name, its tokens); the first
page's parent is the address space's namespace, itself made of the program's
identity and the tenant's salt. Names therefore cover the whole prefix and are
private to a namespace. A hit also compares the stored tokens and parent name,
so a hash collision can never map the wrong page.

The cache keeps a bounded ring of its events (a page published, a page
evicted), numbered in order, for `cacheevents`: a router that follows them
knows which prefixes a kernel holds (the page names are kernel/pagename.py's).
"""
import hashlib
from collections import deque
from dataclasses import dataclass

from kernel.pagename import page_name  # noqa: F401  (the names' one definition, public)

EVENTS_KEPT = 1 << 16          # events the ring holds; a reader further behind sees a gap in seq


def namespace_name(program_identity: bytes, salt: bytes) -> bytes:
    """Root of a name chain: pages of one program, in one sharing namespace."""
    return hashlib.blake2b(program_identity, digest_size=16, key=salt[:64], person=b"kvos-ns").digest()


@dataclass(frozen=True)
class CachedPage:
    name: bytes
    parent: bytes
    tokens: tuple
    namespace: bytes = b""      # the root of its chain: whose page it is (cacheevents' tid)


@dataclass
class PageCacheStats:
    lookups: int = 0
    hits: int = 0          # pages mapped from the cache instead of recomputed
    inserts: int = 0
    evictions: int = 0


class PageCache:
    """name -> frame, and frame -> what it holds. Frames themselves live in the frame table."""

    def __init__(self):
        self.frame_of: dict[bytes, int] = {}
        self.page_of: dict[int, CachedPage] = {}
        self.stats = PageCacheStats()
        self.events: deque = deque(maxlen=EVENTS_KEPT)   # (seq, "publish" | "evict", name, parent, namespace)
        self.event_seq = 0

    def __contains__(self, frame: int) -> bool:
        return frame in self.page_of

    def lookup(self, name: bytes, parent: bytes, tokens) -> int | None:
        """The frame holding this exact page, or None. Verifies tokens and parent, not only the hash."""
        self.stats.lookups += 1
        frame = self.frame_of.get(name)
        if frame is None:
            return None
        page = self.page_of[frame]
        if page.parent != parent or page.tokens != tuple(tokens):
            return None
        return frame

    def insert(self, frame: int, name: bytes, parent: bytes, tokens, namespace: bytes = b"") -> bool:
        """Name `frame`; False (nothing changes) if the name or the frame is already taken."""
        if name in self.frame_of or frame in self.page_of:
            return False
        self.frame_of[name] = frame
        self.page_of[frame] = CachedPage(name, parent, tuple(tokens), namespace)
        self.stats.inserts += 1
        self._event("publish", name, parent, namespace)
        return True

    def drop(self, frame: int) -> None:
        """Forget `frame`'s page (its frame is being reused): an eviction."""
        page = self.page_of.pop(frame)
        del self.frame_of[page.name]
        self._event("evict", page.name, page.parent, page.namespace)

    def _event(self, kind: str, name: bytes, parent: bytes, namespace: bytes) -> None:
        self.event_seq += 1
        self.events.append((self.event_seq, kind, name, parent, namespace))

    def events_after(self, since: int, limit: int | None = None) -> list:
        """The ring's events with seq > since, oldest first (at most `limit`)."""
        out = []
        for event in reversed(self.events):           # newest first: a reader keeping up reads few
            if event[0] <= since:
                break
            out.append(event)
        out.reverse()
        return out[:limit] if limit else out
