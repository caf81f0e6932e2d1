"""Grader of lab cow: fork and copy-on-write (docs/labs/cow.md).

Frames hold token ids (tests/mm_helpers.py), so a fault that copies nothing, or copies into the
wrong frame, reads back as wrong data; references are recounted by fsck after every operation;
greedy forks in the kernel must continue exactly as the reference computed outside it.
"""
import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from kernel.mm import MemoryPressure
from tests.labs.grading import all_memory_back, boot, fsck, points, reference, rng, run_checked
from tests.mm_helpers import append, make_mm, read_tokens, snapshot

NS = b"lab-cow"
PAGE = 4


def _parent(r, mm, cg, partial=True):
    """An address space of a few full pages and, if `partial`, a partly filled last one."""
    n = r.randint(2, 4) * PAGE + (r.randint(1, PAGE - 1) if partial else 0)
    tokens = [r.randrange(1, 10_000) for _ in range(n)]
    asid = mm.create(cg, PAGE, NS)
    append(mm, asid, tokens)
    return asid, tokens


@points(2)
def test_fork_shares_every_page():
    r = rng("share")
    mm = make_mm(num_frames=32, page_size=PAGE)
    cg = mm.create_cgroup("t")
    parent, tokens = _parent(r, mm, cg)
    mapped = mm.meminfo().mapped
    child = mm.fork(parent)
    assert mm.space(child).frames == mm.space(parent).frames, "the child does not map the parent's frames"
    assert all(p.refcount == 2 for p in mm.pagemap(child).pages), "a shared frame must count both mappings"
    assert mm.meminfo().mapped == mapped, "fork took frames of its own"
    assert read_tokens(mm, child) == tokens
    fsck(mm)


@points(4)
def test_writing_into_the_shared_partial_page_copies_it():
    r = rng("write")
    mm = make_mm(num_frames=32, page_size=PAGE)
    cg = mm.create_cgroup("t")
    parent, tokens = _parent(r, mm, cg)
    child = mm.fork(parent)
    append(mm, child, [20_001])
    assert mm.cow_faults == 1, f"{mm.cow_faults} faults for one write into one shared page"
    assert read_tokens(mm, child) == tokens + [20_001], "the child's copy does not hold the parent's tokens"
    assert read_tokens(mm, parent) == tokens, "the child's write reached the parent's page"
    append(mm, parent, [30_001, 30_002])
    assert mm.cow_faults == 1, "the parent's page was private again: no second fault"
    assert read_tokens(mm, parent) == tokens + [30_001, 30_002]
    assert read_tokens(mm, child) == tokens + [20_001]
    fsck(mm)


@points(2)
def test_full_pages_stay_shared_and_the_fault_drops_a_reference():
    r = rng("full")
    mm = make_mm(num_frames=32, page_size=PAGE)
    cg = mm.create_cgroup("t")
    parent, tokens = _parent(r, mm, cg)
    kids = [mm.fork(parent) for _ in range(2)]
    for i, kid in enumerate(kids):
        append(mm, kid, [40_000 + i])
    full = len(tokens) // PAGE
    refs = [p.refcount for p in mm.pagemap(parent).pages]
    assert refs == [3] * full + [1], f"page refcounts {refs}: full pages shared by 3, the partial one the parent's"
    assert all(mm.space(k).frames[:full] == mm.space(parent).frames[:full] for k in kids)
    fsck(mm)
    for asid in [parent] + kids:
        mm.free(asid)
        fsck(mm)
    assert mm.meminfo().free == 32


@points(1)
def test_a_fault_with_no_frame_changes_nothing():
    mm = make_mm(num_frames=3, page_size=PAGE)
    cg = mm.create_cgroup("t")
    parent = mm.create(cg, PAGE, NS)
    append(mm, parent, list(range(1, 2 * PAGE + 2)))      # all three frames
    child = mm.fork(parent)
    before = snapshot(mm)
    try:
        mm.append(child, [99])
    except MemoryPressure:
        pass
    else:
        raise AssertionError("a copy-on-write fault got a frame from a full pool")
    assert snapshot(mm) == before, "a refused fault changed the memory manager"
    fsck(mm)


@points(3)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(st.tuples(st.sampled_from(["fork", "append", "free"]), st.integers(0, 7),
                              st.integers(1, 6)), min_size=4, max_size=30))
def test_any_sequence_of_forks_reads_back_its_own_tokens(ops):
    mm = make_mm(num_frames=48, page_size=PAGE)
    cg = mm.create_cgroup("t")
    first = mm.create(cg, PAGE, NS)
    append(mm, first, [1, 2, 3, 4, 5, 6])
    expected = {first: [1, 2, 3, 4, 5, 6]}
    for n, (op, pick, length) in enumerate(ops):
        asid = sorted(expected)[pick % len(expected)]
        if op == "fork" and len(expected) < 8:
            expected[mm.fork(asid)] = list(expected[asid])
        elif op == "append":
            tokens = [1000 * n + i for i in range(length)]
            try:
                append(mm, asid, tokens)
            except MemoryPressure:
                continue
            expected[asid] += tokens
        elif op == "free" and len(expected) > 1:
            mm.free(asid)
            del expected[asid]
        fsck(mm)
        for a, want in expected.items():
            assert read_tokens(mm, a) == want, f"address space {a} reads back other tokens after {op}"


@points(4)
def test_greedy_forks_continue_as_the_reference():
    r = rng("kernel")
    prompt = [r.randrange(3, 512) for _ in range(r.randint(2, 5) * 16 + r.randint(1, 15))]
    n, later = r.randint(8, 14), r.randint(1, 4)
    k, sys, tid = boot(pool=64)
    sys.wait(sys.spawn(tid, [r.randrange(3, 512) for _ in range(90)], max_tokens=1))   # frames with other K/V
    parent = sys.spawn(tid, prompt, max_tokens=n, ignore_eos=True, temperature=0)
    since = sys.trace(since=sys.schedstat().steps, timeout=5.0)[-1].step           # its prompt
    first = sys.fork(parent, 2)
    since = sys.trace(since=since, timeout=5.0)[-1].step
    assert sys.meminfo().cow_faults == 2, "one fault per child: the last writer finds the page its own"
    for _ in range(later):                                 # and once more, in the middle of decoding
        since = sys.trace(since=since, timeout=5.0)[-1].step
    second = sys.fork(parent, 1)
    run_checked(k)
    want = reference(prompt, n)
    for pid in [parent] + first + second:
        assert sys.wait(pid).tokens == want, f"pid {pid} continued otherwise than the reference"
    all_memory_back(k)
