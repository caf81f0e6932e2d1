"""Plain-text and rich renderings of /proc data (ps, pagemap, meminfo, schedstat, dmesg).

The same renderings serve the CLI, the docs and the TUI's text panes; they take
the dataclasses the syscalls return (or their JSON dicts from the daemon).
"""
from __future__ import annotations

from dataclasses import asdict, is_dataclass

from rich.console import Console
from rich.table import Table

from kernel.units import format_bytes


def _d(obj):
    return asdict(obj) if is_dataclass(obj) else obj


def render(renderable, width: int = 120) -> str:
    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    with console.capture() as cap:
        console.print(renderable)
    return cap.get()


def _flags(page: dict) -> str:
    return "".join(c if page[k] else "-" for c, k in (
        ("s", "shared"), ("c", "cow"), ("n", "cached"), ("w", "swapped"), ("p", "pinned")))


def pagemap_table(pagemap, decode=None, title: str = "pagemap") -> Table:
    """One row per virtual page: frame, refcount, flags (s shared, c copy-on-write, n named in the
    page cache, w swapped, p pinned by shm) and the tokens it holds (as text when decode is given)."""
    pm = _d(pagemap)
    table = Table(title=f"{title}  ({pm['num_tokens']} tokens, {pm['page_size']} per page)")
    for col in ("vpn", "frame", "refs", "flags", "tokens"):
        table.add_column(col, justify="right" if col in ("vpn", "frame", "refs") else "left")
    for page in pm["pages"]:
        if page.get("text") is not None:           # pagemap(text=True) sent the text along
            tokens = page["text"]
        else:
            tokens = decode(page["tokens"]) if decode else " ".join(map(str, page["tokens"]))
        frame = str(page["frame"]) if page["frame"] is not None else f"swap:{page['swap_slot']}"
        table.add_row(str(page["vpn"]), frame, str(page["refcount"]), _flags(page), repr(tokens)[:70])
    return table


def meminfo_table(info) -> Table:
    m = _d(info)
    table = Table(title="meminfo", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    fb = m["frame_bytes"]
    for key in ("total", "free", "cached", "mapped", "shared", "pinned"):
        table.add_row(f"frames {key}", f"{m[key]:,}  ({format_bytes(m[key] * fb)})")
    table.add_row("swap slots used", f"{m['swap_used']:,} / {m['swap_total']:,}")
    cap = m["token_capacity"]
    util = m["tokens_stored"] / cap if cap else 0.0
    table.add_row("KV utilisation", f"{m['tokens_stored']:,} tokens / {cap:,} slots = {util:.1%}")
    table.add_row("copy-on-write faults", f"{m['cow_faults']:,}")
    table.add_row("page-cache hits / evictions", f"{m['page_cache_hits']:,} / {m['page_cache_evictions']:,}")
    table.add_row("pages swapped out / in", f"{m['swapped_out_pages']:,} / {m['swapped_in_pages']:,}")
    for name, cg in m["cgroups"].items():
        table.add_row(f"cgroup {name}", f"{cg['charged']:,} frames" + (f" of {cg['limit']:,}" if cg["limit"] else ""))
    return table


def ps_table(procs) -> Table:
    table = Table(title="processes")
    procs = list(map(_d, procs))
    replicas = any(p.get("replica") is not None for p in procs)        # behind a cluster gateway
    cols = ("pid", *(("replica",) if replicas else ()), "tenant", "state", "where", "nice", "prompt", "gen",
            "pages", "shared", "swapped", "cow", "preempt", "tok/s")
    for col in cols:
        table.add_column(col, justify="left" if col in ("tenant", "state", "where") else "right")
    for p in procs:
        table.add_row(str(p["pid"]), *((str(p.get("replica")),) if replicas else ()), p["tenant"], p["state"],
                      p["residency"], str(p["priority"]), str(p["prompt_tokens"]), str(p["generated_tokens"]),
                      str(p["pages"]), str(p["shared_pages"]), str(p["swapped_pages"]), str(p["cow_faults"]),
                      str(p["preemptions"]), f"{p['tokens_per_second']:.1f}")
    return table


def schedstat_table(stat) -> Table:
    s = _d(stat)
    table = Table(title=f"schedstat (policy {s['policy']})", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in ("steps", "prefill_tokens", "decode_tokens", "cached_tokens", "generated_tokens", "padding_tokens",
                "admissions", "preemptions", "swap_outs", "swap_ins", "reclaims", "recomputed_tokens", "exits",
                "oom_kills", "forward_errors", "running", "waiting", "draft_tokens", "accepted_tokens"):
        table.add_row(key.replace("_", " "), f"{s[key]:,}")
    table.add_row("tokens per second", f"{s['tokens_per_second']:.1f}")
    for t in s["tenants"]:
        table.add_row(f"tenant {t['name']} (weight {t['weight']:g})", f"{t['served_tokens']:,} tokens served")
    return table


def dmesg_lines(entries) -> list:
    out = []
    for e in map(_d, entries):
        who = f" pid {e['pid']}" if e["pid"] is not None and not e["message"].startswith(f"pid {e['pid']}") else ""
        where = f" replica {e['replica']}" if e.get("replica") is not None else ""      # behind a cluster gateway
        out.append(f"[{e['time']:9.3f}]{where} step {e['step']:>5} {e['level']:>5} {e['event']:<8}{who}: "
                   f"{e['message']}")
    return out
