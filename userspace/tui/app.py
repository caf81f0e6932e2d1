"""kvos top: a Textual app that shows a running kernel live and lets a student poke it.

Panes: processes, the memory map, the selected process's page table, the
scheduler and dmesg. The data comes from a Source on a root syscall handle
(userspace/tui/source.py), fetched in a worker thread a few times a second so the
screen never waits on a kernel step; key presses (pause, step, kill, nice, fork)
run in workers too, so a daemon's round trips never block the screen either.
"""
from __future__ import annotations

import threading

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Footer, Header, RichLog, Sparkline, Static

from kernel.errors import KvosError
from userspace.tui import views

PROC_COLUMNS = ("pid", "tenant", "state", "prompt", "gen", "pages", "shared", "cow", "swapped", "nice", "tok/s")


class KvosTop(App):
    TITLE = "kvos top"
    CSS = """
    #top { height: 1fr; }
    #bottom { height: 1fr; }
    #procs { width: 3fr; border: round $primary; }
    #memory { width: 2fr; border: round $primary; }
    #pages { width: 3fr; border: round $primary; }
    #sched-pane { width: 2fr; border: round $primary; }
    #dmesg { height: 9; border: round $primary; }
    Sparkline { height: 2; margin: 0 1; }
    .caption { color: $text-muted; margin: 0 1; }
    """
    BINDINGS = [
        Binding("space", "toggle_pause", "pause/run"),
        Binding("s", "step", "step one slice"),
        Binding("k", "kill", "kill"),
        Binding("f", "fork", "fork"),
        Binding("plus,equals_sign", "nice(1)", "nice +1"),
        Binding("minus", "nice(-1)", "nice -1"),
        Binding("m", "toggle_map", "map: state/tenant"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, source, *, status=None, refresh_every: float = 0.3, start_paused: bool = False):
        super().__init__()
        self.source = source
        self.status = status                  # callable -> a line about the workload, or None
        self.refresh_every = refresh_every
        self.start_paused = start_paused
        self.snapshot = None
        self.selected_pid: int | None = None
        self.by_tenant = False
        self.forked: set = set()              # children forked from here: this shell reaps them
        self._rows: list = []                 # pids in the process table, in order
        self._dmesg_seq = 0
        self._fetching = threading.Lock()
        self._controlling = threading.Lock()  # one control at a time: pause then step, in key order
        self._finished_told = False

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="top"):
            yield DataTable(id="procs", cursor_type="row", zebra_stripes=True)
            with VerticalScroll(id="memory"):
                yield Static(id="memmap")
        with Horizontal(id="bottom"):
            with VerticalScroll(id="pages"):
                yield Static(id="pagetable")
            with Vertical(id="sched-pane"):
                yield Static("tokens per second, per step", classes="caption")
                yield Sparkline([], id="rate")
                yield Static("step time", classes="caption")
                yield Sparkline([], id="steptime")
                yield Static(id="sched")
        yield RichLog(id="dmesg", max_lines=500, wrap=False)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#procs", DataTable)
        for col in PROC_COLUMNS:
            table.add_column(col, key=col)
        self.query_one("#procs").border_title = "processes"
        self.query_one("#memory").border_title = "memory map (frames)"
        self.query_one("#pages").border_title = "page table"
        self.query_one("#sched-pane").border_title = "scheduler"
        self.query_one("#dmesg").border_title = "dmesg"
        table.focus()                         # up/down move through the processes from the start
        if self.start_paused:
            self.source.pause()
        self.sync_refresh()
        self.set_interval(self.refresh_every, self._tick)

    # -- data ------------------------------------------------------------------------------
    def _tick(self) -> None:
        if not self._fetching.locked():
            self.run_worker(self._fetch, thread=True, group="fetch")

    def _fetch(self) -> None:
        if not self._fetching.acquire(blocking=False):
            return
        try:
            snap = self.source.snapshot(self.selected_pid, self._dmesg_seq)
        except KvosError as err:              # e.g. a daemon that went away: say so, keep the last picture
            self.call_from_thread(self.notify, f"{err.errno}: {err.reason}", severity="error")
            return
        finally:
            self._fetching.release()
        self.call_from_thread(self._apply, snap)

    def sync_refresh(self) -> None:
        """Fetch and draw now, on this thread (tests; the first frame)."""
        self._apply(self.source.snapshot(self.selected_pid, self._dmesg_seq))

    def _apply(self, snap) -> None:
        if self.snapshot is not None and snap.taken_at < self.snapshot.taken_at:
            return                            # an older fetch finished late
        if not self.is_running or not self.query("#procs"):
            return                            # a fetch that finished while the app closes
        self.snapshot = snap
        self._draw_procs(snap)
        self._draw_memory(snap)
        self._draw_pages(snap)
        self._draw_sched(snap)
        self._draw_dmesg(snap)
        self._draw_header(snap)
        self._reap(snap)

    def _draw_header(self, snap) -> None:
        stat = snap.schedstat
        state = "PAUSED (space: run, s: step)" if snap.paused else "running"
        line = self.status() if self.status else None
        self.sub_title = f"step {stat.steps} · {state}" + (f" · {line}" if line else "")
        if line and "finished" in line and not self._finished_told:
            self._finished_told = True
            self.notify(line, timeout=8)

    def _draw_procs(self, snap) -> None:
        table = self.query_one("#procs", DataTable)
        pids = [p.pid for p in snap.procs]
        rows = {p.pid: (str(p.pid), p.tenant, p.state, str(p.prompt_tokens), str(p.generated_tokens),
                        str(p.pages), str(p.shared_pages), str(p.cow_faults), str(p.swapped_pages),
                        str(p.priority), f"{p.tokens_per_second:.1f}") for p in snap.procs}
        if pids == self._rows:                # same processes: change cells, keep the scroll position
            for pid, values in rows.items():
                for col, value in zip(PROC_COLUMNS, values):
                    table.update_cell(str(pid), col, value)
        else:
            table.clear()
            for pid, values in rows.items():
                table.add_row(*values, key=str(pid))
            self._rows = pids
        if self.selected_pid in pids:
            table.move_cursor(row=pids.index(self.selected_pid), animate=False)
        elif pids:
            self.selected_pid = pids[min(table.cursor_row, len(pids) - 1)] if table.cursor_row >= 0 else pids[0]
        else:
            self.selected_pid = None

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.cursor_row != event.data_table.cursor_row:
            return                            # a stale event from a redraw
        if event.row_key is not None and event.row_key.value is not None:
            pid = int(event.row_key.value)
            if pid != self.selected_pid:
                self.selected_pid = pid
                self._tick()                  # the page table of the new selection

    def selected_proc(self):
        if self.snapshot is None:
            return None
        return next((p for p in self.snapshot.procs if p.pid == self.selected_pid), None)

    def _draw_memory(self, snap) -> None:
        width = max(10, self.query_one("#memory").size.width - 2)
        tenants = [t.name for t in snap.schedstat.tenants]
        self.query_one("#memmap", Static).update(
            views.memory_map(snap.frames, width, self.by_tenant, self.selected_pid, tenants))

    def _draw_pages(self, snap) -> None:
        proc = self.selected_proc()
        if proc is not None and snap.pagemap_pid != proc.pid:
            return                            # fetched before the selection moved: the next one has it
        self.query_one("#pagetable", Static).update(views.page_table(snap, proc))

    def _draw_sched(self, snap) -> None:
        stat = snap.schedstat
        self.query_one("#rate", Sparkline).data = views.step_rates(stat) or [0.0]
        self.query_one("#steptime", Sparkline).data = [s.seconds for s in stat.recent_steps] or [0.0]
        self.query_one("#sched", Static).update(views.scheduler(stat))

    def _draw_dmesg(self, snap) -> None:
        log = self.query_one("#dmesg", RichLog)
        for entry in snap.dmesg:
            if entry.seq > self._dmesg_seq:
                log.write(views.dmesg_text(entry))
                self._dmesg_seq = entry.seq

    def _reap(self, snap) -> None:
        exited = [p.pid for p in snap.procs if p.pid in self.forked and p.state == "zombie"]
        for pid in exited:
            self.forked.discard(pid)
            self._control(lambda pid=pid: self.source.wait(pid))

    # -- keys --------------------------------------------------------------------------------
    def _control(self, fn, say=None) -> None:
        """Run a control in a worker (it may wait for the current step), then redraw."""
        def work():
            try:
                with self._controlling:
                    result = fn()
            except KvosError as err:
                self.call_from_thread(self.notify, f"{err.errno}: {err.reason}", severity="error")
                return
            if say:
                self.call_from_thread(self.notify, say(result))
            self._fetch()
        self.run_worker(work, thread=True, group="control")

    def action_toggle_pause(self) -> None:
        self._control(self.source.resume if self.source.paused else self.source.pause)

    def action_step(self) -> None:
        self._control(self.source.step_once)      # it pauses a running loop first

    def action_kill(self) -> None:
        pid = self.selected_pid
        if pid is not None:
            self._control(lambda: self.source.kill(pid), lambda _: f"killed pid {pid}")

    def action_fork(self) -> None:
        pid = self.selected_pid
        if pid is not None:
            def fork():
                children = self.source.fork(pid)
                self.forked.update(children)
                return children
            self._control(fork, lambda kids: f"pid {pid} forked pid {kids[0]}")

    def action_nice(self, inc: int) -> None:
        pid = self.selected_pid
        if pid is not None:
            self._control(lambda: self.source.nice(pid, inc), lambda v: f"pid {pid}: nice {v}")

    def action_toggle_map(self) -> None:
        self.by_tenant = not self.by_tenant
        if self.snapshot is not None:
            self._draw_memory(self.snapshot)
