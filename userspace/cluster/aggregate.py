"""Merging what the replicas report into one answer, each row marked with its replica.

ps rows, dmesg lines and step records get `replica` and global pids; meminfo and schedstat sum
their counters over the replicas and keep each replica's own answer under `replicas`. dmesg's
sequence numbers are the gateway's: it pulls each replica's new lines, numbers them in the
order it saw them, and keeps the last LOG_LINES (per tenant view), so `since` works across
replicas as it does on one kernel.
"""
from __future__ import annotations

import collections
import dataclasses
import threading

from kernel import results as r
from kernel.errors import KvosError
from userspace.cluster import pids as gpids

LOG_LINES = 4096
RECENT_STEPS = 64


def ps(answers: dict) -> list:
    rows = []
    for replica, procs in sorted(answers.items()):
        for p in procs:
            p.pid = gpids.to_global(replica, p.pid)
            p.replica = replica
            rows.append(p)
    return rows


_MEM_SUMS = ("total", "free", "cached", "mapped", "shared", "pinned", "watermark", "swap_total", "swap_used",
             "cow_faults", "page_cache_hits", "page_cache_evictions", "swapped_out_pages", "swapped_in_pages",
             "tokens_stored", "token_capacity", "page_cache_lookups")


def meminfo(answers: dict) -> r.MemInfo:
    """Counters summed over the replicas; cgroups summed by tenant name; frames (if asked) listed
    replica after replica, their pids global; each replica's own MemInfo under `replicas`."""
    infos = dict(sorted(answers.items()))
    first = next(iter(infos.values()))
    out = r.MemInfo(frame_bytes=first.frame_bytes, **{f: sum(getattr(m, f) for m in infos.values())
                                                      for f in _MEM_SUMS})
    for m in infos.values():
        for name, c in m.cgroups.items():
            have = out.cgroups.get(name)
            if have is None:
                out.cgroups[name] = dataclasses.replace(c)
                continue
            have.charged += c.charged
            have.pinned += c.pinned
            have.limit = None if have.limit is None or c.limit is None else have.limit + c.limit
            have.share = None if have.share is None or c.share is None else have.share + c.share
    if first.frames is not None:
        out.frames = []
        for replica, m in infos.items():
            for state, refs, cgroup, pids in m.frames:
                out.frames.append([state, refs, cgroup, [gpids.to_global(replica, p) for p in pids]])
    out.replicas = infos
    return out


_SCHED_SUMS = ("steps", "busy_seconds", "prefill_tokens", "decode_tokens", "cached_tokens", "generated_tokens",
               "padding_tokens", "admissions", "preemptions", "swap_outs", "swap_ins", "reclaims",
               "recomputed_tokens", "exits", "oom_kills", "forward_errors", "tokens_per_second", "running", "waiting",
               "draft_tokens", "accepted_tokens")


def step_record(replica: int, rec):
    """A replica's step record with global pids and its replica."""
    g = lambda pid: gpids.to_global(replica, pid)       # noqa: E731
    rec.replica = replica
    for w in rec.works:
        w.pid = g(w.pid)
    rec.admitted = [g(p) for p in rec.admitted]
    rec.swapped_in = [g(p) for p in rec.swapped_in]
    rec.preempted = [[g(p), how] for p, how in rec.preempted]
    rec.cow_faults = [g(p) for p in rec.cow_faults]
    rec.exits = [[g(p), why] for p, why in rec.exits]
    return rec


def schedstat(answers: dict) -> r.SchedStat:
    """Counters summed (tokens_per_second too: the replicas run side by side); tenants merged by
    tid; the most recent steps of all replicas by the time they ended; clock: the latest."""
    stats = dict(sorted(answers.items()))
    first = next(iter(stats.values()))
    tenants: dict = {}
    for s in stats.values():
        for t in s.tenants:
            have = tenants.get(t.tid)
            if have is None:
                tenants[t.tid] = dataclasses.replace(t)
                continue
            for f in ("served_tokens", "running", "waiting", "sleeping"):
                setattr(have, f, getattr(have, f) + getattr(t, f))
    steps = [step_record(replica, rec) for replica, s in stats.items() for rec in s.recent_steps]
    steps.sort(key=lambda rec: rec.ended_at)
    out = r.SchedStat(policy=first.policy, tenants=list(tenants.values()), recent_steps=steps[-RECENT_STEPS:],
                      clock=max(s.clock for s in stats.values()),
                      **{f: sum(getattr(s, f) for s in stats.values()) for f in _SCHED_SUMS})
    out.replicas = stats
    return out


def loop_status(answers: dict, dead: dict) -> r.LoopStatus:
    """Running while any replica's loop runs (the gateway serves on the live ones); the error names
    the replicas that are gone or whose loop stopped."""
    problems = [f"replica {i}: {why}" for i, why in sorted(dead.items())]
    problems += [f"replica {i}: {s.error}" for i, s in sorted(answers.items()) if s.error]
    idle = [s.idle_seconds for s in answers.values()]
    return r.LoopStatus(running=any(s.running for s in answers.values()),
                        paused=bool(answers) and all(s.paused for s in answers.values()),
                        steps=sum(s.steps for s in answers.values()),
                        idle_seconds=None if not idle or None in idle else min(idle),
                        error="; ".join(problems) or None)


def fsck(answers: dict) -> r.FsckReport:
    return r.FsckReport(**{f.name: sum(getattr(a, f.name) for a in answers.values())
                           for f in dataclasses.fields(r.FsckReport)})


def trace(handle, body: dict) -> list:
    """Step records after `since` (each replica's own step numbers) from every replica, by the time
    they ended. With a timeout and nothing new, the first replica to run a step answers."""
    cluster = handle.cluster
    quick = {**body, "timeout": 0.0}
    found = handle._gather("trace", quick)
    if not any(found.values()) and body.get("timeout"):
        refs = {cluster.submit(i, handle.tid, "trace", body): i for i in cluster.live()}
        if refs:
            ready, _ = cluster.ray.wait(list(refs), num_returns=1)
            i = refs[ready[0]]
            try:
                found = {i: cluster.collect(i, ready[0])}
            except KvosError:
                found = {}
    records = [step_record(i, rec) for i, recs in found.items() for rec in recs]
    records.sort(key=lambda rec: rec.ended_at)
    return records


class MergedLog:
    """One view's (root's, or a tenant's) merged feed -- the kernel log (dmesg) or the page-cache
    events (cacheevents) -- with the gateway's sequence numbers."""

    def __init__(self, syscall: str = "dmesg"):
        self.syscall = syscall
        self.lines = collections.deque(maxlen=LOG_LINES)
        self.cursor: dict = {}            # replica -> the last of its own seq pulled
        self.seq = 0
        self.lock = threading.Lock()

    def read(self, handle, since, limit) -> list:
        from kernel.argcheck import check_int
        check_int("since", since, 0)
        if limit is not None:
            check_int("limit", limit, 1, 1 << 20)
        cluster = handle.cluster
        with self.lock:
            refs = {i: cluster.submit(i, handle.tid, self.syscall, {"since": self.cursor.get(i, 0)})
                    for i in cluster.live()}
            fresh = []
            for i, ref in refs.items():
                try:
                    entries = cluster.collect(i, ref)
                except KvosError:
                    continue
                if entries:
                    self.cursor[i] = entries[-1].seq
                for e in entries:
                    e.replica = i
                    if getattr(e, "pid", None) is not None:
                        e.pid = gpids.to_global(i, e.pid)
                    fresh.append(e)
            fresh.sort(key=lambda e: getattr(e, "time", 0.0))        # a stable sort: events keep their order
            for e in fresh:
                self.seq += 1
                e.seq = self.seq
                self.lines.append(e)
            out = [e for e in self.lines if e.seq > since]
        return out if limit is None else out[:limit]
