"""What `kvos demo` tells a reader: progress while it runs, and the summary at the end.

Sampler reads the step records (trace) in a thread of the demo: per-tenant
service while both tenants had work, preemptions per tenant, and meminfo's KV
utilisation each time it finds new records. summarize() makes the summary from
syscalls alone, so its numbers are meminfo's and schedstat's; render_summary()
and progress_line() turn it into text.
"""
from __future__ import annotations

import threading
from dataclasses import asdict

from rich.console import Group
from rich.table import Table
from rich.text import Text

from kernel.units import format_bytes


class Sampler:
    """Reads the kernel's step records (trace) from where it last stopped, in a thread of the demo.

    From the records: tokens served per tenant in steps that began with every tenant having a
    process waiting (wanting more than it had), and preemptions per tenant. After each read that
    brought new records it asks meminfo for the KV utilisation, so that is sampled as often as
    this thread gets round, not after every step (over a daemon it would be the same)."""

    def __init__(self, root):
        self.sys = root
        self.cursor = 0                       # the last step whose record was read
        self.steps_read = 0
        self.steps_lost = 0                   # records the kernel's ring (512) dropped before they were read
        self.utilization: list = []           # meminfo.utilization at each sample with mapped frames
        self.contended: dict = {}             # tenant name -> tokens served while every tenant was backlogged
        self.contended_steps = 0
        self.preempted: dict = {}             # tenant id -> preemptions of its processes
        self._backlogged = False              # every tenant had a waiting process after the last step
        self._tenant_of: dict = {}            # pid -> tid, from the records' works
        self._names = {t.tid: t.name for t in root.schedstat().tenants}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, name="kvos-demo-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread, then read what is left (call it with the loop paused: then nothing is)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll(timeout=0.2)            # returns as soon as a step after the cursor has run

    def poll(self, timeout: float = 0.0) -> int:
        records = self.sys.trace(since=self.cursor, timeout=timeout)
        for record in records:
            self._take(record)
        if records:
            info = self.sys.meminfo()
            if info.token_capacity:
                self.utilization.append(info.utilization)
        return len(records)

    def _take(self, r) -> None:
        self.steps_lost += max(0, r.step - self.cursor - 1)
        self.cursor = r.step
        self.steps_read += 1
        for w in r.works:
            self._tenant_of[w.pid] = w.tid
        if self._backlogged:
            self.contended_steps += 1
            for w in r.works:
                name = self._name(w.tid)
                self.contended[name] = self.contended.get(name, 0) + w.count
        # Over HTTP the dict's keys come back as strings: accept both.
        waiting = {int(tid): n for tid, n in r.waiting_by_tenant.items()}
        self._backlogged = len(self._names) > 1 and all(waiting.get(tid, 0) > 0 for tid in self._names)
        for pid, _how in r.preempted:
            tid = self._tenant_of.get(pid)
            if tid is not None:
                self.preempted[tid] = self.preempted.get(tid, 0) + 1

    def _name(self, tid: int) -> str:
        if tid not in self._names:            # a tenant created after the sampler was
            self._names.update({t.tid: t.name for t in self.sys.schedstat().tenants})
        return self._names.get(tid, str(tid))


def summarize(sys, workload, sampler: Sampler, *, model: str, finished: bool) -> dict:
    """The demo's numbers: from meminfo and schedstat (totals since boot) and the sampled utilisation."""
    info, stat = sys.meminfo(), sys.schedstat()
    wall = workload.wall_seconds
    util = sampler.utilization
    weights = sum(t.weight for t in stat.tenants) or 1.0
    served = sum(t.served_tokens for t in stat.tenants) or 1
    contended = sum(sampler.contended.values())
    tenants = []
    for t in stat.tenants:
        ttfts = [r.ttft for r in workload.replies if r.tenant == t.name and r.ttft is not None]
        tenants.append({
            "name": t.name, "weight": t.weight, "served_tokens": t.served_tokens,
            "share": t.served_tokens / served, "weight_share": t.weight / weights,
            "contended_tokens": sampler.contended.get(t.name, 0),
            "contended_share": sampler.contended.get(t.name, 0) / contended if contended else None,
            "mean_ttft": sum(ttfts) / len(ttfts) if ttfts else None,
            "preemptions": sampler.preempted.get(t.tid, 0),
        })
    return {
        "model": model, "finished": finished, "wall_seconds": wall,
        "requests": workload.plan.num_requests, "replies": [asdict(r) for r in workload.replies],
        "errors": list(workload.errors),
        "frames": info.total, "frame_bytes": info.frame_bytes, "swap_slots": info.swap_total,
        "steps": stat.steps, "policy": stat.policy,
        "generated_tokens": stat.generated_tokens,
        "tokens_per_second": stat.generated_tokens / wall if wall else 0.0,
        "computed_tokens_per_second": stat.tokens_per_second,
        "prefill_tokens": stat.prefill_tokens, "decode_tokens": stat.decode_tokens,
        "cached_tokens": stat.cached_tokens,
        "kv_utilization": {"mean": sum(util) / len(util) if util else 0.0, "peak": max(util, default=0.0),
                           "samples": len(util)},
        "steps_traced": sampler.steps_read, "steps_lost": sampler.steps_lost,
        "page_cache_hits": info.page_cache_hits, "page_cache_evictions": info.page_cache_evictions,
        "cow_faults": info.cow_faults,
        "preemptions": stat.preemptions, "swap_outs": stat.swap_outs, "swap_ins": stat.swap_ins,
        "swapped_out_pages": info.swapped_out_pages, "swapped_in_pages": info.swapped_in_pages,
        "reclaims": stat.reclaims, "recomputed_tokens": stat.recomputed_tokens,
        "admissions": stat.admissions, "exits": stat.exits, "oom_kills": stat.oom_kills,
        "tenants": tenants, "contended_steps": sampler.contended_steps,
        # the syscalls' own answers, so a reader (or a test) can check every number above against them
        "meminfo": asdict(info), "schedstat": asdict(stat),
    }


def progress_line(sys, workload) -> str:
    """One line of plain progress (output that is not a terminal)."""
    info, stat = sys.meminfo(), sys.schedstat()
    used = info.total - info.free - info.cached
    return (f"[{workload.wall_seconds:6.1f}s] step {stat.steps:>4}: {stat.running} running, {stat.waiting} waiting; "
            f"frames {used}/{info.total} used ({info.cached} cached, {info.pinned} pinned), "
            f"swap {info.swap_used}/{info.swap_total}; {stat.generated_tokens} tokens generated; "
            f"{stat.preemptions} preemptions; replies {len(workload.replies)}/{workload.expected_replies}")


def render_summary(s: dict, width: int = 100) -> Group:
    parts = [Text(f"kvos demo: {s['model']}, {s['frames']} frames of {format_bytes(s['frame_bytes'])} "
                  f"({s['frames'] * s['frame_bytes'] // 2**20} MiB of KV memory), {s['swap_slots']} swap slots, "
                  f"policy {s['policy']}" + ("" if s["finished"] else "  [stopped before the end]"), style="bold")]
    parts.append(Text("\nReplies", style="bold underline"))
    for r in s["replies"]:
        head = f"[{r['kind']} · {r['tenant']}" + (f" · pid {r['pid']}" if r["pid"] is not None else "") + \
            (f" · score {r['score']:.2f}" if r["score"] is not None else "") + f" · {len(r['tokens'])} tokens, " \
            f"{r['finish_reason']}]"
        parts.append(Text(head, style="dim"))
        parts.append(Text(f"  Q: {r['prompt']}"))
        reply = " ".join(r["text"].split())
        parts.append(Text(f"  A: {reply[:width * 2] + ('...' if len(reply) > width * 2 else '')}"))
    for err in s["errors"]:
        parts.append(Text(f"  client error: {err}", style="red"))
    parts.append(Text("\nWhat the kernel did", style="bold underline"))
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    u = s["kv_utilization"]
    rows = [
        ("throughput", f"{s['generated_tokens']} tokens generated in {s['wall_seconds']:.1f} s = "
                       f"{s['tokens_per_second']:.1f} tokens/s ({s['computed_tokens_per_second']:.1f} tokens/s "
                       f"computed, prefill included, over {s['steps']} steps)"),
        ("KV utilisation", f"mean {u['mean']:.1%}, peak {u['peak']:.1%} of the token slots of used frames "
                           f"(meminfo sampled {u['samples']} times in {s['steps']} steps, whenever new step "
                           f"records had come)"),
        ("page cache", f"{s['page_cache_hits']} hits: pages mapped instead of computed again "
                       f"({s['cached_tokens']} prompt tokens mapped from shm or the page cache, not prefilled); "
                       f"{s['page_cache_evictions']} evictions"),
        ("copy-on-write", f"{s['cow_faults']} faults: a shared, partly filled page copied before a write"),
        ("preemption", f"{s['preemptions']} preemptions: {s['swap_outs']} swap-outs ({s['swapped_out_pages']} pages "
                       f"to host), {s['swap_ins']} swap-ins ({s['swapped_in_pages']} pages copied back), "
                       f"{s['reclaims']} reclaims (pages of {s['recomputed_tokens']} tokens dropped, to be "
                       f"computed again or found again in the page cache)"),
    ]
    for t in s["tenants"]:
        ttft = "" if t["mean_ttft"] is None else f", first token after {t['mean_ttft']:.1f} s on average"
        rows.append((f"tenant {t['name']}", f"weight {t['weight']:g} ({t['weight_share']:.0%} of the weights): "
                                            f"{t['served_tokens']} tokens served ({t['share']:.0%} of all); "
                                            f"preempted {t['preemptions']} times{ttft}"))
    for name, value in rows:
        table.add_row(name, value)
    parts.append(table)
    if len(s["tenants"]) > 1:
        parts.append(Text("Weights decide who goes first and who is preempted when memory or the token budget "
                          "is short: the fair policy serves the tenant with the least service per unit of weight. "
                          "It wastes nothing: a tenant that asks for less than its share gets all it asks for, "
                          "and the other one uses the rest.", style="dim"))
    return Group(*parts)
