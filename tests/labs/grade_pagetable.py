"""Grader of lab pagetable: page tables and demand paging (docs/labs/pagetable.md).

Frames hold token ids as data (tests/mm_helpers.py): what a process reads back through its page
table must be what it wrote, frames come only as tokens need them, every frame comes back, and
the kernel's outputs equal the reference computed outside it.
"""
from kernel.mm import MemoryPressure
from tests.labs.grading import all_memory_back, boot, fsck, jobs, points, reference, rng, run_jobs
from tests.mm_helpers import make_mm, read_tokens, snapshot, write_tokens

NS = b"lab-pagetable"


def _interleaved(r, mm, cg, spaces=3, appends=12, page=4):
    """Several address spaces growing by random appends, interleaved so their frames mix."""
    expected = {mm.create(cg, page, NS): [] for _ in range(spaces)}
    for _ in range(appends):
        asid = r.choice(sorted(expected))
        tokens = [r.randrange(1, 10_000) for _ in range(r.randint(1, 2 * page + 1))]
        yield asid, tokens, expected


@points(3)
def test_slots_follow_the_page_table():
    r = rng("slots")
    mm = make_mm(num_frames=64, page_size=4)
    cg = mm.create_cgroup("t")
    taken = set()
    for asid, tokens, expected in _interleaved(r, mm, cg):
        start = len(expected[asid])
        slots = mm.append(asid, tokens)
        frames = mm.space(asid).frames
        assert slots == [frames[i // 4] * 4 + i % 4 for i in range(start, start + len(tokens))], \
            "a slot is not frame * page_size + offset of its token's page"
        assert not taken & set(slots), "two tokens were given the same slot"
        taken |= set(slots)
        write_tokens(mm, slots, tokens)
        expected[asid] += tokens
        for a, want in expected.items():
            assert read_tokens(mm, a) == want, f"address space {a} reads back other tokens"
        fsck(mm)


@points(3)
def test_frames_come_on_demand():
    r = rng("demand")
    mm = make_mm(num_frames=64, page_size=4)
    cg = mm.create_cgroup("t")
    for asid, tokens, expected in _interleaved(r, mm, cg, appends=16):
        predicted = mm.frames_needed(asid, len(tokens))
        before = len(mm.space(asid).frames)
        mm.append(asid, tokens)
        expected[asid] += tokens
        got = len(mm.space(asid).frames)
        assert got == -(-len(expected[asid]) // 4), f"{len(expected[asid])} tokens in {got} frames of 4"
        assert got - before == predicted, f"frames_needed said {predicted}, the append took {got - before}"
        assert mm.meminfo().mapped == sum(-(-len(t) // 4) for t in expected.values())
        fsck(mm)


@points(2)
def test_a_refused_append_changes_nothing():
    r = rng("refused")
    mm = make_mm(num_frames=6, page_size=4)
    cg = mm.create_cgroup("t")
    limited = mm.create_cgroup("small", limit=2)
    a = mm.create(cg, 4, NS)
    tokens = list(range(1, 4 * 4 + r.randint(0, 3)))       # 4 frames, the last perhaps partly filled
    write_tokens(mm, mm.append(a, tokens), tokens)
    b = mm.create(limited, 4, NS)
    for asid, n in ((a, 4 * 4), (b, 3 * 4)):
        before = snapshot(mm)
        try:
            mm.append(asid, [7] * n)
        except MemoryPressure:
            pass
        else:
            raise AssertionError("an append needing more frames than there are succeeded")
        assert snapshot(mm) == before, "a refused append changed the memory manager"
    fsck(mm)


@points(2)
def test_free_gives_every_frame_back():
    r = rng("free")
    mm = make_mm(num_frames=64, page_size=4)
    cg = mm.create_cgroup("t")
    spaces = set()
    for asid, tokens, _ in _interleaved(r, mm, cg):
        mm.append(asid, tokens)
        spaces.add(asid)
    for asid in spaces:
        mm.free(asid)
        fsck(mm)
    info = mm.meminfo()
    assert info.free == info.total and mm.cgroups[cg].charged == 0


@points(5)
def test_the_kernel_computes_what_the_reference_does():
    work = jobs(rng("kernel"), 10)
    k, sys, tid = boot(token_budget=64, chunk=24)
    outputs = run_jobs(k, sys, tid, work)
    for (prompt, n), out in zip(work, outputs):
        assert out == reference(prompt, n), f"a {len(prompt)}-token prompt continued otherwise than the reference"
    all_memory_back(k)
