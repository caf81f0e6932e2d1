"""The router hop's CPU cost per request: route() + on_dispatch() + on_finish() for each policy.

Prompts are the sessions workload's (system prompt, history, new message; about 2,000 tokens);
prefix_events gets a replica's worth of publish events to match against. Policies run
interleaved, in rounds, and the table gives each one's median per request and its ratio to
round_robin's measured in the same rounds (a 2-core machine shared with other work is noisy).

    .venv/bin/python benchmarks/bench_router.py [--replicas 8] [--requests 2000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

from userspace.cluster import POLICIES, Router
from userspace.cluster.router import kernel_namer
from userspace.sim.sessions import generate, system_tokens, user_tokens


@dataclass
class Ev:
    seq: int
    kind: str
    page: str


def prompts(n: int) -> list:
    sessions, systems = generate(n, seed=0)
    out = []
    for s in sessions:
        history = system_tokens(s.system_id, systems[s.system_id], 32000)
        for k, (u, o) in enumerate(s.turns):
            history = history + user_tokens(s.index, k, u, 32000)
            out.append(history)
            history = history + [31999] * o
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    reqs = prompts(args.requests)
    namer = kernel_namer({0: "00" * 16}, {0: 16})
    times = {p: [] for p in POLICIES}
    for _ in range(args.rounds):
        for policy in POLICIES:
            opts = {"namer": namer} if policy == "prefix_events" else {}
            router = Router(args.replicas, policy, **opts)
            if policy == "prefix_events":
                for r in range(args.replicas):     # each replica holds an eighth of the prompts' pages
                    names = {n for ids in reqs[r::args.replicas] for n in namer(0, ids)[0]}
                    router.apply_events(r, [Ev(i + 1, "publish", n) for i, n in enumerate(sorted(names))])
            t = time.perf_counter()
            for ids in reqs:
                r = router.route(0, ids)
                router.on_dispatch(r)
                router.on_finish(r)
            times[policy].append((time.perf_counter() - t) / len(reqs))
    mean_len = sum(map(len, reqs)) / len(reqs)
    print(f"router hop per request, {args.replicas} replicas, {len(reqs)} prompts of {mean_len:.0f} tokens "
          f"on average, median of {args.rounds} interleaved rounds")
    base = statistics.median(times["round_robin"])
    for policy, ts in times.items():
        m = statistics.median(ts)
        print(f"  {policy:14s} {m * 1e6:9.1f} us   x{m / base:7.1f} round_robin")


if __name__ == "__main__":
    main()
