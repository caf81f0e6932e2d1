"""Tenant isolation through kvosd: one tenant's requests cannot stall, starve or out-count another.

Each scenario is an attack one ordinary tenant key can make (alice), run while another tenant
(bob, max_procs 16) streams a long completion; bob's longest pause between two chunks must stay
under a second (an ordinary step of the tiny model is a few milliseconds), and nothing may leak
(the server's stop() runs fsck and counts frames). tiny-llama, 64 MiB of KV, one kernel thread.
"""
import asyncio
import http.client
import json
import threading
import time

import pytest

from kernel.errors import KvosError
from userspace.daemon.client import Client
from userspace.daemon.config import DaemonConfig, TenantSpec
from userspace.daemon.listen import ServerThread

ROOT, ALICE, BOB = "root-key-for-isolation", "alice-key-for-isolation", "bob-key-for-isolation"
PAUSE_LIMIT = 1.0            # seconds: far above a step, far below what the attacks used to cause


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


def start(**boot):
    tenants = [TenantSpec("alice", "tiny-llama", ALICE), TenantSpec("bob", "tiny-llama", BOB, {"max_procs": 16})]
    return ServerThread(DaemonConfig(boot=dict(device="cpu", memory="64MiB", swap="16MiB", threads=1, **boot),
                                     tenants=tenants, root_key=ROOT))


@pytest.fixture(scope="module")
def server(one_thread):
    srv = start()
    yield srv
    report = srv.stop()
    assert report["fsck"] == "clean" and report["frames_mapped"] == 0 and report["swap_used"] == 0


def request(server, method, path, body=None, key=ALICE, raw=None, timeout=60):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Authorization": f"Bearer {key}",
                                                  "Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(payload) if payload else None
    except ValueError:
        return resp.status, payload


async def post(server, path, body, key) -> int:
    """One POST on its own connection, asyncio: -> the HTTP status (many at once, no thread each)."""
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
                 .encode() + data)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    await reader.read()
    writer.close()
    return status


class Victim:
    """bob streams a long completion in a thread; `gaps` are the seconds between its chunks."""

    def __init__(self, server, max_tokens=600):
        self.server, self.max_tokens = server, max_tokens
        self.times, self.error = [], None
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.started_at = time.monotonic()
        self.thread.start()
        assert self.first.wait(30), self.error

    def _run(self):
        host, port = self.server.url.removeprefix("http://").split(":")
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=120)
            body = {"model": "bob", "prompt": "kvos is an operating system", "max_tokens": self.max_tokens,
                    "temperature": 0, "stream": True, "ignore_eos": True}
            conn.request("POST", "/v1/completions", body=json.dumps(body),
                         headers={"Authorization": f"Bearer {BOB}", "Content-Type": "application/json"})
            resp = conn.getresponse()
            for line in resp:
                if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                    self.times.append(time.monotonic())
                    self.first.set()
            conn.close()
        except Exception as exc:      # noqa: BLE001 -- reported by finish()
            self.error = exc
            self.first.set()

    def finish(self) -> float:
        """Wait for the stream to end; -> its longest pause between chunks (after the first)."""
        self.thread.join(180)
        assert self.error is None and not self.thread.is_alive()
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return max(gaps, default=0.0)


def alice_tid(server):
    return Client(server.url, ALICE).tid


# -- 1. a large prompt freezes no one -------------------------------------------------------------------------
def test_a_huge_prompt_is_refused_without_stalling_others(server):
    victim = Victim(server)
    huge = "kvos " * 2_000_000                                  # 10 MB of text
    empty_chat = [{"role": "user", "content": ""}] * 20_000     # tiny bytes, a 20,000-message template
    results = []

    def attack(path, body):
        started = time.monotonic()
        status, _ = request(server, "POST", path, body)
        results.append((path, status, time.monotonic() - started))
    attacks = [threading.Thread(target=attack, args=args) for args in [
        ("/v1/completions", {"model": "alice", "prompt": huge, "max_tokens": 4}),
        ("/sys/spawn", {"tid": alice_tid(server), "prompt": huge, "max_tokens": 4}),
        ("/v1/chat/completions", {"model": "alice", "messages": empty_chat, "max_tokens": 4}),
        ("/v1/completions", {"model": "alice", "prompt": huge, "max_tokens": 4}),
    ]]
    for t in attacks:
        t.start()
    for t in attacks:
        t.join(120)
    pause = victim.finish()
    assert all(status in (413, 400) for _, status, _ in results), results
    assert pause < PAUSE_LIMIT, f"bob's stream paused {pause:.2f} s"


# -- 2. stop strings are bounded ------------------------------------------------------------------------------
def test_stop_strings_are_capped_and_cost_others_nothing(server):
    status, body = request(server, "POST", "/v1/completions",
                           {"model": "alice", "prompt": "x", "max_tokens": 4, "stop": [f"s{i}" for i in range(10_000)]})
    assert status == 400 and "at most 32 stop strings" in body["error"]["message"]
    victim = Victim(server)
    stops = [("\u00e9" * 127) + chr(0x100 + i) for i in range(32)]            # 32 stop strings of 256 bytes
    status, _ = request(server, "POST", "/v1/completions",
                        {"model": "alice", "prompt": "kvos", "max_tokens": 300, "n": 64, "stop": stops,
                         "temperature": 1.0, "ignore_eos": True})
    pause = victim.finish()
    assert status == 200
    assert pause < PAUSE_LIMIT, f"bob's stream paused {pause:.2f} s"


# -- 3. waiting costs nothing -------------------------------------------------------------------------------------
def test_hundreds_of_waits_hold_no_thread_and_wake_no_one(server):
    alice = Client(server.url, ALICE)
    pid = alice.spawn(alice.tid, "kvos", max_tokens=2000, ignore_eos=True, temperature=0)

    async def waits(n):
        return await asyncio.gather(*[post(server, "/sys/wait", {"pid": pid}, ALICE) for _ in range(n)])
    answers = {}
    runner = threading.Thread(target=lambda: answers.update(r=asyncio.run(waits(520))), daemon=True)
    runner.start()
    time.sleep(1.0)                                          # the 520 waits are parked by now
    assert pid in {p.pid for p in alice.ps() if p.state != "zombie"}, "it ended before the victim came"
    started = time.monotonic()
    victim = Victim(server, max_tokens=300)
    ttft = victim.times[0] - started
    pause = victim.finish()
    try:
        alice.kill(pid)
    except KvosError:
        pass                                                 # it ran to its end, and a wait reaped it
    runner.join(120)
    codes = sorted(answers["r"])
    assert codes.count(200) == 1 and codes.count(404) == 519, codes[:3] + codes[-3:]     # one wait reaps
    assert ttft < PAUSE_LIMIT and pause < PAUSE_LIMIT, (ttft, pause)


# -- 4. zombies count, and one wait reaps ---------------------------------------------------------------------
def test_zombies_count_toward_max_procs(server):
    bob = Client(server.url, BOB)
    pids = [bob.spawn(bob.tid, "x", max_tokens=1, temperature=0) for _ in range(16)]
    deadline = time.monotonic() + 30
    while any(p.state != "zombie" for p in bob.ps()) and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(KvosError, match="^EAGAIN: .*zombies included"):
        bob.spawn(bob.tid, "x", max_tokens=1)
    bob.wait(pids[0])
    pids[0] = bob.spawn(bob.tid, "x", max_tokens=1)           # one reaped, one more fits
    for pid in pids:
        bob.wait(pid)


def test_a_wait_left_by_its_client_keeps_the_exit_status(server):
    alice = Client(server.url, ALICE)
    pid = alice.spawn(alice.tid, "kvos", max_tokens=1500, ignore_eos=True, temperature=0)   # seconds of work
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/sys/wait", body=json.dumps({"pid": pid}),
                 headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"})
    time.sleep(0.3)
    conn.sock.close()                                      # the client goes away mid-wait
    conn.close()
    deadline = time.monotonic() + 60
    while {p.pid: p.state for p in alice.ps()}.get(pid) != "zombie":
        assert pid in {p.pid for p in alice.ps()}, "the abandoned wait reaped the process"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)                                        # longer than the daemon takes to notice
    assert pid in {p.pid for p in alice.ps()}, "the abandoned wait reaped the process"
    status = alice.wait(pid)                               # still there to be reaped, once
    assert status.reason == "length" and len(status.tokens) == 1500


# -- 5. shared segments stay within a share -------------------------------------------------------------------
def test_shm_cannot_pin_more_than_the_tenants_share(server):
    alice, bob, root = Client(server.url, ALICE), Client(server.url, BOB), Client(server.url, ROOT)
    segments = []
    with pytest.raises(KvosError, match="^ENOMEM: segment of .* guaranteed"):
        for i in range(1000):
            segments.append(alice.shmget(alice.tid, [3 + i % 500] + [3 + j % 500 for j in range(1995)]))
    info = root.meminfo()
    cg = info.cgroups["alice"]
    assert cg.pinned <= cg.share <= info.total // 2 + 1
    status = bob.wait(bob.spawn(bob.tid, "kvos", max_tokens=64, ignore_eos=True, temperature=0))
    assert status.reason == "length" and len(status.tokens) == 64
    for shmid in segments:
        alice.shmrm(shmid)


# -- 6. running slots are shared --------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["fcfs", "fair"])
def test_a_tenant_filling_the_running_slots_cannot_lock_another_out(one_thread, policy):
    srv = start(max_running=8, policy=policy)
    try:
        alice, bob = Client(srv.url, ALICE), Client(srv.url, BOB)
        hogs = [alice.spawn(alice.tid, "kvos", max_tokens=2000, ignore_eos=True, temperature=0) for _ in range(40)]
        deadline = time.monotonic() + 30
        while sum(p.state == "running" for p in alice.ps()) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        pid = bob.spawn(bob.tid, "kvos", max_tokens=4, temperature=0)
        first = bob.read(pid, timeout=30)
        ttft = time.monotonic() - started
        assert first.tokens and ttft < PAUSE_LIMIT, ttft
        bob.wait(pid)
        for hog in hogs:
            alice.kill(hog)
            alice.wait(hog)
    finally:
        report = srv.stop()
    assert report["fsck"] == "clean" and report["frames_mapped"] == 0


# -- 7. a tenant sees only itself ---------------------------------------------------------------------------------
def test_a_tenant_sees_only_itself(server):
    alice, bob = Client(server.url, ALICE), Client(server.url, BOB)
    pids = [alice.wait(alice.spawn(alice.tid, "x", max_tokens=2)).pid for _ in range(3)]
    stat = bob.schedstat()
    assert stat.steps == 0 and stat.recent_steps == [] and [t.name for t in stat.tenants] == ["bob"]
    assert set(bob.meminfo().cgroups) == {"bob"}
    assert all(e.tid == bob.tid for e in bob.dmesg())
    assert not any(p.tenant == "alice" for p in bob.ps())
    assert sorted(pids) != list(range(min(pids), min(pids) + 3))       # pid numbers say nothing of others
