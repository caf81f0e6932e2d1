"""What every lab's grader uses: points, the seed of this grading, the independent reference, a step cap.

For the graders in tests/labs/grade_*.py. The seed comes from $KVOS_LAB_SEED (`kvos lab grade`
draws one unless told), so workloads are chosen at grading time. Reference outputs come from the
model run directly on a frame pool by tests/helpers/paged_runner.py: no scheduler, no memory
manager, no batch builder of the kernel under test.
"""
from __future__ import annotations

import os
import random
import zlib
from functools import cache

import pytest

import kernel
from tests.kernel_helpers import TINY, frames

SEED = int(os.environ.get("KVOS_LAB_SEED", "0"))
MAX_STEPS = 5_000          # a livelock fails its test instead of hanging the grader


def points(n: int):
    """@points(3): what a test is worth."""
    return pytest.mark.points(n)


def rng(name: str) -> random.Random:
    """A generator for one test: this grading's seed and the test's own name."""
    return random.Random(SEED * 1_000_003 + zlib.crc32(name.encode()))


def jobs(r: random.Random, n: int, prompt=(3, 70), output=(2, 24), vocab=512) -> list:
    """n (prompt, max_tokens) pairs of random token ids."""
    return [([r.randrange(3, vocab) for _ in range(r.randint(*prompt))], r.randint(*output)) for _ in range(n)]


@cache
def _program():
    from kernel.devices import make_device
    from kernel.program import exec_program
    return exec_program(TINY, make_device("cpu"))


def reference(prompt: list, n: int) -> list:
    """The greedy continuation of `prompt`, n tokens, computed outside the kernel under test."""
    from tests.helpers.paged_runner import PagedRunner
    (tokens,), _ = PagedRunner(_program(), num_frames=-(-(len(prompt) + n) // 16) + 1).greedy([prompt], n)
    return tokens


def boot(pool: int = 256, **options):
    """A tiny-llama kernel of `pool` frames and its one tenant. -> (kernel, root handle, tid)"""
    k = kernel.boot(memory=frames(pool), **options)
    sys = k.syscalls()
    return k, sys, sys.spawn_tenant(TINY)


def fsck(target) -> None:
    """fsck by the pristine code, on a kernel (process table and memory) or a memory manager: the
    kernel's own fsck goes through a method of kernel/mm/memory.py, a file some labs hand out."""
    from kernel.mm.fsck import fsck as memory_fsck
    if hasattr(target, "procs"):
        target.fsck()
        target = target.mm
    memory_fsck(target)


def run_checked(k, max_steps: int = MAX_STEPS) -> int:
    """Step to the end with fsck after every step; fail past max_steps."""
    steps = 0
    while k.step():
        steps += 1
        fsck(k)
        assert steps < max_steps, f"no end after {max_steps} steps: a livelock?"
    fsck(k)
    return steps


def run_jobs(k, sys, tid, work: list) -> list:
    """Spawn greedy processes for (prompt, max_tokens) pairs, run them to the end (fsck every step);
    their outputs."""
    pids = [sys.spawn(tid, prompt, max_tokens=n, ignore_eos=True, temperature=0) for prompt, n in work]
    run_checked(k)
    return [sys.wait(pid).tokens for pid in pids]


def all_memory_back(k) -> None:
    fsck(k)
    info = k.syscalls().meminfo()
    assert info.free + info.cached == info.total - (1 if k.null_frame is not None else 0), info
    assert info.swap_used == 0, info
