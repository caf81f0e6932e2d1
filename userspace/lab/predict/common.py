"""What the questions share: a kernel on the simulated device, held through its root handle, and steps."""
from __future__ import annotations

import kernel

GPU = "sim:a100-80g"


def boot(model: str = "llama-2-7b", device: str = GPU, **options):
    """A simulated-device kernel in manual mode (steps run when asked) and one tenant. -> (root, tid)"""
    k = kernel.boot(device=device, **options)
    root = k.syscalls()
    return root, root.spawn_tenant(model, max_procs=1 << 16)


def step(root) -> object:
    """Run the next step (trace with a timeout runs it when no loop thread does); its record."""
    records = root.trace(since=root.schedstat().steps, timeout=30.0)
    if not records:
        raise RuntimeError("nothing is runnable")
    return records[-1]


def prompt(i: int, length: int) -> list:
    """Distinct token ids for process i (no page-cache hits between questions' processes)."""
    return [3 + (i * 7919 + j) % 31_000 for j in range(length)]
