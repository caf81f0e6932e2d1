"""prompt_logprobs: each prompt token's log-probability given the tokens before it, from the
process's own prefill rows; equal to what the decode path reports for the same position, whatever
the chunking, the page cache, forks, swap or reclaim; refused where no row of the process could
score the prompt."""
import pytest

import kernel
from kernel.errors import KvosError
from tests.kernel_helpers import TINY, frames, run_to_end, workload

PROMPT = [5, 17, 99, 230, 41, 8, 300, 12, 77, 150, 3, 64, 410, 9, 222, 18, 91, 6, 128, 250]


def scored(root, pid):
    """The prompt entries of a process run to its end: [(token, logprob, [(token, logprob)])]."""
    result = root.read(pid, timeout=30)
    while result.prompt_logprobs is None and not result.turn_done:
        result = root.read(pid, timeout=30)
    assert result.prompt_logprobs is not None
    return [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top]) for e in result.prompt_logprobs]


def decode_path(root, tid, prompt, k):
    """The oracle: position p's distribution as the first draw of a process whose prompt ends at p,
    forced (logit_bias) to draw prompt[p + 1], whose logprobs are reported before any bias."""
    out = [(prompt[0], None, [])]
    for p in range(len(prompt) - 1):
        pid = root.spawn(tid, prompt[:p + 1], max_tokens=1, temperature=0, logprobs=k,
                         logit_bias={prompt[p + 1]: 100})
        entry = root.read(pid, timeout=30).logprobs[0]
        assert entry.token == prompt[p + 1]
        out.append((entry.token, entry.logprob, [(t.token, t.logprob) for t in entry.top]))
        root.wait(pid)
    return out


def assert_close(got, want, tol=1e-4):
    assert len(got) == len(want)
    for (t, lp, top), (wt, wlp, wtop) in zip(got, want):
        assert t == wt
        assert (lp is None) == (wlp is None) and (lp is None or abs(lp - wlp) < tol), (lp, wlp)
        assert [u for u, _ in top] == [u for u, _ in wtop]
        assert all(abs(a - b) < tol for (_, a), (_, b) in zip(top, wtop))


@pytest.fixture(scope="module")
def oracle():
    k = kernel.boot(memory=frames(64), threads=1)
    root = k.syscalls()
    return decode_path(root, root.spawn_tenant(TINY), PROMPT, 3)


@pytest.mark.parametrize("chunk", [512, 7, 1])
def test_the_prefill_rows_equal_the_decode_path(oracle, chunk):
    k = kernel.boot(memory=frames(64), threads=1, chunk=chunk)
    root = k.syscalls()
    tid = root.spawn_tenant(TINY)
    pid = root.spawn(tid, PROMPT, max_tokens=2, temperature=0, prompt_logprobs=3)
    assert_close(scored(root, pid), oracle)
    root.wait(pid)
    run_to_end(k)


def test_a_cached_prompt_is_scored_all_the_same_and_forks_get_it_too(oracle):
    k = kernel.boot(memory=frames(64), threads=1)
    root = k.syscalls()
    tid = root.spawn_tenant(TINY)
    root.wait(root.spawn(tid, PROMPT + [1, 2, 3], max_tokens=2, temperature=0))     # its pages in the page cache
    hits = root.meminfo().page_cache_hits
    pids = root.spawn_n(tid, PROMPT, 3, max_tokens=3, temperature=0.8, seed=1, prompt_logprobs=3)
    for pid in pids:
        assert_close(scored(root, pid), oracle)
    run_to_end(k)
    # A later process with the same prompt and no prompt_logprobs still maps the cached pages.
    root.wait(root.spawn(tid, PROMPT, max_tokens=1))
    assert root.meminfo().page_cache_hits > hits


def test_swap_and_reclaim_change_no_entry():
    jobs = workload(n=32, seed=3)

    def run(**boot):
        k = kernel.boot(token_budget=32, threads=1, **boot)
        root = k.syscalls()
        tid = root.spawn_tenant(TINY)
        pids = [root.spawn(tid, p, max_tokens=n, ignore_eos=True, temperature=0, prompt_logprobs=1) for p, n in jobs]
        run_to_end(k)                                        # fsck after every step
        return [scored(root, pid) for pid in pids], root.schedstat()

    alone, _ = run(memory=frames(256))
    pressed, stat = run(memory=frames(10), swap=frames(4))
    assert stat.reclaims > 0 and stat.swap_outs > 0 and stat.recomputed_tokens > 0
    for got, want in zip(pressed, alone):
        assert_close(got, want)


def test_refusals():
    k = kernel.boot(memory=frames(64), threads=1)
    root = k.syscalls()
    tid = root.spawn_tenant(TINY)
    shm = root.shmget(tid, PROMPT[:16])
    before = root.ps()
    for kwargs, reason in (({"prompt_logprobs": 21}, "prompt_logprobs must be <= 20"),
                           ({"prompt_logprobs": -1}, "prompt_logprobs must be >= 0"),
                           ({"prompt_logprobs": True}, "prompt_logprobs must be an integer"),
                           ({"prompt_logprobs": 1, "shm": shm}, "prompt_logprobs cannot be combined with shm")):
        with pytest.raises(KvosError, match=f"^EINVAL: .*{reason}"):
            root.spawn(tid, PROMPT, **kwargs)
    sim = kernel.boot(device="sim:a100-80g").syscalls()
    with pytest.raises(KvosError, match="needs a device that computes logits"):
        sim.spawn(sim.spawn_tenant("llama-2-7b"), PROMPT, prompt_logprobs=1)
    assert root.ps() == before                      # refused: nothing was created
    k.fsck()


def test_decode_graph_steps_carry_the_scoring_rows():
    """With chunk=1 a prompt advances one row a step beside decodes: such steps are pure decode and
    go through the graph runner, its sampled rows (decodes, last prompt rows) before its scoring
    rows, so not in row order."""
    # In arrival order: A and C long, B shorter, S shortest. Once S decodes, the step that computes B's
    # last prompt row holds [S decode, A row, B last row, C row]: rows sampled 0 and 2, scoring 1 and 3.
    jobs = [(list(range(40, 52)), 8), (list(range(60, 66)), 8), (list(range(80, 92)), 8), ([7, 8, 9], 12)]
    jobs += workload(n=4, seed=5, prompt=(3, 20), output=(4, 16))

    def run(**boot):
        k = kernel.boot(memory=frames(64), threads=1, chunk=1, **boot)
        root = k.syscalls()
        tid = root.spawn_tenant(TINY)
        pids = [root.spawn(tid, p, max_tokens=n, ignore_eos=True, temperature=0, prompt_logprobs=2) for p, n in jobs]
        run_to_end(k)
        return [(scored(root, pid), root.wait(pid).tokens) for pid in pids], k

    want, _ = run()
    got, k = run(graphs=True)
    assert k.graphs.stats.static_steps > 0
    for (entries, tokens), (want_entries, want_tokens) in zip(got, want):
        assert_close(entries, want_entries)
        assert tokens == want_tokens


def test_libc_score_and_loglikelihood():
    from userspace.libc import generate, loglikelihood, score
    k = kernel.boot(memory=frames(64), threads=1)
    root = k.syscalls()
    tid = root.spawn_tenant(TINY)
    entries = score(root, tid, PROMPT, top=3)
    assert_close([(e.token, e.logprob, [(t.token, t.logprob) for t in e.top]) for e in entries],
                 decode_path(root, tid, PROMPT, 3))
    context = "abc"            # tiny-llama's greedy bytes after it tokenize back to the same tokens
    greedy = generate(root, tid, context, max_tokens=3, temperature=0, ignore_eos=True)
    total, is_greedy = loglikelihood(root, tid, context, greedy.text)
    ids = root.tokenize(tid, context + greedy.text)
    split = len(root.tokenize(tid, context))
    assert ids[split:] == greedy.tokens and is_greedy
    assert total == pytest.approx(sum(e.logprob for e in score(root, tid, ids)[split:]), abs=1e-4) and total < 0
    other, other_greedy = loglikelihood(root, tid, context, " zq")
    assert not other_greedy and other < total
    with pytest.raises(KvosError, match="needs a context"):
        loglikelihood(root, tid, "", "x")
    run_to_end(k)
    assert not [p for p in root.ps() if p.state != "zombie"]          # nothing left running
    k.fsck()
