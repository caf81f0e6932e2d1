"""The shell's /proc commands and the TUI attached to a running kvosd: named with --url, or found
through the runtime file a local kvosd writes (stale files skipped, several daemons refused)."""
import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from userspace.daemon import runtime
from userspace.daemon.client import Client
from userspace.daemon.config import DaemonConfig, TenantSpec
from userspace.daemon.listen import ServerThread
from userspace.shell.main import main
from userspace.tui.app import KvosTop
from userspace.tui.source import Source

ROOT, ALICE = "root-key-attach", "alice-key-attach"


@pytest.fixture(scope="module")
def server():
    cfg = DaemonConfig(boot=dict(device="cpu", memory="8MiB", swap="4MiB", threads=1),
                       tenants=[TenantSpec("alice", "tiny-llama", ALICE)], root_key=ROOT)
    srv = ServerThread(cfg)
    yield srv
    report = srv.stop(kill=True)
    assert report["fsck"] == "clean"


def attach(srv, key=ROOT):
    return ["--url", srv.url, "--key", key]


def test_proc_commands_read_the_daemon(server, capsys):
    alice = Client(server.url, ALICE)
    tid = alice.schedstat().tenants[0].tid
    pid = alice.spawn(tid, "kvos is an operating system", max_tokens=300, ignore_eos=True, temperature=0)
    assert main(["ps", "--json", *attach(server)]) == 0
    assert pid in [p["pid"] for p in json.loads(capsys.readouterr().out)]
    deadline = time.monotonic() + 30
    while not alice.pagemap(pid).pages:                         # the loop thread admits it when it gets to it
        assert time.monotonic() < deadline, "the daemon never prefilled the prompt"
        time.sleep(0.01)
    assert main(["pagemap", str(pid), *attach(server)]) == 0
    assert "kvos is an" in capsys.readouterr().out            # the page text came over the wire
    assert main(["meminfo", "--json", *attach(server)]) == 0
    assert json.loads(capsys.readouterr().out)["total"] > 0
    assert main(["nice", str(pid), "3", *attach(server)]) == 0
    assert capsys.readouterr().out.strip() == "3"
    assert main(["kill", str(pid), *attach(server)]) == 0
    assert alice.wait(pid).reason == "killed"
    assert main(["kill", str(pid), *attach(server, ALICE)]) != 0          # reaped: ESRCH, one line
    assert "ESRCH" in capsys.readouterr().err


def test_top_attached_shows_the_daemons_processes_and_frames(server):
    alice = Client(server.url, ALICE)
    tid = alice.schedstat().tenants[0].tid
    pid = alice.spawn(tid, [5, 6, 7, 8, 9, 10], max_tokens=400, ignore_eos=True, temperature=0)
    source = Source(Client(server.url, ROOT))
    snap = source.snapshot(pid)
    assert pid in [p.pid for p in snap.procs] and snap.frames.cells
    assert snap.pagemap is not None and len(snap.page_texts) == len(snap.pagemap.pages)

    async def drive():
        app = KvosTop(source)
        async with app.run_test() as pilot:
            await pilot.pause(1.0)
            assert any(str(pid) in line for line in app.export_screenshot().splitlines())
    asyncio.run(drive())
    alice.kill(pid)
    alice.wait(pid)


def test_top_with_a_tenant_key_shows_that_tenant_and_refuses_the_loop_keys(server):
    from kernel.errors import KvosError
    source = Source(Client(server.url, ALICE))
    snap = source.snapshot()
    assert [t.name for t in snap.schedstat.tenants] == ["alice"] and not snap.paused
    with pytest.raises(KvosError) as err:
        source.pause()
    assert err.value.errno == "EPERM"
@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
    """An empty runtime directory of our own, and no daemon named in the environment."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    for name in ("KVOS_URL", "KVOS_KEY"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_proc_commands_find_the_local_daemon_through_its_runtime_file(server, runtime_dir, capsys):
    assert main(["ps"]) != 0                                  # nothing found: one line, no kernel booted
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kvos serve" in err[0] and "--url" in err[0]
    port = int(server.url.rsplit(":", 1)[1])
    note = runtime.claim(port, server.url, ROOT)              # what `kvos serve` writes
    try:
        alice = Client(server.url, ALICE)
        pid = alice.spawn(alice.tid, "found without --url", max_tokens=300, ignore_eos=True, temperature=0)
        assert main(["ps", "--json"]) == 0                    # no --url: the local daemon, as root
        captured = capsys.readouterr()
        assert pid in [p["pid"] for p in json.loads(captured.out)] and "--local" not in captured.err
        assert main(["nice", str(pid), "2"]) == 0 and capsys.readouterr().out.strip() == "2"

        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()                                           # its pid is gone: a stale file, skipped
        (runtime_dir / "kvosd-9.json").write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": dead.pid,
                                                               "root_key": "stale-key-0"}))
        assert main(["meminfo", "--json"]) == 0 and json.loads(capsys.readouterr().out)["total"] > 0

        # a second live daemon (this process stands in for it): which one is meant is not guessed
        (runtime_dir / "kvosd-10.json").write_text(json.dumps({"url": "http://127.0.0.1:10", "pid": os.getpid(),
                                                                "root_key": "other-key-0"}))
        assert main(["ps"]) == 22
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and server.url in err[0] and "http://127.0.0.1:10" in err[0] and "--url" in err[0]
        assert main(["kill", str(pid), "--url", server.url]) == 0          # --url picks one
        assert alice.wait(pid).reason == "killed"
    finally:
        runtime.release(note)
    assert not note.exists()
