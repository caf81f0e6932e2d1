"""Replicas on Ray behind the gateway (userspace/cluster): two tiny-llama kernels in Ray actors.

One cluster for the module (Ray and two kernels take seconds to start). The same greedy
outputs as one kernel, in process and over HTTP; every pid call reaches the replica the pid
names; ps, meminfo, schedstat, dmesg and /metrics merge both replicas; a replica killed with
ray.kill takes its processes with it (EIO) while the gateway goes on serving. The dead-replica
test runs last: it kills replica 1 of the shared cluster.
"""
import openai
import pytest

pytest.importorskip("ray")

import kernel  # noqa: E402
from kernel.errors import EINVAL, EIO, EPERM, ESRCH, KvosError  # noqa: E402
from userspace.cluster import pids as gpids  # noqa: E402
from userspace.cluster.cluster import Cluster  # noqa: E402
from userspace.cluster.gateway import GatewayThread  # noqa: E402
from userspace.daemon.client import Client  # noqa: E402
from userspace.daemon.config import DaemonConfig, TenantSpec  # noqa: E402
from userspace.shell.format import ps_table  # noqa: E402

ROOT, ALICE, BOB = "root-key-cluster", "alice-key-cluster", "bob-key-cluster"
TINY = "tiny-llama"
PROMPTS = [[1, 57, 120, 33, 250], [1, 9, 8, 7], [1, 400, 401, 402, 403, 404], [1, 22, 33], [1, 5, 6, 7, 8, 9, 10],
           [1, 77, 88]]
BOOT = dict(device="cpu", memory="8MiB", swap="4MiB", threads=1)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gateway(one_thread):
    cluster = Cluster(2, BOOT, router="round_robin")        # each replica gets every other process
    config = DaemonConfig(boot=BOOT, tenants=[TenantSpec("alice", TINY, ALICE), TenantSpec("bob", TINY, BOB)],
                          root_key=ROOT)
    try:
        srv = GatewayThread(config, cluster)
        yield srv
        report = srv.stop()
        assert report["fsck"] == "clean" and report["frames_mapped"] == 0 and report["swap_used"] == 0
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def local(one_thread):
    k = kernel.boot(**BOOT)
    root = k.syscalls()
    return root, root.spawn_tenant(TINY)


def tids(gateway):
    root = gateway.cluster.syscalls()
    return {t.name: t.tid for t in root.schedstat().tenants}


def test_same_greedy_outputs_as_one_kernel(gateway, local):
    lroot, ltid = local
    want = [lroot.wait(lroot.spawn(ltid, p, max_tokens=12, temperature=0)).tokens for p in PROMPTS]
    root = gateway.cluster.syscalls()
    tid = tids(gateway)["alice"]
    pids = [root.spawn(tid, p, max_tokens=12, temperature=0) for p in PROMPTS]
    assert {gpids.split(p, 2)[0] for p in pids} == {0, 1}          # both replicas served some
    assert [root.wait(p).tokens for p in pids] == want
    with Client(gateway.url, ALICE) as alice:                        # over HTTP, the syscall routes
        pids = [alice.spawn(tid, p, max_tokens=12, temperature=0) for p in PROMPTS]
        assert [alice.wait(p).tokens for p in pids] == want
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=ALICE, max_retries=0)
    try:                                                             # the OpenAI API, non-streamed and streamed
        for prompt, tokens in zip(PROMPTS[:4], want):
            out = client.completions.create(model="alice", prompt=prompt, max_tokens=12, temperature=0,
                                            extra_body={"return_token_ids": True})
            text = lroot.detokenize(ltid, tokens)
            assert out.choices[0].text == text
            stream = client.completions.create(model="alice", prompt=prompt, max_tokens=12, temperature=0,
                                               stream=True)
            assert "".join(c.choices[0].text for c in stream if c.choices) == text
    finally:
        client.close()


def test_the_responses_api_continues_on_the_owning_replica(gateway):
    """A stored response's process lives on one replica; previous_response_id forks it there."""
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=ALICE, max_retries=0)
    try:
        kw = dict(model="alice", temperature=0, max_output_tokens=6)
        first = client.responses.create(input="Hello", **kw)
        second = client.responses.create(input="And then?", previous_response_id=first.id, **kw)
        assert second.previous_response_id == first.id and second.usage.input_tokens_details.cached_tokens > 0
        assert client.responses.retrieve(second.id).output_text == second.output_text
        for r in (first, second):
            client.responses.delete(r.id)
    finally:
        client.close()
    root = gateway.cluster.syscalls()
    assert not [p for p in root.ps() if p.tenant == "alice"]


def test_calls_reach_the_owning_replica(gateway):
    root = gateway.cluster.syscalls()
    tid = tids(gateway)["alice"]
    pids = [root.spawn(tid, p, max_tokens=40, temperature=0, interactive=True) for p in PROMPTS[:4]]
    rows = {p.pid: p for p in root.ps()}
    for pid in pids:
        replica = gpids.split(pid, 2)[0]
        assert rows[pid].replica == replica
        assert root.read(pid, timeout=30).pid == pid
        assert root.pagemap(pid).num_tokens >= 3
        children = root.fork(pid, 2)
        assert [gpids.split(c, 2)[0] for c in children] == [replica, replica]
        assert root.nice(children[0], 1) == 1
        for child in children:
            root.kill(child)
            assert root.wait(child).reason == "killed"
    for pid in pids:
        root.kill(pid)
        assert root.wait(pid).pid == pid
    with pytest.raises(KvosError) as err:
        root.wait(pids[0])                                            # reaped
    assert err.value.errno == ESRCH
    with pytest.raises(KvosError) as err:
        root.read(7 * gpids.STRIDE + 1)                               # no replica 7
    assert err.value.errno == ESRCH
    with pytest.raises(KvosError) as err:
        root.read("12")
    assert err.value.errno == EINVAL
    bob = gateway.cluster.syscalls(as_tenant=tids(gateway)["bob"])
    pid = root.spawn(tid, PROMPTS[0], max_tokens=4)
    with pytest.raises(KvosError) as err:
        bob.kill(pid)                                                 # the replica checks who asks
    assert err.value.errno == EPERM
    root.wait(pid)
    assert root.fsck().processes == 0


def test_ps_meminfo_schedstat_dmesg_metrics_merge_the_replicas(gateway):
    root = gateway.cluster.syscalls()
    tid = tids(gateway)["bob"]
    pids = [root.spawn(tid, p, max_tokens=30, interactive=True) for p in PROMPTS[:4]]
    for pid in pids:
        root.read(pid, timeout=30)
    rows = root.ps()
    assert {r.replica for r in rows} == {0, 1} and {r.pid for r in rows} == set(pids)
    assert "replica" in [c.header for c in ps_table(rows).columns]              # kvos ps shows it
    mem = root.meminfo()
    assert sorted(mem.replicas) == [0, 1]
    assert mem.total == sum(m.total for m in mem.replicas.values())
    assert mem.mapped == sum(m.mapped for m in mem.replicas.values()) > 0
    assert mem.cgroups["bob"].charged == sum(m.cgroups["bob"].charged for m in mem.replicas.values())
    sched = root.schedstat()
    assert sched.steps == sum(s.steps for s in sched.replicas.values())
    assert {t.name for t in sched.tenants} == {"alice", "bob"}
    log = root.dmesg()
    assert [e.seq for e in log] == list(range(1, len(log) + 1))
    assert {e.replica for e in log} == {0, 1}
    assert {e.pid for e in log if e.event == "spawn" and e.tid == tid} >= set(pids)
    more = root.dmesg(since=log[-1].seq)
    assert all(e.seq > log[-1].seq for e in more)
    with Client(gateway.url, ROOT) as client:                         # the same over HTTP
        assert {r.replica for r in client.ps()} == {0, 1}
        assert sorted(client.meminfo().replicas) == [0, 1]
    import urllib.request
    req = urllib.request.Request(gateway.url + "/metrics", headers={"Authorization": f"Bearer {ROOT}"})
    scrape = urllib.request.urlopen(req, timeout=30).read().decode()
    assert 'kvos_frames{replica="0",state="total"}' in scrape and 'kvos_frames{replica="1",state="total"}' in scrape
    for pid in pids:
        root.kill(pid)
        root.wait(pid)


def test_every_syscall_has_a_route():
    from kernel.syscalls import SYSCALLS
    from userspace.cluster.handle import ANY, BY_PID, ClusterHandle
    assert all(n in BY_PID or n in ANY or hasattr(ClusterHandle, f"_{n}") for n in SYSCALLS)


def test_a_tenant_has_one_salt_on_every_replica_and_no_other_tenants(gateway):
    cluster = gateway.cluster
    names = tids(gateway)
    spaces = {(name, r): cluster.call(r, None, "tenantinfo", {"tid": tid}).page_namespace
              for name, tid in names.items() for r in (0, 1)}
    assert spaces[("alice", 0)] == spaces[("alice", 1)] and spaces[("bob", 0)] == spaces[("bob", 1)]
    assert spaces[("alice", 0)] != spaces[("bob", 0)]


def in_replica_calls() -> int:
    """Threads of this process inside a call to a replica (Cluster.collect: waiting on Ray)."""
    import sys
    count = 0
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name == "collect" and frame.f_code.co_filename.endswith("cluster.py"):
                count += 1
                break
            frame = frame.f_back
    return count


def test_waiters_over_http_hold_no_gateway_thread(gateway):
    """16 clients wait at once on processes of paused kernels: the gateway awaits each (a watch on
    the replica, a Ray future), so no thread of the gateway sits in a call to a replica for them."""
    import threading
    import time
    root = gateway.cluster.syscalls()
    tid = tids(gateway)["alice"]
    root.loopctl("pause")                                             # every replica's loop
    try:
        pids = [root.spawn(tid, p, max_tokens=3) for p in PROMPTS * 3][:16]
        statuses = {}

        def wait(pid):
            with Client(gateway.url, ALICE, timeout=120) as client:
                statuses[pid] = client.wait(pid)
        clients = [threading.Thread(target=wait, args=(pid,)) for pid in pids]
        for t in clients:
            t.start()
        time.sleep(2.0)
        busy = max(in_replica_calls() for _ in range(20))
        assert not statuses
    finally:
        root.loopctl("resume")
    for t in clients:
        t.join(60)
    assert sorted(statuses) == sorted(pids) and {s.reason for s in statuses.values()} == {"length"}
    assert busy <= 1, f"{busy} gateway threads wait on replicas for 16 waiting clients"   # 1: the load reader


def test_a_dead_replica_takes_its_processes_and_the_gateway_goes_on(gateway):
    """Last in the module: replica 1 of the shared cluster dies here."""
    import time

    import ray
    cluster = gateway.cluster
    root = cluster.syscalls()
    tid = tids(gateway)["alice"]
    pids = [root.spawn(tid, p, max_tokens=200, interactive=True) for p in PROMPTS[:4]]
    on_one = [p for p in pids if gpids.split(p, 2)[0] == 1]
    on_zero = [p for p in pids if gpids.split(p, 2)[0] == 0]
    assert on_one and on_zero
    ray.kill(cluster.actors[1])          # asynchronous: the actor may still answer a read or two
    for pid in on_one:
        deadline = time.monotonic() + 60
        while not root.read(pid, timeout=5).turn_done:
            assert time.monotonic() < deadline, f"pid {pid} still runs on a killed replica"
        status = root.wait(pid)
        assert status.reason == "error" and status.error.startswith("EIO: replica 1 died")
        with pytest.raises(KvosError) as err:
            root.wait(pid)
        assert err.value.errno == ESRCH
    assert cluster.dead.keys() == {1}
    with pytest.raises(KvosError) as err:
        root.fork(on_zero[0] + gpids.STRIDE)                          # on the dead replica, never there
    assert err.value.errno in (ESRCH, EIO)
    new = [root.spawn(tid, p, max_tokens=4) for p in PROMPTS]         # all go to replica 0 now
    assert {gpids.split(p, 2)[0] for p in new} == {0}
    assert all(root.wait(p).reason == "length" for p in new)
    for pid in on_zero:
        root.kill(pid)
        root.wait(pid)
    assert {r.replica for r in root.ps()} <= {0}
    assert "replica 1" in root.loopctl().error
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=ALICE, max_retries=0)
    try:
        out = client.completions.create(model="alice", prompt=PROMPTS[0], max_tokens=5, temperature=0)
        assert out.choices[0].finish_reason == "length"
    finally:
        client.close()
    with Client(gateway.url, ROOT) as client:
        assert client.request("GET", "/healthz")["status"] == "ok"
