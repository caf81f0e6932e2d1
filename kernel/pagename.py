"""Page names: the hash chain that names full KV pages, public so that routers can compute it.

A full page's name is blake2b(parent's name, its token ids); the first page's
parent is its address space's namespace (the program's identity and the
tenant's salt, kernel/mm/pagecache.py), which root reads in tenantinfo's
`page_namespace`. A router holding a tenant's namespace names the full pages of
a prompt exactly as every kernel does (chain_names), and so can match them with
the names a replica's `cacheevents` reports as resident.
"""
import hashlib
from array import array


def page_name(parent: bytes, tokens) -> bytes:
    """Name of a full page holding `tokens` whose prefix is named `parent`."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def chain_names(namespace: bytes, token_ids, page_size: int) -> list:
    """The names of the full pages of `token_ids` in an address space rooted at `namespace`."""
    data = memoryview(array("q", token_ids).tobytes())       # page_name's bytes, converted once
    step = 8 * page_size
    names, parent = [], namespace
    for start in range(0, len(token_ids) // page_size * step, step):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(data[start:start + step])
        parent = h.digest()
        names.append(parent)
    return names


def salt_of(cache_salt: str) -> bytes:
    """The 32-byte salt a tenant's cache_salt stands for (32 bytes: never equal to a random
    16-byte salt nor to the global namespace's)."""
    return hashlib.blake2b(cache_salt.encode(), digest_size=32, person=b"kvos-salt").digest()
