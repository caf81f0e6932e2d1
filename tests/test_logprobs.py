"""Logprobs and penalties end to end on tiny-llama: one entry per drawn token, the chosen token's
own log-probability under the model, the k most likely beside it; penalized processes reproduce
alone and in a crowd."""
import math

import pytest

import kernel
from tests.kernel_helpers import TINY, frames, run_to_end


@pytest.fixture(scope="module")
def tiny():
    k = kernel.boot(memory=frames(256))
    sys = k.syscalls()
    return k, sys, sys.spawn_tenant(TINY)


def read_all(sys, pid):
    reads = []
    while not reads or not reads[-1].turn_done:
        reads.append(sys.read(pid, timeout=10))
    return [t for r in reads for t in r.tokens], [e for r in reads for e in r.logprobs]


@pytest.mark.parametrize("k_top", [0, 1, 5])
def test_one_entry_per_token_with_the_chosen_and_the_top_k(tiny, k_top):
    k, sys, tid = tiny
    program = k.tenants[tid].program
    pid = sys.spawn(tid, "Hello, world", max_tokens=12, temperature=0.9, seed=1, logprobs=k_top)
    tokens, entries = read_all(sys, pid)
    assert sys.wait(pid).tokens == tokens
    assert [e.token for e in entries] == tokens
    for e in entries:
        assert e.logprob <= 0 and math.isfinite(e.logprob)
        assert bytes(e.bytes) == program.token_bytes(e.token) and e.text == bytes(e.bytes).decode(errors="replace")
        assert len(e.top) == k_top
        assert [t.logprob for t in e.top] == sorted((t.logprob for t in e.top), reverse=True)
        assert all(bytes(t.bytes) == program.token_bytes(t.token) for t in e.top)
        for t in e.top:                        # the chosen token among the top has the same value
            if t.token == e.token:
                assert t.logprob == pytest.approx(e.logprob, abs=1e-6)
        if k_top:                              # nothing drawn is above the most likely
            assert e.logprob <= e.top[0].logprob + 1e-6
        # its rank: 1 + the tokens more likely; among the top it is its place there, past them after
        above = [t for t in e.top if t.logprob > e.logprob]
        assert e.rank >= len(above) + 1 and (len(above) == len(e.top) or e.rank == len(above) + 1)


def test_greedy_chooses_the_most_likely_and_sums_to_at_most_one(tiny):
    _, sys, tid = tiny
    _, entries = read_all(sys, sys.spawn(tid, "Once upon a time", max_tokens=8, temperature=0, logprobs=20))
    for e in entries:
        assert e.token == e.top[0].token and e.logprob == pytest.approx(e.top[0].logprob) and e.rank == 1
        assert sum(math.exp(t.logprob) for t in e.top) <= 1 + 1e-5


def test_no_logprobs_unless_asked(tiny):
    _, sys, tid = tiny
    _, entries = read_all(sys, sys.spawn(tid, "Hi", max_tokens=4))
    assert entries == []


def distinct(tokens):
    return len(set(tokens))


def test_penalties_change_greedy_output_and_stay_reproducible_in_a_crowd():
    jobs = [([5 + i, 60, 70 + i], {}) for i in range(4)]
    shaped = {"repetition_penalty": 1.5, "frequency_penalty": 1.0, "presence_penalty": 0.5, "min_p": 0.1}

    def run(specs):
        k = kernel.boot(memory=frames(128))
        sys = k.syscalls()
        tid = sys.spawn_tenant(TINY)
        pids = [sys.spawn(tid, prompt, max_tokens=40, ignore_eos=True, temperature=0, **kw) for prompt, kw in specs]
        run_to_end(k)
        return [sys.wait(p).tokens for p in pids]

    plain = run(jobs)
    alone = run([(jobs[0][0], shaped)])[0]
    crowd = run([(jobs[0][0], shaped)] + jobs[1:])
    assert crowd[0] == alone and crowd[1:] == plain[1:]
    assert alone != plain[0] and distinct(alone) > distinct(plain[0])


def test_a_turn_that_draws_nothing_reports_its_next_position(tiny):
    """max_tokens=0 (beam search's turns): one entry without a token, the k most likely beside it."""
    _, sys, tid = tiny
    pid = sys.spawn(tid, "Hello", max_tokens=0, logprobs=3, interactive=True)
    while not (r := sys.read(pid, timeout=10)).turn_done:
        pass
    (entry,) = r.logprobs
    assert entry.token is None and entry.logprob is None and entry.bytes == [] and len(entry.top) == 3
    assert sys.wait(pid).tokens == []


@pytest.mark.parametrize("seed", range(4))
def test_ranked_equals_sorting_each_row(seed):
    """kernel/logprobs.py's ranked against a plain sort: the token's log-probability, the k most
    likely in order, and its rank (1 + the tokens strictly more likely), ties included."""
    import torch

    from kernel.logprobs import ranked
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 50, generator=g).round(decimals=1)      # rounded: ties happen
    tokens = [int(t) for t in torch.randint(0, 50, (6,), generator=g)]
    tokens[2] = None
    ks = [0, 1, 3, 5, 20, 2]
    for row, token, k, (own, top, rank) in zip(logits, tokens, ks, ranked(logits, tokens, ks)):
        logp = torch.log_softmax(row, dim=-1).tolist()
        order = sorted(range(50), key=lambda t: -logp[t])
        assert [v for _, v in top] == pytest.approx([logp[t] for t in order[:k]], abs=1e-6)
        assert sorted(logp[t] for t, _ in top) == pytest.approx(sorted(logp[t] for t in order[:k]), abs=1e-6)
        if token is None:
            assert own is None and rank is None
        else:
            assert own == pytest.approx(logp[token], abs=1e-6)
            assert rank == 1 + sum(v > logp[token] + 1e-7 for v in logp)
