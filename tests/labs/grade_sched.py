"""Grader of lab sched: iteration-level scheduling under a token budget, chunked prefill, decodes
first (docs/labs/sched.md). Read off the kernel's step records (trace): what each process computed
in each step; and every output equals the reference computed outside the kernel."""
from tests.labs.grading import all_memory_back, boot, jobs, points, reference, rng, run_jobs


def _records(sys, max_steps=2_000):
    """Run to the end, one step per trace call; every step's record."""
    since, records = sys.schedstat().steps, []
    while any(p.state != "zombie" for p in sys.ps()):
        records.append(sys.trace(since=since, timeout=5.0)[-1])
        since = records[-1].step
        assert len(records) < max_steps, "no end: a livelock?"
    return records


@points(3)
def test_no_step_exceeds_the_token_budget():
    r = rng("budget")
    budget = r.randint(12, 40)
    k, sys, tid = boot(token_budget=budget)
    pids = [sys.spawn(tid, p, max_tokens=n, ignore_eos=True, temperature=0) for p, n in jobs(r, 12, prompt=(3, 80))]
    records = _records(sys)
    assert all(rec.prefill_tokens + rec.decode_tokens <= budget for rec in records), \
        f"a step computed {max(rec.prefill_tokens + rec.decode_tokens for rec in records)} tokens, budget {budget}"
    assert max(rec.prefill_tokens + rec.decode_tokens for rec in records) == budget, "the budget is for using"
    for pid in pids:
        sys.wait(pid)


@points(3)
def test_no_process_computes_more_than_a_chunk_in_a_step():
    r = rng("chunk")
    chunk = r.randint(5, 12)
    k, sys, tid = boot(token_budget=128, chunk=chunk)
    pids = [sys.spawn(tid, p, max_tokens=n, ignore_eos=True, temperature=0) for p, n in jobs(r, 6, prompt=(30, 90))]
    records = _records(sys)
    assert all(w.count <= chunk for rec in records for w in rec.works), \
        f"a process computed {max(w.count for rec in records for w in rec.works)} tokens in a step, chunk {chunk}"
    assert max(sum(w.count > 1 for w in rec.works) for rec in records) >= 2, "several chunks share a step"
    for pid in pids:
        sys.wait(pid)


@points(4)
def test_running_decodes_go_before_prefill_chunks():
    r = rng("decodes-first")
    budget = r.randint(6, 10)
    streams = r.randint(2, budget - 3)
    k, sys, tid = boot(token_budget=budget, chunk=budget)
    pids = [sys.spawn(tid, [5 + i, 6, 7], max_tokens=80, ignore_eos=True, temperature=0) for i in range(streams)]
    since = sys.schedstat().steps
    while any(p.generated_tokens == 0 for p in sys.ps()):
        since = sys.trace(since=since, timeout=5.0)[-1].step
    left = r.randint(60, 120)
    long = sys.spawn(tid, [r.randrange(3, 512) for _ in range(left)], max_tokens=1, temperature=0)
    while left:
        record = sys.trace(since=since, timeout=5.0)[-1]
        since = record.step
        served = {w.pid: w.count for w in record.works}
        assert all(served.get(pid) == 1 for pid in pids), f"step {since}: a running decode waited for a prefill"
        assert served.get(long, 0) == min(left, budget - streams), "the prompt gets what the decodes leave"
        left -= served[long]
    for pid in pids + [long]:
        sys.wait(pid)


@points(2)
def test_a_long_prompt_is_read_a_chunk_a_step():
    r = rng("ttft")
    chunk, length = r.randint(8, 20), r.randint(50, 150)
    k, sys, tid = boot(token_budget=256, chunk=chunk)
    pid = sys.spawn(tid, [r.randrange(3, 512) for _ in range(length)], max_tokens=1, temperature=0)
    records = _records(sys)
    assert len(records) == -(-length // chunk), f"{len(records)} steps for {length} tokens in chunks of {chunk}"
    sys.wait(pid)


@points(2)
def test_a_finished_process_is_replaced_the_next_step():
    k, sys, tid = boot(max_running=2)
    short = sys.spawn(tid, [5, 6, 7], max_tokens=2, ignore_eos=True, temperature=0)
    long = sys.spawn(tid, [8, 9, 10], max_tokens=10, ignore_eos=True, temperature=0)
    waiting = sys.spawn(tid, [11, 12, 13], max_tokens=3, ignore_eos=True, temperature=0)
    records = _records(sys)
    admitted = next(rec.step for rec in records if waiting in rec.admitted)
    exited = next(rec.step for rec in records if any(pid == short for pid, _ in rec.exits))
    assert admitted == exited + 1, f"pid {short} left at step {exited}, its slot was taken at step {admitted}"
    for pid in (short, long, waiting):
        sys.wait(pid)


@points(4)
def test_outputs_equal_the_reference_under_a_small_budget():
    r = rng("outputs")
    work = jobs(r, 12, prompt=(3, 80))
    k, sys, tid = boot(token_budget=r.randint(8, 24), chunk=r.randint(4, 12))
    outputs = run_jobs(k, sys, tid, work)
    for (prompt, n), out in zip(work, outputs):
        assert out == reference(prompt, n)
    all_memory_back(k)
