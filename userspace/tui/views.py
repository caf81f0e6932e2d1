"""What the TUI draws, as rich renderables made from a Snapshot (no Textual here, so it is easy to test).

memory_map: one cell per frame, its background the frame's state (or its
tenant), its text the tenant's initial and the refcount. page_table: the
selected process's pages. scheduler: the last steps. dmesg_text: one log line.
"""
from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from kernel.units import format_bytes

STATE_STYLES = {              # background of a frame cell, by state
    "free": "grey70 on grey23",
    "cached": "white on dodger_blue3",
    "private": "black on green3",
    "shared": "black on dark_orange",
    "pinned": "white on medium_purple3",
}
STATE_HELP = {                # legend labels: short, so that each stays on one line
    "free": "free",
    "cached": "cached",
    "private": "one user",
    "shared": "shared",
    "pinned": "pinned shm",
}
TENANT_COLOURS = ("green3", "deep_pink3", "gold3", "dark_cyan", "orange3", "slate_blue1")
EVENT_STYLES = {"preempt": "yellow", "swap-in": "cyan", "exit": "green", "admit": "bold", "fork": "magenta",
                "shm": "medium_purple3", "oom": "bold red", "fault": "bold red", "cow": "dark_orange"}


def tenant_colours(names) -> dict:
    return {name: TENANT_COLOURS[i % len(TENANT_COLOURS)] for i, name in enumerate(sorted(names))}


def memory_map(frames, width: int, by_tenant: bool = False, selected_pid: int | None = None,
               tenants=()) -> Group:
    """The frame grid, a legend and totals. Frames of the selected process are underlined in bold."""
    cells_per_row = max(1, (width + 1) // 3)
    colours = tenant_colours(set(tenants) | {c.tenant for c in frames.cells if c.tenant})
    grid = Text()
    for i, cell in enumerate(frames.cells):
        if i and i % cells_per_row == 0:
            grid.append("\n")
        elif i:
            grid.append(" ")
        grid.append(_cell_text(cell), style=_cell_style(cell, by_tenant, colours, selected_pid))
    legend = Text()
    if by_tenant:
        for name, colour in colours.items():
            legend.append("  ", style=f"on {colour}").append(f"\u00a0{name}  ")
        legend.append("  ", style="on grey23").append("\u00a0free\u00a0or\u00a0cached")
    else:
        for state in STATE_STYLES:
            label = STATE_HELP[state].replace(" ", "\u00a0")
            legend.append("  ", style=STATE_STYLES[state]).append(f"\u00a0{label}  ")
    counts = {state: frames.count(state) for state in STATE_STYLES}
    total = len(frames.cells)
    totals = Text(f"{total} frames of {format_bytes(frames.frame_bytes)}: " +
                  ", ".join(f"{counts[s]} {s}" for s in STATE_STYLES), style="bold")
    help_line = Text("a cell is a frame: its tenant's initial and refcount; ·· cached: no user, kept for its "
                     "named page" + (f"; underlined: pid {selected_pid}'s" if selected_pid is not None else "") +
                     "; m: colour by " + ("state" if by_tenant else "tenant"), style="dim")
    return Group(grid, Text(""), legend, totals, help_line)


def _cell_text(cell) -> str:
    if cell.state == "free":
        return "  "
    if cell.state == "cached":
        return "··"
    initial = (cell.tenant or "?")[0]
    return initial + (str(cell.refcount) if cell.refcount < 10 else "+")


def _cell_style(cell, by_tenant: bool, colours: dict, selected_pid) -> str:
    if by_tenant:
        style = f"black on {colours[cell.tenant]}" if cell.tenant and cell.refcount else "grey70 on grey23"
    else:
        style = STATE_STYLES[cell.state]
    if selected_pid is not None and selected_pid in cell.pids:
        style += " bold underline"
    return style


def page_table(snapshot, proc) -> Table | Text:
    """vpn -> frame, refcount, flags and the page's tokens as text, for the selected process."""
    pm = snapshot.pagemap
    if proc is None:
        return Text("select a process (up/down) to see its page table", style="dim")
    title = f"page table of pid {proc.pid} ({proc.tenant}, {proc.state}, {proc.residency})"
    if pm is None or not pm.pages:
        return Text(f"{title}\nno pages: " + ("exited" if proc.state == "zombie" else "nothing mapped yet"),
                    style="dim")
    table = Table(title=title, title_justify="left", expand=True, pad_edge=False, show_edge=False)
    for col, justify in (("vpn", "right"), ("frame", "right"), ("refs", "right"), ("flags", "left"),
                         ("tokens", "left")):
        table.add_column(col, justify=justify, no_wrap=True, ratio=1 if col == "tokens" else None)
    for page, text in zip(pm.pages, snapshot.page_texts or [None] * len(pm.pages)):
        frame = str(page.frame) if page.frame is not None else f"swap:{page.swap_slot}"
        shown = printable(text) if text is not None else " ".join(map(str, page.tokens))
        style = "dark_orange" if page.shared else ("medium_purple3" if page.pinned else None)
        table.add_row(str(page.vpn), frame, str(page.refcount), page.flags, shown, style=style)
    table.caption = "flags: s shared, c copy-on-write on next write, n named in the page cache, w swapped, p pinned"
    return table


def printable(text: str) -> str:
    """Text on one line: newlines and other control characters shown as escapes."""
    return "".join(c if c.isprintable() else {"\n": "\\n", "\t": "\\t"}.get(c, f"\\x{ord(c):02x}")
                   for c in text)


def step_rates(stat) -> list:
    """Tokens per second of each recent step (prefill + decode over the step's time)."""
    return [(s.prefill_tokens + s.decode_tokens) / s.seconds if s.seconds else 0.0 for s in stat.recent_steps]


def scheduler(stat) -> Group:
    steps = stat.recent_steps
    lines = [Text(f"policy {stat.policy}   step {stat.steps}   running {stat.running}   waiting {stat.waiting}",
                  style="bold")]
    if steps:
        last = steps[-1]
        window = steps[-16:]
        prefill = sum(s.prefill_tokens for s in window)
        decode = sum(s.decode_tokens for s in window)
        lines.append(Text(f"last step: batch {last.batch_size}, {last.prefill_tokens} prefill + "
                          f"{last.decode_tokens} decode tokens, {last.seconds * 1000:.0f} ms"))
        split = Text(f"last {len(window)} steps: ")
        total = prefill + decode or 1
        bar = 24
        split.append("█" * round(bar * prefill / total), style="dodger_blue2")
        split.append("█" * round(bar * decode / total), style="green3")
        split.append(f" {prefill} prefill / {decode} decode")
        lines.append(split)
    lines.append(Text(f"{stat.tokens_per_second:.1f} tok/s computed overall; {stat.generated_tokens} generated; "
                      f"{stat.preemptions} preemptions ({stat.swap_outs} swap-outs, {stat.reclaims} reclaims)"))
    if stat.draft_tokens:                    # a kernel booted with speculate=k
        lines.append(Text(f"speculation: {stat.accepted_tokens} of {stat.draft_tokens} drafts taken "
                          f"({stat.accepted_tokens / stat.draft_tokens:.0%})"))
    for t in stat.tenants:
        lines.append(Text(f"  {t.name:<10} weight {t.weight:g}: {t.served_tokens} tokens served, "
                          f"{t.running} running, {t.waiting} waiting, {t.sleeping} sleeping"))
    return Group(*lines)


EVENT_NOTES = {"cow": "a copy-on-write fault"}      # what the event is called where the message does not say


def dmesg_text(entry) -> Text:
    who = f" pid {entry.pid}" if entry.pid is not None and not entry.message.startswith(f"pid {entry.pid}") else ""
    style = "bold red" if entry.level == "error" else EVENT_STYLES.get(entry.event)
    note = f" ({EVENT_NOTES[entry.event]})" if entry.event in EVENT_NOTES else ""
    return Text(f"[{entry.time:8.2f}] {entry.step:>5} {entry.event:<8}{who}: {entry.message}{note}",
                style=style or "")
