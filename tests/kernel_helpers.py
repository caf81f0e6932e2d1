"""Helpers for kernel tests: seeded workloads on the tiny model, run to the end with fsck every step."""
import random

import kernel

TINY = "tiny-llama"
TINY_TOKEN_BYTES = 2 * 3 * 2 * 32 * 4        # layers x (K, V) x kv heads x head dim x float32
TINY_FRAME = 16 * TINY_TOKEN_BYTES           # one 16-token page of the tiny model


def frames(n: int) -> int:
    """Bytes of memory for n frames of the tiny model (16-token pages)."""
    return n * TINY_FRAME


def workload(n=32, seed=0, vocab=512, prompt=(5, 60), output=(4, 40)):
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(*prompt))], rng.randint(*output))
            for _ in range(n)]


def run_to_end(k, check=True, max_steps=100_000):
    steps = 0
    while k.step():
        steps += 1
        if check:
            k.fsck()
        assert steps < max_steps, "the kernel does not finish"
    k.fsck()
    return steps


def run_workload(jobs, *, policy="fcfs", check=True, **boot):
    """Spawn every job on one tiny-llama tenant, run to the end; returns (token lists, kernel)."""
    boot.setdefault("memory", frames(256))
    k = kernel.boot(policy=policy, **boot)
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    pids = [sys.spawn(tid, prompt, max_tokens=n, ignore_eos=True, temperature=0) for prompt, n in jobs]
    run_to_end(k, check)
    outputs = [sys.wait(pid).tokens for pid in pids]
    return outputs, k


def run_exits(jobs, tenant=TINY, **boot):
    """Spawn each job (prompt, spawn kwargs) on one tenant, run to the end (fsck every step); per job
    (its exit status, its logprob entries); every frame must be back. -> (list, kernel)"""
    boot.setdefault("memory", frames(64))
    k = kernel.boot(**boot)
    sys = k.syscalls()
    tid = sys.spawn_tenant(tenant)
    pids = [sys.spawn(tid, prompt, **kw) for prompt, kw in jobs]
    run_to_end(k)
    out = []
    for pid in pids:
        entries = sys.read(pid).logprobs
        out.append((sys.wait(pid), entries))
    assert_all_memory_back(k)
    return out, k


def assert_all_memory_back(k):
    k.fsck()
    info = k.syscalls().meminfo()
    assert info.free + info.cached == info.total - (1 if k.null_frame is not None else 0), info
    assert info.swap_used == 0


def turn_text(handle, pid: int, timeout: float = 30) -> str:
    """The text of an interactive process's current turn, read until the turn is done."""
    text = []
    while True:
        r = handle.read(pid, timeout=timeout)
        text.append(r.text)
        if r.turn_done:
            return "".join(text)
