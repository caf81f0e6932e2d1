"""Chunked prefill as the scheduler must run it: running decodes before any prefill chunk, and no
process more than `chunk` tokens in a step, read off the step records (trace)."""
import kernel
from tests.kernel_helpers import TINY, frames


def steps(sys, since, n):
    """Run n steps (no loop thread: trace with a timeout runs the next one); their records."""
    out = []
    for _ in range(n):
        record = sys.trace(since=since, timeout=5.0)[-1]
        since = record.step
        out.append(record)
    return out


def test_running_decodes_go_before_prefill_chunks():
    """With the budget no larger than a chunk, a prefill scheduled first would take the whole step:
    the streams already decoding must still get their token every step the long prompt is read."""
    k = kernel.boot(memory=frames(64), token_budget=8, chunk=8)
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    streams = [sys.spawn(tid, [5 + i, 6, 7], max_tokens=60, ignore_eos=True, temperature=0) for i in range(3)]
    since = steps(sys, 0, 3)[-1].step                    # their prompts, then decoding
    assert all(p.state == "running" for p in sys.ps())
    long = sys.spawn(tid, list(range(3, 103)), max_tokens=2, ignore_eos=True, temperature=0)
    records = steps(sys, since, 20)                      # 100 prompt tokens at 5 a step
    for r in records:
        served = {w.pid: w.count for w in r.works}
        assert all(served.get(pid) == 1 for pid in streams), f"step {r.step}: the decodes waited: {served}"
        assert served.get(long, 0) == 8 - len(streams), f"step {r.step}: the prompt got {served.get(long)}"
        assert [w.pid for w in r.works][:len(streams)] == streams          # in the plan, decodes first
    for pid in streams + [long]:
        sys.wait(pid)


def test_no_process_computes_more_than_a_chunk_in_a_step():
    """Prompts longer than a chunk under a budget that could take them whole: every work of every
    step stays within the chunk, and the step within the budget, while several chunks share a step."""
    k = kernel.boot(memory=frames(128), token_budget=64, chunk=8)
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    pids = [sys.spawn(tid, list(range(3 + i, 43 + i)), max_tokens=4, ignore_eos=True, temperature=0)
            for i in range(3)]
    pids.append(sys.spawn(tid, [7, 8, 9], max_tokens=12, ignore_eos=True, temperature=0))
    since, seen = 0, []
    while any(p.state != "zombie" for p in sys.ps()):
        record = sys.trace(since=since, timeout=5.0)[-1]
        since = record.step
        seen.append(record)
        assert since < 200, "the kernel does not finish"
    assert all(w.count <= 8 for r in seen for w in r.works), [(r.step, w.pid, w.count) for r in seen for w in r.works]
    assert all(r.prefill_tokens + r.decode_tokens <= 64 for r in seen)
    assert max(sum(w.count > 1 for w in r.works) for r in seen) >= 3       # chunks of several prompts at once
    assert all(len(sys.wait(pid).tokens) == n for pid, n in zip(pids, (4, 4, 4, 12)))
