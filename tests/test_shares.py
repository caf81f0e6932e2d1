"""Guaranteed shares (kernel/sched/shares.py), in process and step by step: a tenant within its
share of memory or of running slots is served every step however another tenant overflows them."""
import pytest

import kernel


def decode_gaps(root, tid, max_tokens, policy_steps_before=30):
    """Spawn one process of `tid` once the others have run a while; -> (steps until its first token,
    the most steps between two of its tokens), read off trace records."""
    since = 0
    for _ in range(policy_steps_before):
        since = root.trace(since=since, timeout=30)[-1].step
    pid = root.spawn(tid, "bob", max_tokens=max_tokens, ignore_eos=True, temperature=0)
    arrived, last, worst, first, generated = since, None, 0, None, 0
    while generated < max_tokens:
        records = root.trace(since=since, timeout=30)
        assert records, "the kernel stopped before bob's process ended"
        for r in records:
            since = r.step
            for w in r.works:
                if w.pid == pid and w.token is not None:
                    if last is None:
                        first = r.step - arrived
                    else:
                        worst = max(worst, r.step - last)
                    last, generated = r.step, w.generated
    root.wait(pid)
    return first, worst


@pytest.mark.parametrize("policy", ["fcfs", "fair", "priority"])
def test_a_tenant_within_its_memory_share_decodes_every_step(policy):
    k = kernel.boot(memory="4MiB", swap="2MiB", threads=1, policy=policy)      # 170 frames of 16 tokens
    root = k.syscalls()
    alice, bob = root.spawn_tenant("tiny-llama", name="alice"), root.spawn_tenant("tiny-llama", name="bob")
    hogs = [root.spawn(alice, "kvos", max_tokens=1500, ignore_eos=True, temperature=0) for _ in range(40)]
    first, worst = decode_gaps(root, bob, 400)
    assert first <= 2 and worst <= 2, (first, worst)     # it was 1,247 steps when earlier arrivals came first
    for pid in hogs:
        root.kill(pid)
        root.wait(pid)
    root.fsck()
    k.shutdown()


def test_a_tenant_below_its_share_of_running_slots_gets_one_at_once():
    k = kernel.boot(memory="16MiB", swap="8MiB", threads=1, max_running=4)
    root = k.syscalls()
    alice, bob = root.spawn_tenant("tiny-llama", name="alice"), root.spawn_tenant("tiny-llama", name="bob")
    hogs = [root.spawn(alice, "kvos", max_tokens=1500, ignore_eos=True, temperature=0) for _ in range(12)]
    first, worst = decode_gaps(root, bob, 50)
    assert first <= 2 and worst <= 1, (first, worst)
    assert root.schedstat().running <= 4
    for pid in hogs:
        root.kill(pid)
        root.wait(pid)
    root.fsck()
    k.shutdown()
