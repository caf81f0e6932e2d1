"""The page cache's events (cacheevents) and tenants' cache salts, on the simulated device and the CPU.

The syscall through both doors is in test_syscalls.py; here: evictions reach the ring, the ring
is bounded, names agree across kernels for one salt and never across tenants, and a router's
chain_names matches what a kernel publishes.
"""
import pytest

import kernel
from kernel.errors import KvosError
from kernel.pagename import chain_names


def boot(**kw):
    opts = dict(device="cpu", frames=8, swap_frames=8, threads=1)
    opts.update(kw)
    k = kernel.boot(**opts)
    return k, k.syscalls()


def run(sys, tid, ids):
    sys.wait(sys.spawn(tid, ids, max_tokens=1, temperature=0))


def test_publish_then_evict_when_frames_are_reused():
    k, root = boot()
    tid = root.spawn_tenant("tiny-llama", cache_salt="acme")
    info = root.tenantinfo(tid)
    frames = root.meminfo().total
    first = list(range(3, 3 + info.page_size * 2))
    run(root, tid, first)
    names = {n.hex() for n in chain_names(bytes.fromhex(info.page_namespace), first, info.page_size)}
    for i in range(frames):                         # distinct prompts until every frame was reused
        run(root, tid, [100 + i] * (info.page_size * 2))
    events = root.cacheevents()
    evicted = {e.page for e in events if e.kind == "evict"}
    assert names <= evicted and all(e.tid == tid for e in events)
    resident = set()
    for e in events:                                # replaying the feed gives the cache's contents
        (resident.add if e.kind == "publish" else resident.discard)(e.page)
    assert len(resident) <= frames and not names & resident
    root.fsck()
    k.shutdown(kill=True)


def test_names_agree_across_kernels_for_one_salt_and_never_across_tenants():
    ids = list(range(9, 9 + 40))
    seen = []
    for salt in ("acme", "acme", "globex", None):
        k, root = boot(frames=32)
        tid = root.spawn_tenant("tiny-llama", cache_salt=salt)
        run(root, tid, ids)
        seen.append(tuple(e.page for e in root.cacheevents() if e.kind == "publish"))
        k.shutdown(kill=True)
    assert seen[0] == seen[1] and len(seen[0]) == 2
    assert not set(seen[0]) & set(seen[2]) and not set(seen[0]) & set(seen[3])


def test_a_salt_is_one_tenants_on_a_kernel():
    k, root = boot()
    a = root.spawn_tenant("tiny-llama", name="a", cache_salt="s1")
    with pytest.raises(KvosError) as err:
        root.spawn_tenant("tiny-llama", name="b", cache_salt="s1")
    namespace = root.tenantinfo(a).page_namespace
    assert err.value.errno == "EINVAL" and len(namespace) == 32
    root.kill_tenant(a)
    b = root.spawn_tenant("tiny-llama", name="b", cache_salt="s1")       # a dead tenant's salt is free
    assert root.tenantinfo(b).page_namespace == namespace
    k.shutdown(kill=True)


def test_the_ring_is_bounded(monkeypatch):
    from kernel.mm import pagecache
    cache = pagecache.PageCache()
    monkeypatch.setattr(cache, "events", __import__("collections").deque(maxlen=4))
    for frame in range(6):
        cache.insert(frame, bytes([frame]) * 16, b"p" * 16, [frame])
    assert [e[0] for e in cache.events_after(0)] == [3, 4, 5, 6]            # a reader at 0 sees the gap
    assert [e[0] for e in cache.events_after(4, limit=1)] == [5]


def test_chain_names_is_page_names_chain():
    from kernel.pagename import page_name
    for n in (0, 15, 16, 17, 64, 100):
        ids = list(range(50, 50 + n))
        expected, parent = [], b"n" * 16
        for start in range(0, n - 15, 16):
            parent = page_name(parent, ids[start:start + 16])
            expected.append(parent)
        assert chain_names(b"n" * 16, ids, 16) == expected
