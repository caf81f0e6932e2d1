"""Grader of lab speculate: speculative decoding, guess, check, roll back (docs/labs/speculate.md).

propose is held against a plain loop written here, on random files with many repeats; truncate on a
pool whose frames hold token ids (tests/mm_helpers.py), so a page kept with the wrong tokens, or a
frame not given back, shows; in the kernel, speculating runs must give the model's own greedy
continuation (computed outside the kernel) in fewer steps, and sampled runs what the same kernel
gives without speculation, with fsck after every step and every frame back.
"""
from types import SimpleNamespace

import kernel
from kernel.speculate import propose
from tests.kernel_helpers import TINY, frames
from tests.labs.grading import all_memory_back, fsck, points, reference, rng, run_checked
from tests.mm_helpers import append, make_mm, read_tokens

NS = b"lab-speculate"
PAGE = 4
LOOP = [7, 8, 9, 10, 11] * 6 + [7, 8]          # greedy tiny-llama often goes on with the loop


def lookup(tokens: list, k: int) -> tuple:
    """What propose must return: the k tokens after the latest earlier occurrence of the last n tokens
    (n = 4, 3, 2), an occurrence ending before the last token."""
    total = len(tokens)
    for n in (4, 3, 2):
        if total <= n:
            continue
        for start in range(total - n - 1, -1, -1):
            if tokens[start:start + n] == tokens[total - n:]:
                return tuple(tokens[start + n:start + n + k])
    return ()


def process(tokens):
    return SimpleNamespace(tokens=list(tokens), ngram_hay=None)


@points(2)
def test_propose_finds_what_followed_the_latest_occurrence():
    cases = [([1, 2, 3, 4, 9, 9, 1, 2, 3, 5, 6, 7, 1, 2, 3], 3, (5, 6, 7)),
             ([4, 5, 6, 1, 2, 3, 7, 8, 2, 3], 4, (7, 8, 2, 3)),
             ([1, 2, 3, 4], 4, ()), ([5, 5], 4, ()), ([5, 5, 5], 4, (5,)),
             ([1, 2, 3, 4, 5, 0, 2, 3, 4, 6, 1, 2, 3, 4], 2, (5, 0))]      # the 4-gram wins over a later 3-gram
    for tokens, k, want in cases:
        assert propose(process(tokens), k) == want, f"propose({tokens}, {k}) should be {want}"
    r = rng("propose")
    for _ in range(300):
        alphabet = r.sample([3, 4, 5, 0x100, 0x10000, 0x1000000, 70_000], r.randint(2, 4))
        tokens = [r.choice(alphabet) for _ in range(r.randint(1, 40))]
        k = r.randint(1, 6)
        assert propose(process(tokens), k) == lookup(tokens, k), f"propose({tokens}, {k})"


@points(1)
def test_propose_follows_a_growing_file():
    """One process asks every step while its file grows (an index kept in ngram_hay must grow too)."""
    r = rng("grow")
    p = process([r.randrange(3, 7) for _ in range(3)])
    for _ in range(120):
        assert propose(p, 4) == lookup(p.tokens, 4), f"propose on the grown file {p.tokens}"
        p.tokens.append(r.randrange(3, 7))


def _space(r, mm, cg):
    tokens = [r.randrange(1, 10_000) for _ in range(r.randint(2 * PAGE + 1, 5 * PAGE))]
    asid = mm.create(cg, PAGE, NS)
    append(mm, asid, tokens)
    return asid, tokens


@points(3)
def test_truncate_keeps_the_tokens_before_the_end_and_frees_the_pages_after():
    r = rng("truncate")
    mm = make_mm(num_frames=32, page_size=PAGE)
    cg = mm.create_cgroup("t")
    for _ in range(20):
        asid, tokens = _space(r, mm, cg)
        free = mm.meminfo().free
        keep = r.randint(1, len(tokens))
        gone = -(-len(tokens) // PAGE) - -(-keep // PAGE)
        assert mm.truncate(asid, keep) == gone, f"truncate({len(tokens)} -> {keep}) must unmap {gone} page(s)"
        assert mm.space(asid).num_tokens == keep and read_tokens(mm, asid) == tokens[:keep], \
            "the tokens before the new end read back otherwise"
        assert mm.meminfo().free == free + gone, "the unmapped pages' frames did not go back to the pool"
        fsck(mm)
        grown = [20_000 + i for i in range(r.randint(1, 2 * PAGE))]
        append(mm, asid, grown)
        assert read_tokens(mm, asid) == tokens[:keep] + grown, "after a truncate, appends read back otherwise"
        fsck(mm)
        mm.free(asid)
    assert mm.meminfo().free == 32


@points(1)
def test_truncate_of_a_forked_space_leaves_the_other():
    r = rng("fork")
    mm = make_mm(num_frames=32, page_size=PAGE)
    cg = mm.create_cgroup("t")
    parent, tokens = _space(r, mm, cg)
    child = mm.fork(parent)
    mm.truncate(child, PAGE + 1)
    append(mm, child, [30_000, 30_001])
    assert read_tokens(mm, parent) == tokens, "truncating a child changed its parent's pages"
    assert read_tokens(mm, child) == tokens[:PAGE + 1] + [30_000, 30_001]
    fsck(mm)
    for asid in (parent, child):
        mm.free(asid)
    assert mm.meminfo().free == 32


def _run(speculate: int, jobs: list):
    """Spawn (prompt, kwargs) jobs on a speculating (or not) kernel, step to the end with fsck after every
    step. -> (each job's tokens, the kernel's schedstat)"""
    k = kernel.boot(memory=frames(64), speculate=speculate)
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    pids = [sys.spawn(tid, prompt, **kw) for prompt, kw in jobs]
    run_checked(k)
    out = [sys.wait(pid).tokens for pid in pids]
    all_memory_back(k)
    return out, k.stats


@points(4)
def test_greedy_drafts_give_the_model_s_own_tokens_in_fewer_steps():
    r = rng("greedy")
    jobs = [(LOOP[i:], dict(max_tokens=r.randint(30, 60), ignore_eos=True, temperature=0))
            for i in r.sample(range(0, 10), 3)]
    spec, s4 = _run(4, jobs)
    for (prompt, kw), tokens in zip(jobs, spec):
        assert tokens == reference(prompt, kw["max_tokens"]), "a speculating process produced other tokens"
    assert s4.draft_tokens > 0, "nobody drafted: propose found nothing in a file that repeats itself"
    assert s4.accepted_tokens > 0, f"none of {s4.draft_tokens} drafts kept where the model copies its prompt"
    alone = [(_run(0, [job])[1].steps, _run(4, [job])[1].steps) for job in jobs]     # one process a kernel
    assert sum(s for _, s in alone) < sum(p for p, _ in alone), \
        f"speculating processes took as many steps as plain ones (plain, speculating: {alone})"


@points(3)
def test_rejected_drafts_are_forgotten():
    """Sampled runs reject most drafts: what they wrote must not stay (their tokens would differ)."""
    r = rng("sampled")
    bias = {t: 6.0 for t in range(7, 12)}      # draws among the loop's tokens: n-grams recur, drafts are made
    jobs = [(LOOP[r.randrange(10):], dict(max_tokens=r.randint(20, 45), ignore_eos=True, temperature=0.9,
                                          seed=r.randrange(1 << 30), logit_bias=bias)) for _ in range(3)]
    plain, _ = _run(0, jobs)
    spec, s4 = _run(4, jobs)
    assert s4.draft_tokens > s4.accepted_tokens, "no draft was rejected: the test needs some"
    assert spec == plain, "with rejected drafts, speculation changed what the processes drew"
