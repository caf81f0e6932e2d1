"""Grader of lab batch: ragged (packed) batches, and padded ones for comparison (docs/labs/batch.md).

pack() is checked against the batch worked out here from each work's tokens and page table; the
padding rows against their definition; and the kernel, whose forward pass reads only what pack()
built, must compute what the reference computes outside it, mixing prefill chunks and decodes.
"""
from types import SimpleNamespace

from kernel.batch import pack, pad
from kernel.sched.plan import Work
from tests.labs.grading import all_memory_back, boot, fsck, jobs, points, reference, rng, run_jobs
from tests.mm_helpers import make_mm

NS = b"lab-batch"
PAGE = 4


def _works(r, mm):
    """Random works over random address spaces: each computes `count` tokens from `start`."""
    cg = mm.create_cgroup("t")
    tenant = SimpleNamespace(page_size=PAGE)
    works = []
    for _ in range(r.randint(3, 6)):
        tokens = [r.randrange(3, 512) for _ in range(r.randint(2, 30))]
        start = r.randrange(len(tokens))
        asid = mm.create(cg, PAGE, NS)
        mm.append(asid, tokens[:start])
        slots = mm.append(asid, tokens[start:])
        proc = SimpleNamespace(tokens=tokens, asid=asid, tenant=tenant)
        works.append(Work(proc, start, len(tokens) - start, slots, True, True, True))
    return works


@points(4)
def test_pack_lays_the_works_back_to_back():
    r = rng("pack")
    mm = make_mm(num_frames=64, page_size=PAGE)
    works = _works(r, mm)
    wanted = [w for w in works if r.random() < 0.6]
    token_ids, positions, slots, query_start, context_lens, rows, samples = pack(works, wanted, mm)
    assert token_ids == [t for w in works for t in w.proc.tokens[w.start:w.end]], "token ids"
    assert list(positions) == [p for w in works for p in range(w.start, w.end)], "positions are absolute"
    assert list(slots) == [s for w in works for s in w.slots], "slots"
    starts = [0]
    for w in works:
        starts.append(starts[-1] + w.count)
    assert list(query_start) == starts, "query_start: where each sequence's rows begin, and the end"
    assert list(context_lens) == [w.end for w in works], "context: the K/V length after this step's tokens"
    assert [list(row) for row in rows] == [mm.space(w.proc.asid).frames for w in works], "page-table rows"
    assert list(samples) == [starts[i + 1] - 1 for i, w in enumerate(works) if w in wanted], \
        "the sampled row of a work is its last token's"


@points(3)
def test_padding_rows_fill_every_sequence_to_the_longest():
    r = rng("pad")
    mm = make_mm(num_frames=64, page_size=PAGE)
    works = _works(r, mm)
    lists = [list(x) for x in pack(works, works, mm)[:6]]
    real = len(lists[0])
    padding = pad(works, 63, *lists)
    longest = max(w.count for w in works)
    assert padding == longest * len(works) - sum(w.count for w in works)
    token_ids, positions, slots, query_start, context_lens, rows = lists
    assert len(token_ids) == len(positions) == len(slots) == real + padding == query_start[-1]
    assert len(context_lens) == len(rows) == len(works) + padding, "a padding row is a 1-token sequence"
    assert all(s == 63 * PAGE for s in slots[real:]), "padding K/V must land in the null frame"
    assert all(list(row) == [63] for row in rows[len(works):]) and context_lens[len(works):] == [1] * padding


@points(5)
def test_the_kernel_mixes_prefill_chunks_and_decodes_correctly():
    r = rng("ragged")
    work = jobs(r, 14, prompt=(3, 90))
    k, sys, tid = boot(token_budget=r.choice([24, 40, 64]), chunk=r.choice([8, 16, 20]))
    outputs = run_jobs(k, sys, tid, work)
    for (prompt, n), out in zip(work, outputs):
        assert out == reference(prompt, n), "a process continued otherwise than the reference"
    assert sys.schedstat().padding_tokens == 0
    all_memory_back(k)


@points(3)
def test_padded_batches_compute_the_same_and_count_their_padding():
    r = rng("padded")
    work = jobs(r, 8, prompt=(3, 40))
    k, sys, tid = boot(token_budget=64, batch="padded")
    since, expected = sys.schedstat().steps, 0
    pids = [sys.spawn(tid, prompt, max_tokens=n, ignore_eos=True, temperature=0) for prompt, n in work]
    while any(p.state != "zombie" for p in sys.ps()):
        record = sys.trace(since=since, timeout=5.0)[-1]
        since = record.step
        assert since < 500, "no end"
        counts = [w.count for w in record.works]
        expected += max(counts) * len(counts) - sum(counts)
        fsck(k)
    for (prompt, n), pid in zip(work, pids):
        assert sys.wait(pid).tokens == reference(prompt, n), "padding changed an output"
    assert sys.schedstat().padding_tokens == expected > 0
    all_memory_back(k)
