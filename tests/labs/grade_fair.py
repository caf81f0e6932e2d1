"""Grader of lab fair: weighted fair share by virtual token counters (docs/labs/fair.md).

Part one, FairShare (kernel/sched/policies.py): tokens served in proportion to the weights, a
tenant that becomes active late lifted to the others' virtual time, the counters and the order
they give, and outputs that do not depend on the policy. Part two, your own policy (FairTTFT in
kernel/sched/fairttft.py): scored like malloc lab on a simulated trace against FairShare's
(tests/labs/policy_bench.py), zero if fsck panics, outputs change, or it is FairShare again.
"""
from types import SimpleNamespace

import kernel
from kernel.sched.fairttft import FairTTFT
from kernel.sched.policies import FairShare
from tests.kernel_helpers import TINY, frames
from tests.labs import policy_bench
from tests.labs.grading import SEED, all_memory_back, jobs, points, reference, rng, run_checked


def _served_per_step(sys, since, steps):
    """tid -> tokens served over the next `steps` steps; and the cursor after them."""
    served = {}
    for _ in range(steps):
        record = sys.trace(since=since, timeout=5.0)[-1]
        since = record.step
        for w in record.works:
            served[w.tid] = served.get(w.tid, 0) + w.count
    return served, since


@points(4)
def test_tokens_are_served_in_proportion_to_the_weights():
    weight = rng("weights").choice([2, 3, 4])
    k = kernel.boot(memory=frames(256), policy="fair", token_budget=16, max_running=16)
    sys = k.syscalls()
    light = sys.spawn_tenant(TINY, name="light", weight=1)
    heavy = sys.spawn_tenant(TINY, name="heavy", weight=weight)
    for tid in (light, heavy):
        for i in range(40):
            sys.spawn(tid, [5 + i, 6, 7, 8], max_tokens=200, ignore_eos=True, temperature=0)
    served, _ = _served_per_step(sys, 0, 120)
    ratio = served[heavy] / served[light]
    assert weight * 0.9 <= ratio <= weight * 1.1, f"weights 1:{weight}, served {served[light]}:{served[heavy]}"


@points(4)
def test_a_late_tenant_is_lifted_not_paid_back():
    r = rng("lift")
    k = kernel.boot(memory=frames(512), policy="fair", token_budget=64, max_running=8)
    sys = k.syscalls()
    early = sys.spawn_tenant(TINY, name="early")
    late = sys.spawn_tenant(TINY, name="late")
    for i in range(100):
        sys.spawn(early, [5 + i % 50, 6, 7, 8], max_tokens=10, ignore_eos=True, temperature=0)
    _, since = _served_per_step(sys, 0, r.randint(50, 70))
    for i in range(100):
        sys.spawn(late, [9 + i % 50, 6, 7, 8], max_tokens=10, ignore_eos=True, temperature=0)
    served, _ = _served_per_step(sys, since, 40)
    share = served.get(early, 0) / sum(served.values())
    assert 0.42 <= share <= 0.58, f"equal weights, but the early tenant got {share:.0%} once the late one came"


def _procs(tenants, n):
    return [SimpleNamespace(tenant=tenants[i % len(tenants)], arrival=i, is_decoding=True, num_computed=1,
                            turn_generated=1, pid=i) for i in range(n)]


@points(2)
def test_the_counter_grows_by_tokens_over_weight():
    policy = FairShare()
    tenant = SimpleNamespace(tid=1, weight=4.0, virtual_tokens=10.0)
    proc = SimpleNamespace(tenant=tenant, is_decoding=False, arrival=0)
    policy.charge(proc, 12)
    assert tenant.virtual_tokens == 13.0, "12 tokens to a tenant of weight 4 count 3"
    late = SimpleNamespace(tid=2, weight=1.0, virtual_tokens=0.0)
    policy.on_tenant_active(late, [tenant, late])
    assert late.virtual_tokens == 13.0, "a tenant becoming active starts at the smallest counter of the others"
    ahead = SimpleNamespace(tid=3, weight=1.0, virtual_tokens=50.0)
    policy.on_tenant_active(ahead, [tenant, ahead])
    assert ahead.virtual_tokens == 50.0, "the lift never lowers a counter"


@points(3)
def test_the_order_follows_the_counters_as_they_move():
    policy = FairShare()
    a = SimpleNamespace(tid=1, weight=1.0, virtual_tokens=0.0)
    b = SimpleNamespace(tid=2, weight=3.0, virtual_tokens=0.0)
    procs = _procs([a, b], 16)
    served = []
    for proc in policy.order(procs):                  # the scheduler charges each before asking again
        served.append(proc.tenant.tid)
        policy.charge(proc, 1)
        if len(served) == 8:
            break
    assert served.count(2) == 6 and served.count(1) == 2, f"weights 1:3 over 8 tokens, served {served}"
    picks = [p.arrival for p in procs if p.tenant is b]
    assert [p.arrival for p in policy.order([p for p in procs if p.tenant is b])] == picks, \
        "within a tenant, oldest first"


@points(2)
def test_outputs_do_not_depend_on_the_policy():
    work = jobs(rng("outputs"), 12)
    for policy in (FairShare(), FairTTFT()):
        k = kernel.boot(memory=frames(24), swap=frames(8), policy=policy, token_budget=32, max_running=6)
        sys = k.syscalls()
        tids = [sys.spawn_tenant(TINY, name=f"t{i}", weight=i + 1) for i in range(2)]
        pids = [sys.spawn(tids[i % 2], p, max_tokens=n, ignore_eos=True, temperature=0)
                for i, (p, n) in enumerate(work)]
        run_checked(k)
        for (prompt, n), pid in zip(work, pids):
            assert sys.wait(pid).tokens == reference(prompt, n), f"{type(policy).__name__} changed an output"
        all_memory_back(k)


@points(10)
def test_part_two_your_policy_against_fair_share(record_property):
    assert FairShare not in FairTTFT.__mro__, "part two is your own policy, not FairShare again"
    seed = SEED % 1000
    yours = policy_bench.run(FairTTFT(), seed)          # fsck after every step: a panic fails it
    fair = policy_bench.yardstick(seed)
    fraction = policy_bench.score(yours, fair)
    record_property("fraction", fraction)
    record_property("detail", f"p99 TTFT {yours.ttft_p99:.2f} s (FairShare {fair.ttft_p99:.2f} s), the chat "
                              f"tenant's mean {yours.chat_ttft_mean:.3f} s (FairShare {fair.chat_ttft_mean:.3f} s): "
                              f"{fraction:.0%}")
