"""Grader of lab swap: swap and reclaim, preemption that loses nothing (docs/labs/swap.md).

Frames and swap slots hold token ids (tests/mm_helpers.py): a page swapped out and back must read
back its tokens, wherever it lands; a refused swap changes nothing; and in a kernel whose memory
is too small for its workload, every output equals the reference computed outside it, whether
victims are swapped, reclaimed and recomputed, or both.
"""
from kernel.mm import MemoryPressure, SwapFull
from tests.kernel_helpers import frames
from tests.labs.grading import all_memory_back, boot, fsck, jobs, points, reference, rng, run_jobs
from tests.mm_helpers import append, make_mm, read_tokens, snapshot

NS = b"lab-swap"
PAGE = 4


def _space(r, mm, cg, pages):
    tokens = [r.randrange(1, 10_000) for _ in range((pages - 1) * PAGE + r.randint(1, PAGE))]
    asid = mm.create(cg, PAGE, NS)
    append(mm, asid, tokens)
    return asid, tokens


@points(4)
def test_swapped_pages_come_back_with_their_tokens():
    r = rng("roundtrip")
    mm = make_mm(num_frames=8, page_size=PAGE, swap_slots=8)
    cg = mm.create_cgroup("t")
    a, tokens = _space(r, mm, cg, 3)
    assert mm.swap_out(a) == 3
    assert mm.meminfo().mapped == 0 and mm.meminfo().swap_used == 3, "swapped pages still hold frames"
    fsck(mm)
    other, _ = _space(r, mm, cg, 6)                       # someone else writes the frames meanwhile
    mm.free(other)
    assert mm.swap_in(a) == 3
    assert read_tokens(mm, a) == tokens, "pages came back from swap with other tokens"
    assert mm.meminfo().swap_used == 0
    append(mm, a, [77])
    assert read_tokens(mm, a) == tokens + [77]
    fsck(mm)


@points(2)
def test_swap_in_maps_pages_the_page_cache_still_holds():
    r = rng("cached")
    mm = make_mm(num_frames=8, page_size=PAGE, swap_slots=8)
    cg = mm.create_cgroup("t")
    a, tokens = _space(r, mm, cg, 3)
    mm.publish(a)                                         # its full pages are named
    full = len(tokens) // PAGE
    mm.swap_out(a)
    assert mm.meminfo().cached == full, "named pages stay in the page cache when swapped out"
    assert mm.swap_in(a) == 3 - full, "only pages the cache lost are copied back"
    assert read_tokens(mm, a) == tokens
    fsck(mm)


@points(2)
def test_refused_swaps_change_nothing():
    r = rng("refused")
    mm = make_mm(num_frames=6, page_size=PAGE, swap_slots=2)
    cg = mm.create_cgroup("t")
    a, _ = _space(r, mm, cg, 3)
    before = snapshot(mm)
    try:
        mm.swap_out(a)
    except SwapFull:
        pass
    else:
        raise AssertionError("3 pages swapped out into 2 slots")
    assert snapshot(mm) == before, "a refused swap-out changed the memory manager"
    b, _ = _space(r, mm, cg, 2)
    mm.swap_out(b)
    hog, _ = _space(r, mm, cg, 3)                          # the pool is full again
    before = snapshot(mm)
    try:
        mm.swap_in(b)
    except MemoryPressure:
        pass
    else:
        raise AssertionError("a swap-in took frames the pool does not have")
    assert snapshot(mm) == before, "a refused swap-in changed the memory manager"
    fsck(mm)


def _under_pressure(name, pool, swap):
    work = jobs(rng(name), 16, prompt=(10, 60), output=(8, 30))
    k, sys, tid = boot(pool=pool, swap=frames(swap), token_budget=64)
    outputs = run_jobs(k, sys, tid, work)
    for (prompt, n), out in zip(work, outputs):
        assert out == reference(prompt, n), "a preempted process continued otherwise than the reference"
    all_memory_back(k)
    return sys.schedstat()


@points(4)
def test_the_kernel_swaps_under_pressure_and_loses_nothing():
    stat = _under_pressure("swap", pool=12, swap=64)
    assert stat.swap_outs > 0 and stat.swap_ins > 0 and stat.reclaims == 0


@points(4)
def test_the_kernel_reclaims_recomputes_and_loses_nothing():
    stat = _under_pressure("reclaim", pool=12, swap=0)
    assert stat.reclaims > 0 and stat.recomputed_tokens > 0 and stat.swap_outs == 0


@points(2)
def test_swap_and_reclaim_together_lose_nothing():
    stat = _under_pressure("both", pool=10, swap=2)
    assert stat.swap_outs > 0 and stat.reclaims > 0
