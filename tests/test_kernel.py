"""The kernel proper: nothing is lost under any schedule, memory pressure or policy."""
import pytest

import kernel
from kernel.errors import KvosError
from tests.kernel_helpers import TINY, assert_all_memory_back, frames, run_to_end, run_workload, workload

JOBS = workload(32)


@pytest.fixture(scope="module")
def alone():
    """Each job's greedy output when it runs by itself: the reference."""
    out = []
    for job in JOBS:
        tokens, _ = run_workload([job], check=False)
        out.append(tokens[0])
    return out


def test_all_together_equals_alone(alone):
    together, k = run_workload(JOBS)
    assert together == alone
    assert all(len(t) == n for t, (_, n) in zip(together, JOBS))
    assert_all_memory_back(k)


@pytest.mark.parametrize("budget", [1, 16, 512])
def test_token_budget_does_not_change_outputs(alone, budget):
    out, k = run_workload(JOBS, token_budget=budget)
    assert out == alone
    stat = k.syscalls().schedstat()
    assert max(s.prefill_tokens + s.decode_tokens for s in stat.recent_steps) <= budget
    assert_all_memory_back(k)


@pytest.mark.parametrize("policy", ["fcfs", "priority", "fair", "static"])
def test_policy_does_not_change_outputs(alone, policy):
    out, k = run_workload(JOBS, policy=policy, token_budget=64)
    assert out == alone
    assert_all_memory_back(k)


def test_swap_under_pressure_loses_nothing(alone):
    out, k = run_workload(JOBS, memory=frames(12), swap=frames(64), token_budget=64)
    assert out == alone
    stat = k.syscalls().schedstat()
    assert stat.swap_outs > 0 and stat.swap_ins > 0
    assert_all_memory_back(k)


def test_reclaim_and_recompute_lose_nothing(alone):
    out, k = run_workload(JOBS, memory=frames(12), swap=0, token_budget=64)
    assert out == alone
    stat = k.syscalls().schedstat()
    assert stat.reclaims > 0 and stat.recomputed_tokens > 0 and stat.swap_outs == 0
    assert_all_memory_back(k)


def test_swap_and_reclaim_together_lose_nothing(alone):
    out, k = run_workload(JOBS, memory=frames(10), swap=frames(4), token_budget=32)
    assert out == alone
    stat = k.syscalls().schedstat()
    assert stat.swap_outs > 0 and stat.reclaims > 0
    assert_all_memory_back(k)


@pytest.mark.parametrize("kv, pool, swap, total", [("bfloat16", 5, 2, 10), ("int8", 3, 1, 10)])
def test_narrow_kv_cache_loses_nothing_under_swap_and_reclaim(monkeypatch, kv, pool, swap, total):
    """KVOS_KV=bfloat16 or int8: frames hold 2x or ~3x the tokens, swap moves their bytes and
    recompute rounds (quantizes) the same values again, so every schedule still gives each job's
    output alone."""
    import torch
    monkeypatch.setenv("KVOS_KV", kv)
    jobs = JOBS[:16]
    alone_narrow = [run_workload([job], check=False)[0][0] for job in jobs]
    # frames() counts float32 frames: 5 of them are 10 frames of the bf16 tenant, as above's 10.
    out, k = run_workload(jobs, memory=frames(pool), swap=frames(swap), token_budget=32)
    assert out == alone_narrow
    assert next(iter(k.tenants.values())).program.kv_shape.dtype == getattr(torch, kv)
    stat = k.syscalls().schedstat()
    assert stat.swap_outs > 0 and stat.reclaims > 0
    assert k.syscalls().meminfo().total == total
    assert_all_memory_back(k)


def test_chunked_prefill_never_stalls_decodes():
    k = kernel.boot(memory=frames(128), token_budget=32, chunk=8)
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    short = sys.spawn(tid, list(range(3, 10)), max_tokens=30, ignore_eos=True, temperature=0)
    k.step()
    k.step()
    sys.spawn(tid, list(range(3, 300)), max_tokens=2, ignore_eos=True, temperature=0)    # a long prompt arrives
    decoded_every_step = True
    while k.procs[short].alive:
        before = len(k.procs[short].output)
        k.step()
        decoded_every_step &= len(k.procs[short].output) == before + 1 or not k.procs[short].alive
    assert decoded_every_step
    assert max(s.prefill_tokens for s in sys.schedstat().recent_steps) <= 8 + 24
    run_to_end(k)


def test_fork_shares_pages_and_counts_cow_faults():
    k = kernel.boot(memory=frames(64))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    pid = sys.spawn(tid, list(range(3, 43)), max_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    while k.procs[pid].num_computed < 40:
        k.step()
    children = sys.fork(pid, 3)
    pages = sys.pagemap(pid).pages
    assert [p.refcount for p in pages] == [4, 4, 4]             # every page shared by all four
    assert sys.meminfo().mapped == 3                            # against 12 for four private copies
    run_to_end(k)
    outs = [sys.wait(p) for p in [pid] + children]
    assert all(len(o.tokens) == 20 for o in outs)
    assert len({tuple(o.tokens) for o in outs}) == 4             # each continues with its own seed
    assert sys.meminfo().cow_faults >= 3                        # the shared partial page was copied
    assert_all_memory_back(k)


def test_shm_prefix_is_prefilled_once():
    k = kernel.boot(memory=frames(128))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    system = list(range(3, 103))                                # 100 tokens
    shmid = sys.shmget(tid, system)
    pids = [sys.spawn(tid, [200 + i, 201, 202], max_tokens=4, ignore_eos=True, temperature=0, shm=shmid)
            for i in range(6)]
    run_to_end(k)
    stat = sys.schedstat()
    assert stat.prefill_tokens == 100 + 6 * 3                   # the prefix once, each suffix once
    assert stat.cached_tokens == 6 * 100
    for pid in pids:
        assert len(sys.wait(pid).tokens) == 4
    sys.shmrm(shmid)
    assert_all_memory_back(k)


def test_shm_output_equals_plain_prompt():
    k = kernel.boot(memory=frames(128))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    system = list(range(3, 50))
    shmid = sys.shmget(tid, system)
    a = sys.spawn(tid, [300, 301], max_tokens=10, ignore_eos=True, temperature=0, shm=shmid)
    b = sys.spawn(tid, system + [300, 301], max_tokens=10, ignore_eos=True, temperature=0)
    run_to_end(k)
    assert sys.wait(a).tokens == sys.wait(b).tokens


def test_page_cache_hit_skips_prefill_within_a_tenant_only():
    k = kernel.boot(memory=frames(128))
    sys = k.syscalls()
    a = sys.spawn_tenant(TINY, name="a")
    b = sys.spawn_tenant(TINY, name="b")
    prompt = list(range(3, 67))                                 # 64 tokens: 4 full pages
    first = sys.spawn(a, prompt, max_tokens=2, ignore_eos=True, temperature=0)
    run_to_end(k)
    sys.wait(first)
    again = sys.spawn(a, prompt, max_tokens=2, ignore_eos=True, temperature=0)
    run_to_end(k)
    assert k.stats.cached_tokens == 48                          # 3 pages (the last token is computed)
    other = sys.spawn(b, prompt, max_tokens=2, ignore_eos=True, temperature=0)
    run_to_end(k)
    assert k.stats.cached_tokens == 48                          # salted: no hit for tenant b
    assert sys.wait(again).tokens == sys.wait(other).tokens


def test_global_prefix_sharing_is_opt_in_on_both_sides():
    k = kernel.boot(memory=frames(128))
    sys = k.syscalls()
    a = sys.spawn_tenant(TINY, name="a", prefix_sharing="global")
    b = sys.spawn_tenant(TINY, name="b", prefix_sharing="global")
    c = sys.spawn_tenant(TINY, name="c")
    prompt = list(range(3, 67))
    sys.wait(sys.spawn(a, prompt, max_tokens=1, temperature=0))
    sys.wait(sys.spawn(b, prompt, max_tokens=1, temperature=0))
    assert k.stats.cached_tokens == 48
    sys.wait(sys.spawn(c, prompt, max_tokens=1, temperature=0))
    assert k.stats.cached_tokens == 48


def test_fair_policy_serves_weights_one_to_three():
    k = kernel.boot(memory=frames(256), policy="fair", token_budget=16, max_running=16)
    sys = k.syscalls()
    light = sys.spawn_tenant(TINY, name="light", weight=1)
    heavy = sys.spawn_tenant(TINY, name="heavy", weight=3)
    for tid in (light, heavy):
        for i in range(40):
            sys.spawn(tid, [5 + i, 6, 7, 8], max_tokens=200, ignore_eos=True, temperature=0)
    for _ in range(150):
        k.step()
    served = {t.name: t.served_tokens for t in sys.schedstat().tenants}
    ratio = served["heavy"] / served["light"]
    assert 3 * 0.9 <= ratio <= 3 * 1.1, served


def test_priority_policy_runs_nice_minus_ten_first():
    k = kernel.boot(memory=frames(256), policy="priority", max_running=2)
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    normal = [sys.spawn(tid, [5, 6, 7], max_tokens=5, ignore_eos=True, temperature=0) for _ in range(4)]
    urgent = sys.spawn(tid, [8, 9, 10], max_tokens=5, ignore_eos=True, temperature=0, priority=-10)
    k.step()
    assert k.procs[urgent].state.value == "running"
    assert sum(k.procs[p].state.value == "running" for p in normal) == 1
    run_to_end(k)


def test_isolation_eperm_across_tenants():
    k = kernel.boot(memory=frames(64))
    root = k.syscalls()
    a, b = root.spawn_tenant(TINY, name="a"), root.spawn_tenant(TINY, name="b")
    sa, sb = k.syscalls(as_tenant=a), k.syscalls(as_tenant=b)
    pid = sa.spawn(a, [5, 6, 7], max_tokens=3)
    for call in (lambda: sb.kill(pid), lambda: sb.read(pid), lambda: sb.pagemap(pid), lambda: sb.fork(pid),
                 lambda: sb.wait(pid), lambda: sb.nice(pid, 1), lambda: sb.spawn(a, [5], max_tokens=1),
                 lambda: sb.spawn_tenant(TINY), lambda: sb.kill_tenant(a)):
        with pytest.raises(KvosError) as err:
            call()
        assert err.value.errno == "EPERM"
    assert [p.pid for p in sb.ps()] == []
    assert [p.pid for p in sa.ps()] == [pid]
    assert all(e.tid == b for e in sb.dmesg())
    assert sa.wait(pid).reason == "length"


def test_interactive_turns_keep_pages():
    k = kernel.boot(memory=frames(64))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    pid = sys.spawn(tid, list(range(3, 40)), max_tokens=5, ignore_eos=True, temperature=0, interactive=True)
    run_to_end(k)
    r = sys.read(pid)
    assert r.turn_done and len(r.tokens) == 5 and r.state == "sleeping"
    frames_before = [p.frame for p in sys.pagemap(pid).pages]
    computed = k.procs[pid].num_computed
    sys.write(pid, [50, 51, 52])
    run_to_end(k)
    assert k.stats.prefill_tokens == 37 + 4                    # only the new input (and last token) computed
    assert [p.frame for p in sys.pagemap(pid).pages][:len(frames_before) - 1] == frames_before[:-1]
    assert k.procs[pid].num_computed > computed
    status = sys.wait(pid)
    assert len(status.tokens) == 10
    assert_all_memory_back(k)


def test_prealloc_reserves_and_padded_counts_padding(alone):
    out, k = run_workload(JOBS, alloc="prealloc", batch="padded", token_budget=64)
    assert out == alone
    assert k.stats.padding_tokens > 0
    assert_all_memory_back(k)


def test_a_process_that_can_never_fit_gets_enomem():
    k = kernel.boot(memory=frames(4), swap=0)
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    with pytest.raises(KvosError) as err:
        sys.spawn(tid, list(range(3, 100)), max_tokens=5)     # 97 tokens need 7 frames of 4
    assert err.value.errno == "ENOMEM"
    pid = sys.spawn(tid, list(range(3, 40)), max_tokens=100, ignore_eos=True, temperature=0)   # grows past the pool
    run_to_end(k)
    status = sys.wait(pid)
    assert status.reason == "error" and "ENOMEM" in status.error
    assert_all_memory_back(k)


def test_second_turn_through_write_equals_a_fresh_process():
    k = kernel.boot(memory=frames(64))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    pid = sys.spawn(tid, [{"role": "user", "content": "Hello there"}], max_tokens=6, temperature=0,
                    ignore_eos=True, interactive=True)
    run_to_end(k)
    sys.write(pid, [{"role": "user", "content": "Tell me more."}])
    history = list(k.procs[pid].tokens)                        # everything the second turn starts from
    run_to_end(k)
    second = sys.read(pid).tokens[6:]
    fresh = sys.spawn(tid, history, max_tokens=6, temperature=0, ignore_eos=True)
    run_to_end(k)
    assert sys.wait(fresh).tokens == second
    template = k.tenants[tid].program.render_chat([{"role": "user", "content": "Tell me more."}])
    assert "Tell me more." in template
    sys.wait(pid)
    assert_all_memory_back(k)


def test_beam_search_and_parallel_sample_share_pages():
    from userspace import libc
    k = kernel.boot(memory=frames(128))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    shared_seen = []

    def watch(pids):
        maps = [sys.pagemap(p) for p in pids]
        shared_seen.append(max((pg.refcount for m in maps for pg in m.pages), default=0))
    beams = libc.beam_search(sys, tid, list(range(3, 40)), width=3, max_tokens=6, on_round=watch)
    assert len(beams) == 3 and all(len(b.tokens) == 6 for b in beams)
    assert beams[0].score >= beams[-1].score
    assert max(shared_seen) >= 2                               # beams share prompt pages
    prefill_before = k.stats.prefill_tokens
    samples = libc.parallel_sample(sys, tid, list(range(50, 98)), n=4, max_tokens=5, seed=3)
    assert len(samples) == 4 and all(len(s.tokens) == 5 for s in samples)
    # the 48-token prompt is computed once; each fork recomputes only its last page's tokens
    assert k.stats.prefill_tokens - prefill_before <= 48 + 3 * 16
    assert_all_memory_back(k)


def test_loop_thread_serves_waiters_and_shutdown_frees_everything():
    import threading
    k = kernel.boot(memory=frames(64))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    k.start_loop()
    results = {}

    def client(i):
        pid = sys.spawn(tid, [5 + i, 6, 7, 8], max_tokens=8, temperature=0, ignore_eos=True)
        results[i] = sys.wait(pid).tokens
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == list(range(8)) and all(len(r) == 8 for r in results.values())
    sleeper = sys.spawn(tid, [9, 9, 9], max_tokens=2, interactive=True)
    runner = sys.spawn(tid, [7, 7, 7], max_tokens=400, ignore_eos=True)
    k.shutdown(kill=True)
    assert k.loop_thread is None
    with pytest.raises(KvosError) as err:
        sys.spawn(tid, [5], max_tokens=1)
    assert err.value.errno in ("EAGAIN", "ESRCH")
    assert sleeper not in k.procs and runner not in k.procs     # reaped with their tenant


def test_seeded_forks_reproduce_every_child_and_text_is_complete_at_exit():
    def run():
        k = kernel.boot(memory=frames(64))
        sys = k.syscalls()
        tid = sys.spawn_tenant(TINY)
        sys.spawn_tenant(TINY, name="other")                   # pids differ between the two runs
        pid = sys.spawn(tid, list(range(3, 20)), max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
        kids = sys.fork(pid, 3)
        run_to_end(k)
        statuses = [sys.wait(p) for p in [pid] + kids]
        program = k.tenants[tid].program
        for st in statuses:                                     # nothing held back once a process ended
            assert st.text == program.decode(st.tokens)
        return [s.tokens for s in statuses]
    first = run()
    k = kernel.boot(memory=frames(64))
    sys = k.syscalls()
    t = sys.spawn_tenant(TINY)
    for _ in range(5):
        sys.wait(sys.spawn(t, [5], max_tokens=1))              # shift the pid counter
    assert run() == first and len({tuple(t) for t in first}) == 4


def test_meminfo_frame_map_and_pagemap_text():
    k = kernel.boot(memory=frames(16))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    pid = sys.spawn(tid, "kvos is an operating system for LLM inference.", max_tokens=3, interactive=True)
    run_to_end(k)
    fmap = sys.meminfo(frames=True).frames
    assert len(fmap) == 16 and sum(f[0] == "mapped" for f in fmap) == len(sys.pagemap(pid).pages)
    pages = sys.pagemap(pid, text=True).pages
    assert pages[0].text and pages[0].text in k.tenants[tid].program.decode(k.procs[pid].tokens)
    assert k.syscalls(as_tenant=tid).meminfo(frames=True).frames is None     # root only


def test_fork_of_a_reclaimed_sleeping_parent_does_not_wait_for_it():
    k = kernel.boot(memory=frames(8), swap=0)
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    parent = sys.spawn(tid, list(range(3, 40)), max_tokens=2, temperature=0, interactive=True)
    run_to_end(k)
    hog = sys.spawn(tid, list(range(100, 190)), max_tokens=30, temperature=0, ignore_eos=True)
    run_to_end(k)                                                 # the hog reclaims the sleeper's pages
    assert k.procs[parent].residency.value == "none" and k.procs[parent].state.value == "sleeping"
    [child] = sys.fork(parent)
    sys.write(child, [5, 6])
    run_to_end(k)
    assert len(sys.read(child).tokens) == 4                       # inherited 2 + its own turn of 2
    reclaims = [e.message for e in sys.dmesg() if e.event == "preempt" and "reclaim" in e.message]
    assert reclaims and f"pid {parent} preempted (reclaim) holding 38 computed tokens" in reclaims
    for pid in (parent, child, hog):
        sys.wait(pid)
    assert_all_memory_back(k)


def test_shutdown_with_a_timeout_kills_what_is_left():
    k = kernel.boot(memory=frames(64))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    pid = sys.spawn(tid, [5, 6, 7], max_tokens=2000, ignore_eos=True, temperature=0)
    k.step()
    k.shutdown(timeout=0.0)
    assert pid not in k.procs and k.mm.meminfo().mapped == 0


def test_spawn_n_is_spawn_and_fork_with_no_step_between():
    """With a loop thread stepping, n samples of one prompt share the prompt and nothing else; a
    refused spawn_n leaves nothing behind."""
    k = kernel.boot(memory=frames(64))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY, max_procs=6)
    k.start_loop()
    prompt = list(range(3, 40))
    for _ in range(5):
        pids = sys.spawn_n(tid, prompt, 4, max_tokens=1, temperature=1.0, seed=3, ignore_eos=True)
        assert len(pids) == 4
        outs = [sys.wait(p) for p in pids]
        assert all(len(o.tokens) == 1 and o.prompt_tokens == len(prompt) for o in outs)
    (pid,) = sys.spawn_n(tid, prompt, 1, max_tokens=2)
    assert len(sys.wait(pid).tokens) == 2                     # n=1 is a plain spawn
    before = (len(k.procs), k.mm.meminfo().free)
    for args, errno in (((tid, prompt, 7), "EAGAIN"), ((tid, prompt, 0), "EINVAL"), ((tid, prompt, "4"), "EINVAL"),
                        ((tid, prompt, 2), "EINVAL")):
        with pytest.raises(KvosError) as err:
            sys.spawn_n(*args, max_tokens=-1 if args[2] == 2 else 4)
        assert err.value.errno == errno
    assert (len(k.procs), k.mm.meminfo().free) == before
    k.shutdown(kill=True)
