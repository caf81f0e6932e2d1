"""Reliability and isolation: limits, fault storms, memory storms, failing programs, hostile tenants."""
import pytest

import kernel
from kernel.errors import KvosError
from tests import storms
from tests.kernel_helpers import TINY, assert_all_memory_back, frames, run_to_end


def test_kill_storm_loses_nothing():
    counts = storms.kill_storm(seed=0)
    assert counts["frames leaked"] == 0 and counts["mismatched outputs"] == 0
    assert counts["processes killed"] > 5 and counts["survivors checked"] > 3
    assert counts["preemptions survived"] > 0


@pytest.mark.parametrize("pool,swap", [(1, 0), (2, 0), (3, 1), (6, 0), (6, 4), (16, 2)])
def test_memory_storm_makes_progress(pool, swap):
    counts = storms.memory_storm(pool, swap)
    assert counts["frames leaked"] == 0 and counts["mismatched outputs"] == 0
    assert counts["completed"] + counts["ended ENOMEM (can never fit)"] + counts["spawn refused ENOMEM"] == 12
    assert counts["max preemptions of one process"] <= 64


def test_failing_forward_ends_only_its_processes():
    counts = storms.fault_storm()
    assert counts["faulty tenant: error"] > 0
    assert counts["fault messages in dmesg"] == 3
    assert counts["mismatched outputs"] == 0 and counts["survivors checked"] == 12
    assert counts["frames leaked"] == 0


def test_random_workload_of_thousands_of_operations():
    counts = storms.random_workload(ops=1500)
    assert counts["operations"] == 1500
    assert counts["frames leaked"] == 0 and counts["mismatched outputs"] == 0
    assert counts["survivors checked"] > 20


def test_fork_bomb_gets_eagain():
    k = kernel.boot(memory=frames(32))
    root = k.syscalls()
    tid = root.spawn_tenant(TINY, max_procs=8)
    pid = root.spawn(tid, [5, 6, 7], max_tokens=50, **storms.GREEDY)
    with pytest.raises(KvosError) as err:
        while True:
            root.fork(pid, 2)
    assert err.value.errno == "EAGAIN"
    assert sum(p.alive for p in k.procs.values()) == 7     # 1 + 2 + 2 + 2; a fork of 2 more would pass 8
    run_to_end(k)


def test_queue_limit_sheds_load_with_eagain():
    k = kernel.boot(memory=frames(32))
    root = k.syscalls()
    tid = root.spawn_tenant(TINY, max_queued=5)
    for _ in range(5):
        root.spawn(tid, [5, 6, 7], max_tokens=2)
    with pytest.raises(KvosError) as err:
        root.spawn(tid, [5, 6, 7], max_tokens=2)
    assert err.value.errno == "EAGAIN"
    k.step()                                                # admitted ones leave the queue
    root.spawn(tid, [5, 6, 7], max_tokens=2)
    run_to_end(k)


def test_length_limits_are_e2big():
    k = kernel.boot(memory=frames(32))
    root = k.syscalls()
    tid = root.spawn_tenant(TINY, max_prompt_tokens=10, max_new_tokens=20)
    for call in (lambda: root.spawn(tid, list(range(3, 20)), max_tokens=2),
                 lambda: root.spawn(tid, [5, 6], max_tokens=21)):
        with pytest.raises(KvosError) as err:
            call()
        assert err.value.errno == "E2BIG"


def test_salted_tenant_takes_the_uncached_path():
    k = kernel.boot(memory=frames(64))
    root = k.syscalls()
    a, b = root.spawn_tenant(TINY, name="a"), root.spawn_tenant(TINY, name="b")
    prompt = list(range(3, 131))                            # 128 tokens: 8 pages
    root.wait(root.spawn(a, prompt, max_tokens=1))
    before = root.schedstat()
    root.wait(root.spawn(b, prompt, max_tokens=1))          # b asks for a's exact prompt
    after = root.schedstat()
    assert after.cached_tokens == before.cached_tokens      # no hit: nothing to time either
    assert after.prefill_tokens - before.prefill_tokens == 128
    root.wait(root.spawn(a, prompt, max_tokens=1))          # a itself hits its own pages
    assert root.schedstat().cached_tokens == before.cached_tokens + 112


def test_greedy_tenant_cannot_push_out_a_tenant_within_its_share():
    k = kernel.boot(memory=frames(24), swap=frames(64), token_budget=64, policy="fair")
    root = k.syscalls()
    greedy = root.spawn_tenant(TINY, name="greedy")
    modest = root.spawn_tenant(TINY, name="modest")
    modest_pids = [root.spawn(modest, list(range(3, 20)), max_tokens=40, **storms.GREEDY) for _ in range(3)]
    for _ in range(3):
        k.step()
    greedy_pids = [root.spawn(greedy, list(range(30, 60)), max_tokens=80, **storms.GREEDY) for _ in range(20)]
    while k.step():
        k.fsck()
        assert all(k.procs[p].preemptions == 0 for p in modest_pids)
    assert sum(k.procs[p].preemptions for p in greedy_pids) > 0
    assert_all_memory_back(k)


def test_tenant_under_its_share_gets_memory_back_at_admission():
    k = kernel.boot(memory=frames(20), swap=frames(64), token_budget=64, policy="fair")
    root = k.syscalls()
    hog = root.spawn_tenant(TINY, name="hog")
    late = root.spawn_tenant(TINY, name="late")
    for i in range(12):
        root.spawn(hog, list(range(3 + i, 40 + i)), max_tokens=60, **storms.GREEDY)
    for _ in range(6):
        k.step()
    assert root.meminfo().free == 0                         # the hog holds the pool
    pid = root.spawn(late, list(range(3, 20)), max_tokens=5, **storms.GREEDY)
    k.step()
    assert k.procs[pid].state.value == "running"            # admitted at once, the hog preempted
    run_to_end(k)
    assert_all_memory_back(k)


def test_tenant_views_show_only_their_share():
    k = kernel.boot(memory=frames(32))
    root = k.syscalls()
    a, b = root.spawn_tenant(TINY, name="a"), root.spawn_tenant(TINY, name="b")
    sa = k.syscalls(as_tenant=a)
    pa = sa.spawn(a, [5, 6, 7], max_tokens=3)
    root.spawn(b, [8, 9, 10, 11], max_tokens=3)
    k.step()
    assert [p.pid for p in sa.ps()] == [pa]
    info = sa.meminfo()
    assert set(info.cgroups) == {"a"} and info.free == 0
    assert [t.name for t in sa.schedstat().tenants] == ["a"]
    assert all(e.tid == a for e in sa.dmesg())
    run_to_end(k)
