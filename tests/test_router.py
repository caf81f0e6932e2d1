"""The router (userspace/cluster/router.py): each policy's rule, load accounting, dead replicas,
the prefix indexes' eviction and event replay, and prefix_events' names against a real kernel's."""
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernel
from kernel.errors import KvosError
from userspace.cluster import Router
from userspace.cluster.prefixindex import ApproxIndex, ResidentIndex, block_keys
from userspace.cluster.router import kernel_namer


@dataclass
class Ev:
    seq: int
    kind: str
    page: str


def refused(errno, call, *args, **kwargs):
    with pytest.raises(KvosError) as err:
        call(*args, **kwargs)
    assert err.value.errno == errno, err.value


def prompt(system: int, user: int, n=64, block=16):
    return [1000 + system] * (n - block) + [user] * block


def test_round_robin_skips_the_dead():
    r = Router(3, "round_robin")
    assert [r.route(1, [5]) for _ in range(4)] == [0, 1, 2, 0]
    r.mark_dead(1)
    assert [r.route(1, [5]) for _ in range(4)] == [2, 0, 2, 0]
    r.mark_dead(0)
    r.mark_dead(2)
    refused("EIO", r.route, 1, [5])


def test_least_load_counts_dispatches_and_reports():
    r = Router(3, "least_load")
    for replica in (0, 0, 1):
        r.on_dispatch(replica)
    assert r.route(1, [5]) == 2
    r.update_load(2, running=4, waiting=1)              # a report above what this router sent
    assert r.route(1, [5]) == 1
    r.on_finish(0)
    r.on_finish(0)
    assert r.load(0) == 0 and r.route(1, [5]) == 0
    refused("EINVAL", r.on_finish, 0)                   # nothing in flight there


def test_cache_aware_follows_the_prefix_unless_imbalanced():
    r = Router(4, "cache_aware", balance_abs=4, balance_rel=1.5)
    first = r.route(1, prompt(7, 1))
    assert r.last.reason == "room"
    assert r.route(1, prompt(7, 2)) == first and r.last.reason == "prefix" and r.last.matched_tokens == 48
    assert r.route(2, prompt(7, 2)) != first            # another tenant: nothing matches
    other = r.route(1, prompt(8, 1))
    assert other != first and r.last.reason == "room"   # a new prefix goes where the index is smallest
    for _ in range(10):
        r.on_dispatch(first)
    d = r.route(1, prompt(7, 3))
    assert d != first and r.last.reason == "imbalance"


def test_the_imbalance_margin_scales_with_the_running_batch_or_is_sglangs_absolute_one():
    def loaded(**options):
        r = Router(2, "cache_aware", **options)
        home = r.route(1, prompt(7, 1))
        r.update_load(home, running=40, waiting=0)          # a replica that runs 40 at once
        r.update_load(1 - home, running=20, waiting=0)
        for _ in range(11):
            r.on_dispatch(home)
        r.update_load(home, running=40, waiting=12)          # 52 against 20: 32 apart, 2.6x
        return r, home
    r, home = loaded()                                       # default: batch, 0.25 x 40 = 10 < 32
    assert r.route(1, prompt(7, 2)) != home and r.last.reason == "imbalance"
    r, home = loaded(balance="absolute")                     # SGLang: 32 is not beyond 64
    assert r.route(1, prompt(7, 2)) == home and r.last.reason == "prefix"
    r, home = loaded(balance_frac=1.0)                       # a margin of the whole batch (40)
    assert r.route(1, prompt(7, 2)) == home
    r = Router(2, "cache_aware", balance_abs=3)              # nothing reported yet: balance_abs stands
    assert r.policy.abs_threshold(r) == 3
    r.update_load(0, running=8, waiting=100)
    assert r.policy.abs_threshold(r) == 2.0 and r.peak_running == [8, 0]
    r.mark_dead(0)
    assert r.policy.abs_threshold(r) == 3                    # the dead replica's batch no longer counts
    r = Router(2, "cache_aware", balance_batch=100)          # what a replica can hold: a floor under the peak
    assert r.policy.abs_threshold(r) == 25.0
    r.update_load(1, running=400, waiting=0)
    assert r.policy.abs_threshold(r) == 100.0
    refused("EINVAL", Router, 2, "cache_aware", balance_batch=0)
    refused("EINVAL", Router, 2, "cache_aware", balance="relative")
    refused("EINVAL", Router, 2, "prefix_events", namer=lambda t, ids: ([], 16), balance_frac=-1)


def test_cache_aware_low_match_does_not_follow():
    r = Router(2, "cache_aware", cache_threshold=0.9)
    a = r.route(1, prompt(7, 1))
    r.route(1, prompt(8, 1))
    r.route(1, prompt(7, 2))
    assert r.last.reason == "room" and r.last.matched_tokens in (0, 48)   # 48/64 = 0.75 < 0.9: not followed
    assert a in (0, 1)


def test_prefix_events_uses_what_replicas_hold():
    namer = lambda tid, ids: ([f"{tid}:{tuple(ids[:i + 16])}" for i in range(0, len(ids) - 15, 16)], 16)   # noqa: E731
    r = Router(3, "prefix_events", namer=namer)
    ids = prompt(7, 1)
    names, _ = namer(1, ids)
    r.apply_events(2, [Ev(1, "publish", names[0]), Ev(2, "publish", names[1]), Ev(3, "publish", names[2])])
    assert r.route(1, ids) == 2 and r.last.matched_tokens == 48 and r.last.reason == "prefix"
    r.apply_events(2, [Ev(4, "evict", names[0])])
    r.route(1, ids)
    assert r.last.reason == "room" and r.last.matched_tokens == 0       # the chain is broken at page 0
    r.apply_events(1, [Ev(1, "publish", names[0])])
    r.apply_events(1, [Ev(5, "publish", names[1])])                      # a gap: replica 1 forgets
    assert r.policy.resident[1].names == {names[1]} and r.policy.resident[1].gaps == 1
    r.mark_dead(2)
    assert len(r.policy.resident[2]) == 0 and all(r.route(1, ids) != 2 for _ in range(5))


def test_prefix_events_names_are_a_kernels():
    k = kernel.boot(device="cpu", frames=16, threads=1)
    root = k.syscalls()
    tid = root.spawn_tenant("tiny-llama", cache_salt="t")
    info = root.tenantinfo(tid)
    ids = list(range(3, 3 + 3 * info.page_size + 5))
    root.wait(root.spawn(tid, ids, max_tokens=1, temperature=0))
    r = Router(2, "prefix_events", namer=kernel_namer({tid: info.page_namespace}, {tid: info.page_size}))
    r.apply_events(1, root.cacheevents())
    assert r.route(tid, ids) == 1 and r.last.matched_tokens == 3 * info.page_size
    k.shutdown(kill=True)


def test_refusals():
    refused("EINVAL", Router, 0)
    refused("EINVAL", Router, 2, "random")
    refused("EINVAL", Router, 2, "round_robin", block=4)
    refused("EINVAL", Router, 2, "cache_aware", block=0)
    refused("EINVAL", Router, 2, "cache_aware", cache_threshold=2)
    refused("EINVAL", Router, 2, "cache_aware", nonsense=1)
    refused("EINVAL", Router, 2, "prefix_events")
    r = Router(2, "least_load")
    refused("EINVAL", r.route, 1, "text")
    refused("EINVAL", r.on_dispatch, 2)
    refused("EINVAL", r.update_load, 0, -1, 0)
    refused("EINVAL", r.mark_dead, True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=40), min_size=1, max_size=30),
       st.integers(1, 12))
def test_approx_index_is_a_bounded_lru_of_prefixes(prompts, capacity):
    index, model = ApproxIndex(capacity), []
    for ids in prompts:
        keys = block_keys(1, ids, 4)
        for key in keys:                      # the model: a plain list in LRU order
            if key in model:
                model.remove(key)
            model.append(key)
        model = model[-capacity:] if len(model) > capacity else model
        index.insert(keys)
        assert list(index.keys) == model and len(index) <= capacity
        held = next((i for i, key in enumerate(keys) if key not in model), len(keys))
        assert index.match(keys) == held


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["publish", "evict"]), st.integers(0, 6)), max_size=40),
       st.integers(1, 5))
def test_resident_index_replays_the_feed(ops, chunk):
    events = [Ev(i + 1, kind, f"p{page}") for i, (kind, page) in enumerate(ops)]
    index, model = ResidentIndex(), set()
    for e in events:
        (model.add if e.kind == "publish" else model.discard)(e.page)
    for start in range(0, len(events), chunk):       # delivered in pieces, one repeated
        index.apply(events[start:start + chunk])
        index.apply(events[start:start + chunk])
    assert index.names == model and index.gaps == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3), st.booleans()), min_size=1, max_size=60),
       st.sampled_from(["round_robin", "least_load", "cache_aware"]))
def test_every_policy_routes_to_a_live_replica_and_loads_balance(calls, policy):
    r = Router(4, policy)
    r.mark_dead(3)
    inflight = [0] * 4
    for system, user, finish in calls:
        choice = r.route(1, prompt(system, user, n=32))
        assert choice in (0, 1, 2)
        r.on_dispatch(choice)
        inflight[choice] += 1
        if finish and inflight[choice]:
            r.on_finish(choice)
            inflight[choice] -= 1
        assert r.inflight == inflight
    if policy in ("round_robin", "least_load") and not any(f for _, _, f in calls):
        assert max(inflight[:3]) - min(inflight[:3]) <= 1
