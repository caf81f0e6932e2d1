"""The prefix-aware policies on real replicas (slow: a cluster of two tiny-llama kernels each).

cache_aware sends a prompt that extends one routed before to the replica it went to (the
router's own index); prefix_events does so from the replicas' page-cache events (cacheevents),
matched by the page names the tenant's one salt gives on every replica.
"""
import time

import pytest

pytest.importorskip("ray")

from userspace.cluster import pids as gpids  # noqa: E402
from userspace.cluster.cluster import Cluster  # noqa: E402

BOOT = dict(device="cpu", memory="8MiB", swap="4MiB", threads=1)
SYSTEM = list(range(2, 50))                 # three full pages of 16 tokens: the shared prefix
QUESTIONS = [[300 + i, 301 + i, 302 + i] for i in range(6)]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("policy", ["cache_aware", "prefix_events"])
def test_a_shared_prefix_goes_where_it_is_held(policy):
    cluster = Cluster(2, BOOT, router=policy)
    try:
        root = cluster.syscalls()
        tid = root.spawn_tenant("tiny-llama")
        other = [root.spawn(tid, [1, 400 + i, 401, 402, 403] * 10, max_tokens=1) for i in range(2)]
        first = root.spawn(tid, [1] + SYSTEM + QUESTIONS[0], max_tokens=2)
        home = gpids.split(first, 2)[0]
        for pid in [first, *other]:
            root.wait(pid)
        if policy == "prefix_events":        # the reader picks up the replica's events (every 0.25 s)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any(e.kind == "publish" for e in root.cacheevents()):
                time.sleep(0.1)
            time.sleep(1.0)
            events = root.cacheevents()
            assert {e.replica for e in events if e.kind == "publish"} >= {home}
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
        for q in QUESTIONS[1:]:
            pid = root.spawn(tid, [1] + SYSTEM + q, max_tokens=2)
            assert gpids.split(pid, 2)[0] == home, cluster.router.last
            assert root.wait(pid).prompt_tokens == 1 + len(SYSTEM) + 3
        assert cluster.router.last.reason == "prefix"
        assert root.schedstat().cached_tokens >= 3 * 16 * (len(QUESTIONS) - 1)
        assert root.fsck().processes == 0
        cluster.shutdown()
    finally:
        cluster.close()
