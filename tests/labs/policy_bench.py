"""The fair lab's part two: a policy run on a simulated trace of two tenants, scored like malloc lab.

For tests/labs/grade_fair.py. Two tenants share a simulated A100 under a small KV pool: `chat`
(weight 2: requests arriving all along, short prompts) and `batch` (weight 1: a flood of long
requests at the start). Measured off the step records, in virtual seconds: time to first token
(p99 over all requests) and the isolation fair share promises (the mean time to first token of the chat tenant,
whose demand stays within its share: it should not wait behind the flood). fsck runs after every
step.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass

import kernel
from tests.labs.grading import fsck


@dataclass
class Run:
    ttft_p99: float          # over every request
    chat_ttft_mean: float    # over the requests of the tenant within its share
    steps: int


def trace(seed: int) -> list:
    """(arrival, tenant, prompt_len, output_len), sorted by arrival."""
    r = random.Random(seed)
    reqs = [(r.uniform(0.0, 0.5), "batch", r.randint(300, 900), r.randint(100, 250)) for _ in range(40)]
    t = 0.0
    for _ in range(80):
        t += r.expovariate(8.0)
        reqs.append((t, "chat", r.randint(40, 250), r.randint(20, 80)))
    return sorted(reqs)


def run(policy, seed: int, max_steps: int = 20_000) -> Run:
    k = kernel.boot(device="sim:a100-80g", frames=160, swap_frames=64, policy=policy, token_budget=512,
                    max_running=24)
    root = k.syscalls()
    tids = {"chat": root.spawn_tenant("llama-2-7b", name="chat", weight=2, max_procs=4096),
            "batch": root.spawn_tenant("llama-2-7b", name="batch", weight=1, max_procs=4096)}
    reqs = trace(seed)
    spawned, first, owner = {}, {}, {}
    since, nxt, steps, t0 = root.schedstat().steps, 0, 0, root.schedstat().clock
    now = 0.0
    while True:
        while nxt < len(reqs) and reqs[nxt][0] <= now:
            arrival, tenant, plen, olen = reqs[nxt]
            prompt = [(nxt * 7919 + i) % 31_000 + 3 for i in range(plen)]
            pid = root.spawn(tids[tenant], prompt, max_tokens=olen, ignore_eos=True)
            spawned[pid], owner[pid] = arrival, tids[tenant]
            nxt += 1
        ps = root.ps()
        live = {p.tid for p in ps if p.state != "zombie"}
        if not live and nxt == len(reqs):
            break
        if not live:
            root.loopctl("idle", until=t0 + reqs[nxt][0])
            now = reqs[nxt][0]
            continue
        record = root.trace(since=since, timeout=5.0)[-1]
        since, steps = record.step, steps + 1
        fsck(k)
        now = record.ended_at - t0
        for w in record.works:
            if w.token is not None and w.pid not in first:
                first[w.pid] = now - spawned[w.pid]
        for pid, _ in record.exits:
            root.wait(pid)
        if steps > max_steps:
            raise AssertionError(f"no end after {max_steps} steps")
    chat = [first[p] for p in first if owner[p] == tids["chat"]]
    return Run(p99(list(first.values())), sum(chat) / len(chat), steps)


def p99(values: list) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(0.99 * len(values)))]


def yardstick(seed: int) -> Run:
    """FairShare's run of the trace, by the pristine project: in a subprocess of it when
    $KVOS_LAB_PRISTINE names one (the tree being graded holds the student's FairShare), else here."""
    root = os.environ.get("KVOS_LAB_PRISTINE")
    if not root:
        return run("fair", seed)
    code = ("import json, sys; from tests.labs.policy_bench import run; "
            "print(json.dumps(vars(run('fair', int(sys.argv[1])))))")
    out = subprocess.run([sys.executable, "-c", code, str(seed)], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": root}, timeout=600)
    if out.returncode:
        raise RuntimeError(f"the yardstick failed in {root}: {out.stderr.strip()[-500:]}")
    return Run(**json.loads(out.stdout.strip().splitlines()[-1]))


def score(you: Run, fair: Run) -> float:
    """Out of 1, like malloc lab's performance index: half for the p99 time to first token over all
    requests (full at 0.85 x FairShare's or less: the reference policy does better still), half for
    the chat tenant's mean (full within 2 x FairShare's: serving the flood's first tokens sooner makes
    its steps longer, and the reference FairTTFT's chat mean is 0.35 to 1.6 x FairShare's; first come,
    first served is 10 x and more)."""
    return 0.5 * min(1.0, 0.85 * fair.ttft_p99 / you.ttft_p99) + \
        0.5 * min(1.0, 2.0 * fair.chat_ttft_mean / you.chat_ttft_mean)
