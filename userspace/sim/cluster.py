"""`kvos sim cluster`: N simulated kernels behind the router, on the multi-turn `sessions` workload.

Each replica is a whole sim kernel in manual mode with its own virtual clock, driven through
syscalls only (spawn, trace, wait, loopctl "idle", cacheevents). The loop keeps one cluster
time: the next turn's arrival is dispatched once every busy replica's clock has reached it;
otherwise the busy replica whose clock is smallest runs its next step. So no replica runs ahead
of a request it could have received, and replicas are stepped in time order.

Every replica's tenant gets the same cache_salt, so page names agree across replicas and the
prefix_events policy can match a prompt's pages by name. A turn goes where the router says; its
reply (the tokens wait() returns) joins the history of the session's next turn.
Per run: output_tok_s (output tokens over the makespan), prefix_hit_rate (prompt tokens mapped
from the page caches at a turn's first step, over prompt tokens; mapping its own pages back
after a preemption is not a hit), ttft_p50/p99 (seconds, arrival to first token) and
load_imbalance (the busiest replica's device seconds over the mean).
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

import numpy as np

import kernel
from userspace.cluster import Router
from userspace.cluster.router import kernel_namer
from userspace.sim.sessions import generate, stats, system_tokens, user_tokens

STEP_TIMEOUT = 60.0
SALT = "kvos-sim-sessions"


@dataclass
class Turn:
    session: int
    index: int
    arrival: float
    prompt_len: int
    replica: int = -1
    first_token: float | None = None
    finished: float | None = None
    hit: int | None = None       # prompt tokens mapped from the page cache: where its first computed chunk began


@dataclass
class Replica:
    """One sim kernel: its root handle, tenant, clock (seconds since the run began) and live turns."""
    sys: object
    tid: int
    t0: float
    cursor: int
    clock: float = 0.0
    events_seen: int = 0
    live: dict = field(default_factory=dict)     # pid -> Turn


def boot_replicas(n: int, gpu: str, model: str, **options) -> list:
    replicas = []
    for _ in range(n):
        root = kernel.boot(device=f"sim:{gpu}", **options).syscalls()
        tid = root.spawn_tenant(model, max_procs=1 << 20, cache_salt=SALT)
        stat = root.schedstat()
        replicas.append(Replica(root, tid, stat.clock, stat.steps))
    return replicas


def run_cluster(replicas: int, policy: str, *, sessions: int | None = None, per_replica: int = 24,
                rate: float | None = None, gpu: str = "a100-80g", model: str = "llama-2-7b", seed: int = 0,
                think: float = 1.0, turns: float = 4.0, systems: int = 8, router_options: dict | None = None,
                shape: dict | None = None, **boot) -> dict:
    """One run: `sessions` (default per_replica x replicas) sessions, arriving at `rate`
    sessions/s (None: all at once), over `replicas` kernels routed by `policy`. shape: more of
    sessions.generate's options (system_len, user_len, output_len, popularity)."""
    started = time.perf_counter()
    reps = boot_replicas(replicas, gpu, model, **boot)
    info = reps[0].sys.tenantinfo(reps[0].tid)
    workload, system_lens = generate(sessions or per_replica * replicas, rate=rate, seed=seed, systems=systems,
                                     turns=turns, think=think, max_context=info.max_context, **(shape or {}))
    options = dict(router_options or {})
    if policy == "prefix_events":
        options["namer"] = kernel_namer({0: info.page_namespace}, {0: info.page_size})
    elif policy == "cache_aware":
        options.setdefault("block", info.page_size)
        mem = reps[0].sys.meminfo()
        options.setdefault("capacity", mem.total)
    router = Router(replicas, policy, **options)
    systems_ids = {i: system_tokens(i, n, info.vocab_size, seed) for i, n in system_lens.items()}
    history = {s.index: list(systems_ids[s.system_id]) for s in workload}
    arrivals = [(s.arrival, s.index, 0) for s in workload]
    heapq.heapify(arrivals)
    turns_done, out_tokens, prompt_tokens = [], 0, 0
    while True:
        busy = [r for r in reps if r.live]
        low = min(busy, key=lambda r: r.clock) if busy else None
        if arrivals and (low is None or arrivals[0][0] <= low.clock):
            t, s, k = heapq.heappop(arrivals)
            session = workload[s]
            user_len, reply_len = session.turns[k]
            tokens = history[s] + user_tokens(s, k, user_len, info.vocab_size, seed)
            r = router.route(0, tokens)
            rep = reps[r]
            if not rep.live and rep.clock < t:
                rep.sys.loopctl("idle", until=rep.t0 + t)
                rep.clock = t
            pid = rep.sys.spawn(rep.tid, tokens, max_tokens=reply_len, ignore_eos=True, seed=s * 64 + k)
            router.on_dispatch(r)
            rep.live[pid] = Turn(s, k, t, len(tokens), r)
            history[s] = tokens
            prompt_tokens += len(tokens)
            continue
        if low is None:
            break
        records = low.sys.trace(since=low.cursor, timeout=STEP_TIMEOUT)
        if not records:
            raise RuntimeError(f"replica {reps.index(low)}: {len(low.live)} processes live but nothing runs")
        r = reps.index(low)
        for record in records:
            low.cursor, low.clock = record.step, record.ended_at - low.t0
            for work in record.works:
                turn = low.live.get(work.pid)
                if turn is None:
                    continue
                if turn.hit is None:
                    turn.hit = work.start
                if work.token is not None and turn.first_token is None:
                    turn.first_token = low.clock
            for pid, _ in record.exits:
                turn = low.live.pop(pid, None)
                if turn is None:
                    continue
                status = low.sys.wait(pid)
                turn.finished = low.clock
                out_tokens += len(status.tokens)
                history[turn.session] = history[turn.session] + list(status.tokens)
                router.on_finish(r)
                turns_done.append(turn)
                session = workload[turn.session]
                if turn.index + 1 < len(session.turns):
                    heapq.heappush(arrivals, (low.clock + session.thinks[turn.index], turn.session, turn.index + 1))
            router.update_load(r, record.running, record.waiting)
        if policy == "prefix_events":
            events = low.sys.cacheevents(since=low.events_seen)
            if events:
                router.apply_events(r, events)
                low.events_seen = events[-1].seq
    return _summary(reps, router, workload, system_lens, turns_done, out_tokens, prompt_tokens,
                    time.perf_counter() - started, policy, gpu, model)


def _summary(reps, router, workload, system_lens, turns, out_tokens, prompt_tokens, wall, policy, gpu, model):
    makespan = max(t.finished for t in turns)
    ttft = np.array([t.first_token - t.arrival for t in turns])
    stats_ = [r.sys.schedstat() for r in reps]
    for r in reps:
        r.sys.fsck()
    busy = np.array([s.busy_seconds for s in stats_])
    cached = sum(t.hit for t in turns)
    return {
        "policy": policy, "replicas": len(reps), "gpu": gpu, "model": model,
        "workload": stats(workload, system_lens),
        "output_tok_s": out_tokens / makespan if makespan else 0.0,
        "prefix_hit_rate": cached / prompt_tokens if prompt_tokens else 0.0,
        "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
        "load_imbalance": float(busy.max() / busy.mean()) if busy.mean() else 1.0,
        "makespan_s": makespan, "turns": len(turns), "output_tokens": out_tokens, "prompt_tokens": prompt_tokens,
        "preemptions": sum(s.preemptions for s in stats_), "reclaims": sum(s.reclaims for s in stats_),
        "recomputed_tokens": sum(s.recomputed_tokens for s in stats_), "steps": sum(s.steps for s in stats_),
        "routed": list(router.routed), "wall_s": wall,
    }
