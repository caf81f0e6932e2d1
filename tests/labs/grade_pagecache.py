"""Grader of lab pagecache: the page cache and shm (docs/labs/pagecache.md).

A hit must be verified against the stored page, not trusted to its hash; new prompts map the
cached pages of their prefix and read back the right tokens; the least recently used cached page
is evicted first; shm segments map their pages into new processes; and in the kernel, a cached
prefix is not computed again while every output stays the reference's.
"""
from kernel.mm import page_name
from kernel.mm.pagecache import PageCache
from tests.labs.grading import all_memory_back, boot, fsck, points, reference, rng, run_checked
from tests.mm_helpers import append, make_mm, read_tokens

NS = b"lab-pagecache"
PAGE = 4


def _cached_prompt(r, mm, cg, pages):
    """A prompt of `pages` full pages and a partial one, computed, named and freed: its full pages cached."""
    prompt = [r.randrange(1, 10_000) for _ in range(pages * PAGE + r.randint(1, PAGE - 1))]
    asid = mm.create(cg, PAGE, NS)
    append(mm, asid, prompt)
    mm.publish(asid)
    mm.free(asid)
    return prompt


@points(3)
def test_a_hit_is_verified_not_trusted_to_its_hash():
    r = rng("verify")
    cache = PageCache()
    tokens = tuple(r.randrange(1, 10_000) for _ in range(PAGE))
    name = page_name(NS, tokens)
    assert cache.insert(5, name, NS, tokens) and cache.lookup(name, NS, tokens) == 5
    other = tuple(t + 1 for t in tokens)
    assert cache.lookup(name, NS, other) is None, "a colliding name with other tokens was taken for a hit"
    assert cache.lookup(name, b"other-parent", tokens) is None, "a page under another prefix was taken for a hit"
    assert cache.lookup(page_name(NS, other), NS, other) is None
    assert not cache.insert(6, name, NS, tokens), "one name, two frames"
    assert not cache.insert(5, page_name(NS, other), NS, other), "one frame, two names"
    assert cache.lookup(name, NS, list(tokens)) == 5


@points(3)
def test_a_new_prompt_maps_the_cached_pages_of_its_prefix():
    r = rng("prefix")
    mm = make_mm(num_frames=32, page_size=PAGE)
    cg = mm.create_cgroup("t")
    pages = r.randint(3, 5)
    prompt = _cached_prompt(r, mm, cg, pages)
    assert mm.meminfo().cached == pages, "full pages must stay cached when their last user goes"
    same = mm.create(cg, PAGE, NS)
    assert mm.map_cached(same, prompt, max_tokens=len(prompt) - 1) == pages * PAGE
    assert read_tokens(mm, same) == prompt[:pages * PAGE], "a hit maps a frame holding other tokens"
    cut = r.randint(1, pages - 1)                          # diverges inside page `cut`: the chain stops there
    forked = prompt[:cut * PAGE] + [0] + prompt[cut * PAGE + 1:]
    other = mm.create(cg, PAGE, NS)
    assert mm.map_cached(other, forked) == cut * PAGE, "pages after the first miss belong to another prefix"
    short = mm.create(cg, PAGE, NS)
    assert mm.map_cached(short, prompt, max_tokens=2 * PAGE - 1) == PAGE, "max_tokens caps the tokens mapped"
    elsewhere = mm.create(cg, PAGE, b"another-namespace")
    assert mm.map_cached(elsewhere, prompt) == 0, "a namespace sees only its own pages"
    for asid in (same, other, short, elsewhere):
        fsck(mm)
        mm.free(asid)
    fsck(mm)


@points(3)
def test_the_least_recently_used_cached_page_is_evicted_first():
    r = rng("lru")
    mm = make_mm(num_frames=6, page_size=PAGE)
    cg = mm.create_cgroup("t")
    prompts = [_cached_prompt(r, mm, cg, 1) for _ in range(3)]       # frames 0..2 cached, in this order
    again = mm.create(cg, PAGE, NS)
    assert mm.map_cached(again, prompts[0]) == PAGE                   # the oldest is used again...
    mm.free(again)                                                    # ...and becomes the newest
    hog = mm.create(cg, PAGE, NS)
    mm.append(hog, list(range(4 * PAGE)))                             # 3 free frames, then one eviction
    assert mm.meminfo().page_cache_evictions == 1
    hits = []
    for prompt in prompts:
        probe = mm.create(cg, PAGE, NS)
        hits.append(mm.map_cached(probe, prompt) == PAGE)
        mm.free(probe)
    assert hits == [True, False, True], f"still cached after the eviction: {hits} (the second was least recent)"
    fsck(mm)


@points(2)
def test_allocation_takes_free_frames_before_cached_ones():
    r = rng("free-first")
    mm = make_mm(num_frames=8, page_size=PAGE)
    cg = mm.create_cgroup("t")
    _cached_prompt(r, mm, cg, 3)
    info = mm.meminfo()
    assert (info.cached, info.free) == (3, 5)
    hog = mm.create(cg, PAGE, NS)
    mm.append(hog, list(range(5 * PAGE)))
    assert mm.meminfo().page_cache_evictions == 0, "a cached page went while free frames were left"
    mm.append(hog, [1])
    assert mm.meminfo().page_cache_evictions == 1 and mm.meminfo().cached == 2
    fsck(mm)


@points(3)
def test_shm_segments_map_their_pages():
    r = rng("shm")
    mm = make_mm(num_frames=16, page_size=PAGE)
    cg = mm.create_cgroup("t")
    prefix = [r.randrange(1, 10_000) for _ in range(2 * PAGE + r.randint(1, PAGE - 1))]
    builder = mm.create(cg, PAGE, NS)
    append(mm, builder, prefix)
    shmid = mm.make_segment(builder)
    users = [mm.create(cg, PAGE, NS) for _ in range(3)]
    for i, asid in enumerate(users):
        assert mm.attach(asid, shmid) == len(prefix)
        append(mm, asid, [50_000 + i])
    for i, asid in enumerate(users):
        assert read_tokens(mm, asid) == prefix + [50_000 + i], "an attached process reads back other tokens"
    seg_frames = [p.frame for p in mm.segment_pagemap(shmid).pages]
    assert all(mm.space(a).frames[:2] == seg_frames[:2] for a in users), "full pages are mapped, not copied"
    assert all(p.pinned and p.refcount == 4 for p in mm.segment_pagemap(shmid).pages[:2])
    fsck(mm)
    for asid in users:
        mm.free(asid)
    mm.remove_segment(shmid)
    fsck(mm)


@points(4)
def test_the_kernel_skips_cached_prefixes_and_keeps_every_output():
    r = rng("kernel")
    system = [r.randrange(3, 512) for _ in range(r.randint(3, 5) * 16 + r.randint(1, 15))]
    k, sys, tid = boot(pool=64)
    first = sys.spawn(tid, system + [7, 8], max_tokens=6, ignore_eos=True, temperature=0)
    run_checked(k)
    assert sys.wait(first).tokens == reference(system + [7, 8], 6)
    computed = sys.schedstat().prefill_tokens
    again = sys.spawn(tid, system + [9], max_tokens=6, ignore_eos=True, temperature=0)
    run_checked(k)
    full = len(system) // 16 * 16
    assert sys.schedstat().cached_tokens == full, "the cached full pages of the prompt were not mapped"
    assert sys.schedstat().prefill_tokens - computed == len(system) + 1 - full
    assert sys.wait(again).tokens == reference(system + [9], 6)
    shmid = sys.shmget(tid, system)
    users = [sys.spawn(tid, [10 + i, 11], max_tokens=5, ignore_eos=True, temperature=0, shm=shmid) for i in range(3)]
    run_checked(k)
    for i, pid in enumerate(users):
        assert sys.wait(pid).tokens == reference(system + [10 + i, 11], 5), "a process on shm continued otherwise"
    sys.shmrm(shmid)
    all_memory_back(k)
