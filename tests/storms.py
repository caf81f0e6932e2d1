"""Fault storms for the reliability tests and their report (python -m tests.storms [SCALE]).

Each storm runs a seeded workload on the tiny model while injecting faults,
then checks: fsck after every step, every frame back at the end, and every
greedy survivor's output equal to its clean run. Each returns the counts that
docs/reliability.md reports.
"""
import random
import sys as _sys
from collections import Counter

import torch

import kernel
from kernel.errors import KvosError
from kernel.program import Program
from tests.kernel_helpers import TINY, frames

GREEDY = dict(temperature=0, ignore_eos=True)


_CLEAN: dict = {}


def clean_output(prompt, max_tokens):
    """The greedy output of a prompt run alone in a fresh kernel (memoised)."""
    cache = _CLEAN
    key = (tuple(prompt), max_tokens)
    if key not in cache:
        k = kernel.boot(memory=frames(64))
        s = k.syscalls()
        tid = s.spawn_tenant(TINY)
        cache[key] = s.wait(s.spawn(tid, list(prompt), max_tokens=max_tokens, **GREEDY)).tokens
    return cache[key]


def check_survivors(k, expected: dict, counts: Counter) -> None:
    """expected: pid -> (full prompt, max_tokens). Compare every process that ran to its length."""
    for pid, (prompt, max_tokens) in expected.items():
        proc = k.procs.get(pid)
        if proc is None or proc.exit is None or proc.exit.reason != "length":
            continue
        counts["survivors checked"] += 1
        if proc.exit.tokens != clean_output(prompt, max_tokens):
            counts["mismatched outputs"] += 1


def alive(k) -> list:
    return [p for p in sorted(k.procs) if k.procs[p].alive and k.procs[p].builds_segment is None]


def leaked_frames(k) -> int:
    info = k.syscalls().meminfo()
    return info.total - info.free - info.cached + info.swap_used


def kill_storm(seed=0, rounds=150) -> Counter:
    """Spawn, fork, attach shm, and kill processes and whole tenants at random steps."""
    rng = random.Random(seed)
    counts = Counter()
    k = kernel.boot(memory=frames(10), swap=frames(4), token_budget=32, chunk=16)
    root = k.syscalls()
    tenants = [root.spawn_tenant(TINY, name=f"t{i}") for i in range(3)]
    segments = {}
    expected = {}
    for _ in range(rounds):
        tid = rng.choice([t for t in tenants if t in k.tenants] or [None])
        action = rng.random()
        if tid is None:
            tid = root.spawn_tenant(TINY)
            tenants.append(tid)
        elif action < 0.4:
            prompt = [rng.randrange(3, 500) for _ in range(rng.randint(3, 40))]
            n = rng.randint(2, 24)
            shm = segments.get(tid) if rng.random() < 0.3 else None
            try:
                pid = root.spawn(tid, prompt, max_tokens=n, shm=shm, **GREEDY)
                prefix = k.shm_segments[shm].tokens if shm is not None else []
                expected[pid] = (prefix + prompt, n)
            except KvosError:
                counts["spawns refused"] += 1
        elif action < 0.44 and tid not in segments:
            segments[tid] = root.shmget(tid, [rng.randrange(3, 500) for _ in range(rng.randint(5, 30))])
        elif action < 0.55 and alive(k):
            pid = rng.choice(alive(k))
            if pid in expected:
                for child in root.fork(pid, rng.randint(1, 2)):
                    expected[child] = expected[pid]        # greedy children continue identically
                counts["forks"] += 1
        elif action < 0.9 and alive(k):
            pid = rng.choice(alive(k))
            proc = k.procs[pid]
            counts[f"killed while {proc.state.value}/{proc.residency.value}"] += 1
            if proc.num_computed < proc.prompt_len:
                counts["killed mid-prefill"] += 1
            counts["processes killed"] += 1
            root.kill(pid)
        elif action < 0.92 and len([t for t in tenants if t in k.tenants]) > 1:
            counts["tenants killed"] += 1
            counts["processes killed"] += sum(1 for p in k.procs.values() if p.tenant.tid == tid and p.alive)
            root.kill_tenant(tid)
            segments.pop(tid, None)
        for _ in range(rng.randint(0, 2)):
            k.step()
            k.fsck()
    k.run()
    k.fsck()
    check_survivors(k, expected, counts)
    counts["preemptions survived"] += k.stats.preemptions
    counts["swap outs"] += k.stats.swap_outs
    counts["reclaims"] += k.stats.reclaims
    for seg in list(k.shm_segments):
        root.shmrm(seg)
    counts["frames leaked"] += leaked_frames(k)
    return counts


def memory_storm(pool_frames: int, swap_frames: int, seed=0, procs=12) -> Counter:
    """A workload on a pool of `pool_frames` frames and a swap area of `swap_frames`."""
    rng = random.Random(seed)
    counts = Counter()
    k = kernel.boot(memory=frames(pool_frames), swap=frames(swap_frames), token_budget=32)
    root = k.syscalls()
    tid = root.spawn_tenant(TINY)
    expected = {}
    for _ in range(procs):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(3, 50))]
        n = rng.randint(2, 30)
        try:
            expected[root.spawn(tid, prompt, max_tokens=n, **GREEDY)] = (prompt, n)
        except KvosError as err:
            counts[f"spawn refused {err.errno}"] += 1
    steps = 0
    while k.step():
        steps += 1
        k.fsck()
        assert steps < 20_000, "livelock: the kernel does not finish"
    done = 0
    for pid in expected:
        status = root.wait(pid)
        if status.reason == "length":
            done += 1
        elif status.error and "ENOMEM" in status.error:
            counts["ended ENOMEM (can never fit)"] += 1
    check_survivors(k, expected, counts)
    counts["completed"] += done
    counts["preemptions survived"] += k.stats.preemptions
    counts["max preemptions of one process"] = max([k.stats.preemptions and 0] + [
        p.preemptions for p in k.procs.values()])
    counts["frames leaked"] += leaked_frames(k)
    return counts


class FaultyProgram(Program):
    """tiny-llama whose forward pass raises on chosen calls (a model bug or a device fault)."""

    def __init__(self, fail_on: set):
        from userspace.programs.loader import load_program
        self.inner = load_program(TINY)
        for attr in ("kv_shape", "max_context", "vocab_size", "eos_token_ids", "cost"):
            setattr(self, attr, getattr(self.inner, attr))
        self.name, self.identity = "faulty-tiny", b"faulty-" + self.inner.identity
        self.fail_on, self.calls = set(fail_on), 0

    def forward(self, batch, kv):
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError(f"injected fault on forward call {self.calls}")
        return self.inner.forward(batch, kv)

    def encode(self, text):
        return self.inner.encode(text)

    def decode(self, ids):
        return self.inner.decode(ids)


def fault_storm(seed=0, faults=(3, 7, 12)) -> Counter:
    rng = random.Random(seed)
    counts = Counter()
    k = kernel.boot(memory=frames(40), swap=frames(8))
    root = k.syscalls()
    bad = root.spawn_tenant(FaultyProgram(set(faults)), name="faulty")
    good = root.spawn_tenant(TINY, name="healthy")
    expected, victims = {}, []
    for i in range(24):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(3, 30))]
        n = rng.randint(3, 20)
        if i % 2:
            expected[root.spawn(good, prompt, max_tokens=n, **GREEDY)] = (prompt, n)
        else:
            victims.append(root.spawn(bad, prompt, max_tokens=n, **GREEDY))
        k.step()
        k.fsck()
    k.run()
    k.fsck()
    counts["faults injected"] += len(faults)
    for pid in victims:
        status = root.wait(pid)
        counts[f"faulty tenant: {status.reason}"] += 1
    counts["fault messages in dmesg"] += sum(1 for e in root.dmesg() if e.event == "fault")
    check_survivors(k, expected, counts)
    counts["frames leaked"] += leaked_frames(k)
    return counts


def random_workload(ops=3000, seed=1) -> Counter:
    """Thousands of random operations across tenants: spawn, fork, write, nice, kill, shm, steps."""
    rng = random.Random(seed)
    counts = Counter()
    k = kernel.boot(memory=frames(24), swap=frames(10), token_budget=48, policy=rng.choice(["fcfs", "fair"]))
    root = k.syscalls()
    tids = [root.spawn_tenant(TINY, name=f"w{i}", weight=i + 1, mem_limit=frames(16)) for i in range(3)]
    expected = {}
    for _ in range(ops):
        counts["operations"] += 1
        op = rng.random()
        tid = rng.choice(tids)
        live = [p for p in sorted(k.procs) if k.procs[p].alive and k.procs[p].builds_segment is None]
        try:
            if op < 0.25:
                prompt = [rng.randrange(3, 500) for _ in range(rng.randint(1, 40))]
                n = rng.randint(1, 16)
                pid = root.spawn(tid, prompt, max_tokens=n, interactive=rng.random() < 0.1, **GREEDY)
                if not k.procs[pid].interactive:
                    expected[pid] = (prompt, n)
            elif op < 0.3 and live:
                pid = rng.choice(live)
                kids = root.fork(pid, rng.randint(1, 2))
                if pid in expected:
                    expected.update({c: expected[pid] for c in kids})
            elif op < 0.35 and live:
                root.write(rng.choice(live), [rng.randrange(3, 500)])
            elif op < 0.4 and live:
                root.nice(rng.choice(live), rng.randint(-5, 5))
            elif op < 0.48 and live:
                root.kill(rng.choice(live))
            elif op < 0.5:
                seg = root.shmget(tid, [rng.randrange(3, 500) for _ in range(rng.randint(2, 20))])
                if rng.random() < 0.5:
                    root.shmrm(seg)
            elif op < 0.55 and k.procs:
                pid = rng.choice(sorted(k.procs))
                if not k.procs[pid].alive:
                    root.wait(pid)
            else:
                k.step()
                counts["steps"] += 1
        except KvosError as err:
            counts[f"refused {err.errno}"] += 1
        k.fsck()
    k.run()
    k.fsck()
    check_survivors(k, expected, counts)
    for pid in [p for p in sorted(k.procs) if k.procs[p].alive and k.procs[p].builds_segment is None]:
        root.kill(pid)
    for seg in list(k.shm_segments):
        root.shmrm(seg)
    counts["preemptions survived"] += k.stats.preemptions
    counts["swap outs"] += k.stats.swap_outs
    counts["cow faults"] += k.mm.cow_faults
    counts["frames leaked"] += leaked_frames(k)
    return counts


def main(scale: float = 1.0):
    torch.set_num_threads(1)
    total = Counter()
    for seed in range(max(1, int(3 * scale))):
        total += kill_storm(seed)
        total += fault_storm(seed)
    for pool in (1, 2, 4, 8, 16):
        for swap in (0, 2, 8):
            total += memory_storm(pool, swap)
    total += random_workload(int(3000 * scale))
    for key in ("frames leaked", "mismatched outputs"):      # zero counts are the point: print them
        total.setdefault(key, 0)
    for key in sorted(total):
        print(f"{key:>40}: {total[key]}")
    from tests import test_reliability_fuzz as fuzz
    fuzz.TestSyscallFuzzer().runTest()
    print(f"\nsyscall fuzzer: {fuzz.STATS['calls']} calls, {fuzz.STATS['refused']} refused with KvosError "
          f"{dict(sorted(fuzz.STATS['by_errno'].items()))}")
    for name, n in sorted(fuzz.STATS["per_syscall"].items()):
        print(f"{name:>40}: {n} calls")


if __name__ == "__main__":
    main(float(_sys.argv[1]) if len(_sys.argv) > 1 else 1.0)
