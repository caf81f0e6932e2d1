"""Every syscall, the same tests twice: through an in-process handle and through kvosd over HTTP.

The kernel runs its loop thread in both (boot(loop=True); kvosd always does), tiny-llama, two
tenants (alice, bob). Handles are wrapped to record which syscalls the tests call; the last test
checks that every syscall of the table was called, through both doors.
"""

import pytest

import kernel
from kernel.errors import KvosError
from kernel.pagename import chain_names
from kernel.results import (
    CacheEvent,
    ExitStatus,
    FsckReport,
    LoopStatus,
    MemInfo,
    PageMap,
    ProcInfo,
    ReadResult,
    SchedStat,
    StepRecord,
    SystemInfo,
    TenantInfo,
    WorkRecord,
)
from kernel.syscalls import SYSCALLS
from userspace.daemon.client import Client
from userspace.daemon.config import DaemonConfig, TenantSpec
from userspace.daemon.listen import ServerThread

ROOT, ALICE, BOB = "root-key-syscalls", "alice-key-syscalls", "bob-key-syscalls"
BOOT = dict(device="cpu", memory="8MiB", swap="4MiB", threads=1)
CALLED = {"local": set(), "kvosd": set()}


class Recorder:
    """A handle that notes the name of every syscall made through it."""

    def __init__(self, handle, seen: set):
        self._handle, self._seen = handle, seen

    def __getattr__(self, name):
        if name in SYSCALLS:
            self._seen.add(name)
        return getattr(self._handle, name)


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


@pytest.fixture(scope="module", params=["local", "kvosd"])
def door(request, one_thread):
    """(kind, root, alice, bob): handles of one kernel, in process or over HTTP."""
    seen = CALLED[request.param]
    if request.param == "local":
        k = kernel.boot(**BOOT, loop=True)
        root = k.syscalls()
        tids = [root.spawn_tenant("tiny-llama", name=name) for name in ("alice", "bob")]
        yield (request.param, Recorder(root, seen), *[Recorder(k.syscalls(as_tenant=t), seen) for t in tids])
        k.shutdown(kill=True)
        return
    srv = ServerThread(DaemonConfig(boot=BOOT, root_key=ROOT, tenants=[
        TenantSpec("alice", "tiny-llama", ALICE), TenantSpec("bob", "tiny-llama", BOB)]))
    clients = [Client(srv.url, key) for key in (ROOT, ALICE, BOB)]
    yield (request.param, *[Recorder(c, seen) for c in clients])
    for c in clients:
        c.close()
    report = srv.stop(kill=True)
    assert report["fsck"] == "clean" and report["frames_mapped"] == 0


def refused(errno, call, *args, **kwargs):
    with pytest.raises(KvosError) as err:
        call(*args, **kwargs)
    assert err.value.errno == errno, err.value
    return err.value


# -- tenants and their programs ----------------------------------------------------------------------------
def test_spawn_tenant_tenantinfo_kill_tenant(door):
    _, root, alice, _ = door
    tid = root.spawn_tenant("tiny-llama", name="carol", max_procs=4, weight=2)
    info = root.tenantinfo(tid)
    assert isinstance(info, TenantInfo) and (info.name, info.max_procs, info.weight) == ("carol", 4, 2.0)
    assert info.vocab_size == 512 and info.eos_token_ids == [2] and info.has_chat_template
    assert alice.tenantinfo(alice.tid).name == "alice"
    refused("EPERM", alice.tenantinfo, tid)                       # another tenant's facts
    refused("EPERM", alice.spawn_tenant, "tiny-llama")            # root only
    refused("EINVAL", root.spawn_tenant, "tiny-llama", name="root")
    root.kill_tenant(tid)
    refused("ESRCH", root.tenantinfo, tid)
    salted = root.spawn_tenant("tiny-llama", name="dave", cache_salt="dave-salt")
    assert len(root.tenantinfo(salted).page_namespace) == 32
    refused("EINVAL", root.spawn_tenant, "tiny-llama", name="erin", cache_salt="dave-salt")    # dave's
    refused("EINVAL", root.spawn_tenant, "tiny-llama", cache_salt="")
    refused("EINVAL", root.spawn_tenant, "tiny-llama", cache_salt=7)
    refused("EINVAL", root.spawn_tenant, "tiny-llama", cache_salt="s", prefix_sharing="global")
    root.kill_tenant(salted)


def test_tokenize_and_detokenize(door):
    _, root, alice, _ = door
    ids = alice.tokenize(alice.tid, "Hello, world!")
    assert ids and all(isinstance(i, int) for i in ids)
    assert alice.detokenize(alice.tid, ids) == "Hello, world!"
    chat = [{"role": "user", "content": "Hi"}]
    with_prompt, without = alice.tokenize(alice.tid, chat), alice.tokenize(alice.tid, chat, add_generation_prompt=False)
    assert with_prompt[:len(without)] == without and len(with_prompt) > len(without)
    assert alice.tokenize(alice.tid, "") == [] and alice.detokenize(alice.tid, []) == ""
    # continue_final_message: the chat's text ends with its last message's content, left open for the model.
    for content in ("Sure, here", "", "Hi"):       # empty, and equal to an earlier message's content
        begun = chat + [{"role": "assistant", "content": content}]
        left_open = alice.tokenize(alice.tid, begun, add_generation_prompt=False, continue_final_message=True)
        closed = alice.tokenize(alice.tid, begun, add_generation_prompt=False)
        text, whole = alice.detokenize(alice.tid, left_open), alice.detokenize(alice.tid, closed)
        assert whole.startswith(text) and len(text) < len(whole) and text.endswith(content)
        assert text.count("Hi") == 1 + (content == "Hi")
    refused("EINVAL", alice.tokenize, alice.tid, chat, continue_final_message=True)      # and a generation prompt
    refused("EINVAL", alice.tokenize, alice.tid, "text", add_generation_prompt=False, continue_final_message=True)
    refused("EINVAL", alice.tokenize, alice.tid, chat, add_generation_prompt=False, continue_final_message=1)
    refused("EINVAL", alice.detokenize, alice.tid, [10_000])
    refused("EPERM", alice.tokenize, alice.tid + 1, "x")          # bob's
    assert root.tokenize(alice.tid, "Hello, world!") == ids


# -- processes -----------------------------------------------------------------------------------------------
def test_spawn_read_wait(door):
    _, _, alice, _ = door
    pid = alice.spawn(alice.tid, "kvos is", max_tokens=24, temperature=0, ignore_eos=True)
    reads = []
    while not reads or not reads[-1].turn_done:
        reads.append(alice.read(pid, timeout=10.0))
    assert all(isinstance(r, ReadResult) for r in reads)
    status = alice.wait(pid)
    assert isinstance(status, ExitStatus) and status.reason == "length" and len(status.tokens) == 24
    assert sum((r.tokens for r in reads), []) == status.tokens
    assert "".join(r.text for r in reads) == status.text == alice.detokenize(alice.tid, status.tokens)
    refused("ESRCH", alice.wait, pid)                             # reaped once


def test_spawn_n_fork_kill_nice(door):
    _, _, alice, bob = door
    # interactive with nothing to generate: they sleep after the prompt, alive until killed
    pids = alice.spawn_n(alice.tid, "fork me", 3, max_tokens=0, interactive=True, temperature=0.8, seed=1)
    assert len(set(pids)) == 3
    children = alice.fork(pids[0], 2)
    assert len(children) == 2
    assert alice.nice(pids[1], 5) == 5
    refused("EPERM", bob.kill, pids[0])                           # not bob's
    for pid in pids + children:
        alice.kill(pid)
        assert alice.wait(pid).reason == "killed"


def test_write_continues_an_interactive_process(door):
    _, _, alice, _ = door
    pid = alice.spawn(alice.tid, [{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
                      interactive=True)
    while not alice.read(pid, timeout=10.0).turn_done:
        pass
    alice.write(pid, [{"role": "user", "content": "And then?"}])
    while not alice.read(pid, timeout=10.0).turn_done:
        pass
    status = alice.wait(pid)
    assert status.reason in ("stop", "length") and 1 <= len(status.tokens) <= 12


def test_shmget_shmrm(door):
    _, _, alice, bob = door
    shmid = alice.shmget(alice.tid, list(range(3, 3 + 40)))
    pid = alice.spawn(alice.tid, [100, 101], shm=shmid, max_tokens=4, temperature=0)
    assert alice.wait(pid).prompt_tokens == 42
    refused("EPERM", bob.shmrm, shmid)
    alice.shmrm(shmid)
    refused("ESRCH", alice.shmrm, shmid)


# -- /proc ---------------------------------------------------------------------------------------------------
def test_ps_pagemap_meminfo_schedstat_dmesg(door):
    _, root, alice, bob = door
    pid = alice.spawn(alice.tid, list(range(3, 40)), max_tokens=2, temperature=0, interactive=True)
    while not alice.read(pid, timeout=10.0).turn_done:
        pass
    procs = alice.ps()
    assert all(isinstance(p, ProcInfo) for p in procs) and pid in {p.pid for p in procs}
    assert pid not in {p.pid for p in bob.ps()} and pid in {p.pid for p in root.ps()}
    pm = alice.pagemap(pid, text=True)
    assert isinstance(pm, PageMap) and pm.num_tokens >= 37 and all(page.text is not None for page in pm.pages)
    mem = root.meminfo(frames=True)
    assert isinstance(mem, MemInfo) and len(mem.frames) == mem.total
    assert any(pid in row[3] for row in mem.frames)                # the frames it maps name it
    assert set(alice.meminfo().cgroups) == {"alice"}
    stat, own = root.schedstat(), alice.schedstat()
    assert isinstance(stat, SchedStat) and stat.steps > 0 and own.steps == 0 and own.recent_steps == []
    assert [t.name for t in own.tenants] == ["alice"]
    entries = alice.dmesg()
    assert entries and all(e.tid == alice.tid for e in entries)
    alice.wait(pid)


def test_uname_and_fsck(door):
    _, root, alice, _ = door
    info = alice.uname()
    assert isinstance(info, SystemInfo) and info.device == "cpu" and info.frame_bytes > 0 and info.gpu is None
    assert isinstance(root.fsck(), FsckReport)
    refused("EPERM", alice.fsck)


# -- watching and driving the kernel ----------------------------------------------------------------------------
def test_trace_and_loopctl(door):
    _, root, alice, _ = door
    status = root.loopctl()
    assert isinstance(status, LoopStatus) and status.running and not status.paused
    since = root.schedstat().steps
    root.loopctl("pause")
    pid = alice.spawn(alice.tid, "step by step", max_tokens=3, temperature=0)
    assert root.trace(since=since) == []                          # paused: no step runs
    root.loopctl("step")
    records = root.trace(since=since)
    assert len(records) == 1 and isinstance(records[0], StepRecord)
    (work,) = [w for w in records[0].works if w.pid == pid]
    assert isinstance(work, WorkRecord) and work.tid == alice.tid and work.generated == 1
    root.loopctl("resume")
    assert alice.wait(pid).reason == "length"
    later = root.trace(since=records[0].step, timeout=5.0)
    assert [r.step for r in later] == list(range(records[0].step + 1, records[0].step + 1 + len(later)))
    assert any([pid, "length"] in r.exits for r in later)
    refused("EINVAL", root.loopctl, "idle", until=1.0)            # the CPU's clock passes by itself
    refused("EPERM", alice.trace)
    refused("EPERM", alice.loopctl)


def test_cacheevents(door):
    _, root, alice, _ = door
    info = alice.tenantinfo(alice.tid)
    last = root.cacheevents()[-1].seq if root.cacheevents() else 0
    ids = list(range(7, 7 + 2 * info.page_size + 3))                  # two full pages and a partial one
    alice.wait(alice.spawn(alice.tid, ids, max_tokens=1, temperature=0))
    events = root.cacheevents(since=last)
    names = [n.hex() for n in chain_names(bytes.fromhex(info.page_namespace), ids, info.page_size)]
    published = [e for e in events if e.kind == "publish" and e.tid == alice.tid]
    assert isinstance(events[0], CacheEvent) and [e.page for e in published][:2] == names
    assert published[0].parent == info.page_namespace and published[1].parent == names[0]
    assert [e.seq for e in events] == list(range(last + 1, last + 1 + len(events)))
    assert root.cacheevents(since=last, limit=1) == events[:1]
    assert root.cacheevents(since=events[-1].seq) == []
    refused("EINVAL", root.cacheevents, since=-1)
    refused("EINVAL", root.cacheevents, limit=0)
    refused("EPERM", alice.cacheevents)


def test_every_syscall_was_called_through_this_door(door):
    kind = door[0]
    assert CALLED[kind] == set(SYSCALLS), sorted(set(SYSCALLS) - CALLED[kind])
