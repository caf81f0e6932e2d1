"""kvos top, driven headless by Textual's pilot on the tiny model: what a student sees when they poke the kernel.

The kernel's loop thread starts paused, so every change on screen comes from a
key press: step one slice, select, fork, kill, nice. The same scenarios run on an
in-process root handle and on a kvosd client with the root key. Assertions read
the text the widgets draw (their rendered lines), and check it against the syscalls.
"""
import asyncio
import time

import pytest
from textual.geometry import Region

import kernel
from tests.kernel_helpers import TINY, frames
from userspace.tui import views
from userspace.tui.app import KvosTop
from userspace.tui.source import Source, frame_map

PROMPT = list(range(3, 43))            # 40 tokens: two full pages and a partly filled third


def drawn(app, selector: str) -> str:
    """The text a widget draws, line by line."""
    widget = app.query_one(selector)
    return "\n".join(strip.text for strip in widget.render_lines(Region(0, 0, widget.size.width, widget.size.height)))


def flat(app, selector: str) -> str:
    """What a widget draws, with line breaks and runs of spaces made single spaces."""
    return " ".join(drawn(app, selector).split())


def proc_row(app, pid: int) -> dict:
    from userspace.tui.app import PROC_COLUMNS
    table = app.query_one("#procs")
    return dict(zip(PROC_COLUMNS, table.get_row(str(pid))))


async def settle(pilot, until=lambda: True, timeout: float = 20.0) -> None:
    """Let workers and the loop thread finish what the keys started, redraw, until `until()` holds."""
    app = pilot.app
    deadline = time.monotonic() + timeout
    while True:
        await app.workers.wait_for_complete()
        app.sync_refresh()
        await pilot.pause()
        if until():
            return
        assert time.monotonic() < deadline, "the TUI did not reach the expected state"
        await asyncio.sleep(0.02)


def in_process():
    """A kernel booted here with its loop thread paused: (root handle, tid, teardown)."""
    k = kernel.boot(memory=frames(24), swap=frames(8), loop=True)
    root = k.syscalls()
    root.loopctl("pause")
    return root, root.spawn_tenant(TINY), lambda: k.shutdown(kill=True)


def over_http():
    """kvosd in a thread, its loop paused, seen through a Client with the root key: (client, tid, teardown)."""
    from userspace.daemon.client import Client
    from userspace.daemon.config import DaemonConfig, TenantSpec
    from userspace.daemon.listen import ServerThread
    key = "root-key-for-tui-tests"
    srv = ServerThread(DaemonConfig(boot=dict(device="cpu", memory=frames(24), swap=frames(8), threads=1),
                                    tenants=[TenantSpec("alice", TINY, "alice-key-for-tui-tests")], root_key=key))
    root = Client(srv.url, key)
    root.loopctl("pause")

    def stop():
        assert srv.stop(kill=True)["fsck"] == "clean"
    return root, root.schedstat().tenants[0].tid, stop


@pytest.fixture(params=["in-process", "kvosd"])
def paused_kernel(request):
    """(root handle, pid of a process whose prompt is not computed yet): the loop is paused."""
    root, tid, teardown = (in_process if request.param == "in-process" else over_http)()
    pid = root.spawn(tid, PROMPT, max_tokens=40, ignore_eos=True, temperature=0)
    yield root, pid
    teardown()


def steps(root) -> int:
    return root.schedstat().steps


def test_select_fork_kill_shows_refcounts_and_frames_return(paused_kernel):
    sys, pid = paused_kernel

    async def scenario():
        app = KvosTop(Source(sys), start_paused=True)
        async with app.run_test(size=(160, 48)) as pilot:
            assert "PAUSED" in app.sub_title
            await pilot.press("s")                             # one slice: the whole prompt is prefilled
            await settle(pilot, lambda: steps(sys) == 1)
            assert proc_row(app, pid)["state"] == "running"
            assert proc_row(app, pid)["pages"] == "3"

            # select the process; its page table: three private pages, the third partly filled
            await pilot.press("down", "up")
            await settle(pilot, lambda: f"page table of pid {pid}" in drawn(app, "#pagetable"))
            table = drawn(app, "#pagetable")
            rows = [line for line in table.splitlines() if line.strip()[:1].isdigit()]
            assert len(rows) == 3 and all(" 1 │" in r for r in rows), table
            assert "3 private, 0 shared" in flat(app, "#memmap")

            # fork: every page now has two references, shown as shared
            await pilot.press("f")
            await settle(pilot, lambda: len(sys.ps()) == 2 and " 2 │" in drawn(app, "#pagetable"))
            (child,) = {p.pid for p in sys.ps()} - {pid}            # pids may be random (kvosd)
            table = drawn(app, "#pagetable")
            assert table.count(" 2 │ s") == 3, table               # refs 2, flag s on each page
            assert "│ sc" in table                                  # the partly filled page: copy-on-write
            assert "0 private, 3 shared" in flat(app, "#memmap")
            assert proc_row(app, child)["shared"] == "3"

            # one slice: both append to the shared, partly filled page: one copy-on-write fault
            await pilot.press("s")
            await settle(pilot, lambda: steps(sys) == 2)
            assert sys.meminfo().cow_faults == 1
            assert int(proc_row(app, pid)["cow"]) + int(proc_row(app, child)["cow"]) == 1
            assert "copy-on-write fault" in "\n".join(str(line) for line in app.query_one("#dmesg").lines)
            cow_lines = [line for line in app.query_one("#dmesg").lines if "cow" in str(line)]
            assert len(cow_lines) == 1, cow_lines                  # the kernel's log line, shown once

            # kill the child (the TUI forked it, so it reaps it): the parent's pages are its own again
            await pilot.press("down")
            await settle(pilot, lambda: app.selected_pid == child)
            await pilot.press("k")
            await settle(pilot, lambda: child not in {p.pid for p in sys.ps()})
            await pilot.press("up")
            await settle(pilot, lambda: app.selected_pid == pid and f"pid {pid}" in drawn(app, "#pagetable"))
            rows = [line for line in drawn(app, "#pagetable").splitlines() if line.strip()[:1].isdigit()]
            assert all(" 1 │" in r for r in rows), rows
            assert "0 shared" in flat(app, "#memmap")

            # nice, then kill the parent: every frame is back (free, or cached for its named pages)
            await pilot.press("plus")
            await settle(pilot, lambda: proc_row(app, pid)["nice"] == "1")
            await pilot.press("k")
            await settle(pilot, lambda: proc_row(app, pid)["state"] == "zombie")
            info = sys.meminfo()
            assert info.free + info.cached == info.total and info.mapped == 0
            assert "0 private, 0 shared, 0 pinned" in flat(app, "#memmap")
            assert "exited" in drawn(app, "#pagetable")

    asyncio.run(scenario())
    sys.fsck()


def test_pause_and_run_keys_drive_the_loop(paused_kernel):
    sys, pid = paused_kernel

    async def scenario():
        app = KvosTop(Source(sys), start_paused=True)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot)
            assert steps(sys) == 0
            await pilot.press("space")                         # run: the process goes to the end
            await settle(pilot, lambda: next(p.state for p in sys.ps() if p.pid == pid) == "zombie")
            assert "running" in app.sub_title
            assert proc_row(app, pid)["gen"] == "40"
            await pilot.press("space")
            await settle(pilot, lambda: sys.loopctl().paused)
            assert "PAUSED" in app.sub_title
            assert "exit" in "\n".join(str(line) for line in app.query_one("#dmesg").lines)

    asyncio.run(scenario())


def test_frame_map_agrees_with_meminfo():
    """The memory map's per-frame states add up to meminfo's counts, shm pinned included."""
    k = kernel.boot(memory=frames(16), swap=frames(4))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    shmid = sys.shmget(tid, list(range(3, 40)))
    a = sys.spawn(tid, [50, 51, 52], shm=shmid, max_tokens=6, ignore_eos=True, temperature=0)
    for _ in range(3):
        sys.loopctl("step")                                   # no loop thread: the step runs here
    sys.fork(a, 1)
    for _ in range(2):
        sys.loopctl("step")
    fm, info = frame_map(sys.meminfo(frames=True)), sys.meminfo()
    assert len(fm.cells) == info.total
    assert fm.count("free") == info.free and fm.count("cached") == info.cached
    assert fm.count("private") + fm.count("shared") + fm.count("pinned") == info.mapped
    assert fm.count("pinned") == info.pinned
    owners = {c.tenant for c in fm.cells if c.state != "free" and c.state != "cached"}
    assert owners == {sys.tenantinfo(tid).name}
    assert {pid for c in fm.cells for pid in c.pids} == {a, a + 1}   # the pids mapping frames: the parent, its child
    text = views.memory_map(fm, 60)
    from userspace.shell.format import render
    assert f"{info.total} frames" in render(text)


def test_workload_tui_shows_two_tenants_and_finishes():
    """The demo's quick workload under the TUI, running: both tenants appear, the clients all finish."""
    import argparse

    from userspace.shell.demo import close, plan_from_args, start_session, workload_status
    from userspace.shell.options import add_demo_options
    parser = argparse.ArgumentParser()
    add_demo_options(parser)
    args = parser.parse_args(["--model", TINY, "--quick"])
    session = start_session(args, plan_from_args(args))

    async def scenario():
        app = KvosTop(Source(session.root), status=workload_status(session.workload))
        async with app.run_test(size=(160, 48)) as pilot:
            await settle(pilot, lambda: session.workload.done, timeout=60)
            await settle(pilot, lambda: "finished" in app.sub_title)
            text = drawn(app, "#sched")
            assert "assistant" in text and "batch" in text
            await pilot.press("m")                             # colour by tenant: the legend names them
            await pilot.pause()
            assert "assistant" in flat(app, "#memmap")

    try:
        asyncio.run(scenario())
    finally:
        close(session)
    assert not session.workload.errors
    session.kernel.fsck()


def test_quitting_early_ends_every_client():
    """q before the workload ends (kvos top, kvos demo): the tenants are killed, every client returns,
    and none is left stepping the kernel from its own thread."""
    import argparse

    from userspace.shell.demo import close, plan_from_args, start_session
    from userspace.shell.options import add_demo_options
    parser = argparse.ArgumentParser()
    add_demo_options(parser)
    args = parser.parse_args(["--model", TINY, "--quick"])
    session = start_session(args, plan_from_args(args))
    session.root.loopctl("pause")

    async def scenario():
        app = KvosTop(Source(session.root))
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot)
            await pilot.press("q")

    asyncio.run(scenario())
    close(session)
    assert session.workload.done and not session.workload.errors
    assert not session.root.loopctl().running
    assert session.kernel.syscalls().ps() == []
    session.kernel.fsck()
