"""The page cache: full KV pages named by their content, for automatic prefix sharing.

A page's name is a keyed hash of (its parent page's name, its tokens); the first
page's parent is the address space's namespace, itself made of the program's
identity and the tenant's salt. Names therefore cover the whole prefix and are
private to a namespace. A hit also compares the stored tokens and parent name,
so a hash collision can never map the wrong page.
"""
import hashlib
from array import array
from dataclasses import dataclass


def page_name(parent: bytes, tokens) -> bytes:
    """Name of a full page holding `tokens` whose prefix is named `parent`."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def namespace_name(program_identity: bytes, salt: bytes) -> bytes:
    """Root of a name chain: pages of one program, in one sharing namespace."""
    return hashlib.blake2b(program_identity, digest_size=16, key=salt[:64], person=b"kvos-ns").digest()


@dataclass(frozen=True)
class CachedPage:
    name: bytes
    parent: bytes
    tokens: tuple


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

    def __contains__(self, frame: int) -> bool:
        return frame in self.page_of

    def lookup(self, name: bytes, parent: bytes, tokens) -> int | None:
        """The frame holding this exact page, or None. Verifies tokens and parent, not only the hash."""
        self.stats.lookups += 1
        # LAB(pagecache): BEGIN -> return None
        frame = self.frame_of.get(name)
        if frame is None:
            return None
        page = self.page_of[frame]
        if page.parent != parent or page.tokens != tuple(tokens):
            return None
        return frame
        # LAB(pagecache): END

    def insert(self, frame: int, name: bytes, parent: bytes, tokens) -> bool:
        """Name `frame`; False (nothing changes) if the name or the frame is already taken."""
        # LAB(pagecache): BEGIN -> return False
        if name in self.frame_of or frame in self.page_of:
            return False
        self.frame_of[name] = frame
        self.page_of[frame] = CachedPage(name, parent, tuple(tokens))
        self.stats.inserts += 1
        return True
        # LAB(pagecache): END

    def drop(self, frame: int) -> None:
        page = self.page_of.pop(frame)
        del self.frame_of[page.name]
