"""Workloads and the virtual-time driver: distributions, seeds, traces, sharing, metrics."""
import csv
import os
from pathlib import Path

import numpy as np
import pytest

from kernel.errors import KvosError
from userspace.sim.driver import Driver
from userspace.sim.experiments.common import boot, run
from userspace.sim.workloads import PRESETS, Lengths, Request, generate, load_trace, prompt_tokens, save_trace

# A CSV of a real arrival trace (columns arrived_at, num_prefill_tokens, num_decode_tokens, as in the
# Azure LLM inference trace of 2023), named by the environment: the repository ships no trace.
TRACE = os.environ.get("KVOS_TRACE_CSV")


def test_lognormal_lengths_match_the_stated_moments():
    rng = np.random.default_rng(0)
    out = Lengths(350, 400, hi=10**9).sample(rng, 200_000)          # the article's ShareGPT outputs, unclipped
    assert out.mean() == pytest.approx(350, rel=0.03) and out.std() == pytest.approx(400, rel=0.06)
    assert PRESETS["alpaca"].prompt.mean == 19 and PRESETS["alpaca"].output.mean == 59
    assert PRESETS["sharegpt-vllm"].prompt.mean == 161 and PRESETS["sharegpt-vllm"].output.mean == 338


def test_generation_is_seeded_and_arrivals_follow_the_rate():
    a = generate("sharegpt", 2000, rate=10, seed=3)
    assert a == generate("sharegpt", 2000, rate=10, seed=3)
    assert a != generate("sharegpt", 2000, rate=10, seed=4)
    assert 2000 / a[-1].arrival == pytest.approx(10, rel=0.08)
    assert all(b.arrival >= x.arrival for x, b in zip(a, a[1:]))
    assert all(r.arrival == 0 for r in generate("alpaca", 10, arrival="burst"))
    assert max(r.output_len for r in a) <= 2048 and min(r.output_len for r in a) >= 1
    for bad in ({"rate": None}, {"rate": 1, "arrival": "bursty"}):
        with pytest.raises(KvosError):
            generate("sharegpt", 5, **bad)
    with pytest.raises(KvosError) as err:
        generate("lmsys", 5, rate=1)
    assert err.value.errno == "ENOENT"


def test_prompt_ids_share_exactly_the_declared_prefix():
    r = Request(0.0, 40, 5, prefix_id="system", prefix_len=32)
    a, b = prompt_tokens(r, 0, 32000), prompt_tokens(r, 1, 32000)
    assert a[:32] == b[:32] and a[32:] != b[32:]
    assert prompt_tokens(r, 0, 32000, copy=1)[:32] != a[:32]          # an unshared copy shares nothing
    assert all(3 <= t < 31999 for t in a)                             # no special ids, no filler id


def test_jsonl_trace_round_trip_and_errors(tmp_path):
    reqs = generate("alpaca", 20, rate=5, seed=1, n=2) + [Request(9.0, 40, 3, prefix_id="p", prefix_len=16,
                                                                  beam_width=3, max_tokens=64)]
    path = tmp_path / "trace.jsonl"
    save_trace(path, reqs)
    assert load_trace(path) == sorted(reqs, key=lambda r: r.arrival)
    for line, why in (('{"arrival": 0, "prompt_len": 5}', "output_len"),
                      ('{"arrival": -1, "prompt_len": 5, "output_len": 3}', "arrival"),
                      ('{"arrival": 0, "prompt_len": 5, "output_len": 3, "temperature": 1}', "temperature"),
                      ('{"arrival": 0, "prompt_len": 5, "output_len": 9, "max_tokens": 4}', "max_tokens"),
                      ("[1, 2]", "object"), ("{oops", "JSON")):
        path.write_text("# a comment\n\n" + line + "\n")
        with pytest.raises(KvosError) as err:
            load_trace(path)
        assert err.value.errno == "EINVAL" and why in err.value.reason and ":3" in err.value.reason


def test_driver_runs_in_virtual_time_and_measures():
    reqs = [Request(0.0, 50, 10), Request(5.0, 50, 10)]             # the second arrives long after the first ends
    root, tid = boot("a100", "llama-2-7b")                           # the driver holds a root handle only
    result = Driver(root, tid, reqs, record_gaps=True).run()
    first, second = result.requests
    assert first.tokens == second.tokens == 10 and not result.errors
    assert second.first_token > 5.0 and second.ttft < 0.05          # the clock jumped to its arrival
    steps = [s[0] for s in result.step_samples]
    assert first.latency == pytest.approx(sum(steps[:10]))
    assert len(result.gaps) == 2 * 9 and max(result.gaps) < 0.02
    summary = result.summary()
    assert summary["completed"] == 2 and summary["generated_tokens"] == 20
    assert 0.5 < summary["kv_utilization"] <= 1.0


def test_budget_larger_than_output_ends_at_the_output():
    """Prealloc reserves the budget; the request still ends at its own length (its EOS)."""
    reqs = [Request(0.0, 20, 7, max_tokens=100), Request(0.0, 20, 30, max_tokens=100)]
    summary, result, _ = run(reqs, "a100", "llama-2-7b", alloc="prealloc", sample_interval=0.001)
    assert [r.tokens for r in result.requests] == [7, 30]
    assert summary["kv_utilization"] < 0.5                          # reserved for 120 tokens, holding < 50


def test_parallel_samples_share_the_prompt_and_copies_do_not():
    reqs = [Request(0.0, 64, 16, n=4)]                              # 4 full prompt pages, one page of output
    shared, result, root = run(reqs, "a100", "llama-2-7b", sample_interval=0.001)
    assert result.requests[0].sequences == 4 and result.requests[0].tokens == 64
    assert root.meminfo().cow_faults == 0                           # the prompt filled whole pages
    # each of the 4 maps 5 or 6 pages; the 4 prompt pages are mapped once: saved ~ 12 of 20-24
    assert 0.45 < shared["memory_saved"] < 0.62
    alone, result, _ = run(reqs, "a100", "llama-2-7b", share=False, sample_interval=0.001)
    assert alone["memory_saved"] == 0 and alone["cached_tokens"] == 0 and result.requests[0].sequences == 4
    assert alone["prefill_tokens"] == 4 * shared["prefill_tokens"]


def test_beam_search_forks_and_kills_and_ends_with_width_beams():
    reqs = [Request(0.0, 30, 40, beam_width=4), Request(0.0, 30, 1, beam_width=3)]
    summary, result, root = run(reqs, "a100", "llama-2-7b", sample_interval=0.001)
    beam, single = result.requests
    assert beam.sequences == 4 and beam.tokens == 4 * 40
    assert single.sequences == 3                                     # one token: forked at once
    assert root.meminfo().cow_faults > 0 and summary["memory_saved"] > 0.3
    assert root.schedstat().exits > 7                               # beams were killed along the way


@pytest.mark.skipif(not TRACE or not Path(TRACE).is_file(), reason="no trace CSV named by $KVOS_TRACE_CSV")
def test_a_real_trace_runs_through_jsonl(tmp_path):
    with open(TRACE) as f:
        rows = [r for _, r in zip(range(120), csv.DictReader(f))]
    t0 = float(rows[0]["arrived_at"])
    reqs = [Request(float(r["arrived_at"]) - t0, int(r["num_prefill_tokens"]), int(r["num_decode_tokens"]))
            for r in rows]
    path = tmp_path / "azure.jsonl"
    save_trace(path, reqs)
    summary, result, _ = run(load_trace(path), "h100", "llama-2-7b")
    admitted = [r for r in reqs if r.prompt_len < 4096]              # longer prompts: ENOMEM at spawn
    fits = [min(r.output_len, 4096 - r.prompt_len) for r in admitted]
    assert summary["completed"] == len(admitted) and not result.errors
    assert summary["rejected"] == len(reqs) - len(admitted)
    assert summary["truncated"] == sum(f < r.output_len for f, r in zip(fits, admitted))
    assert summary["generated_tokens"] == sum(fits)
