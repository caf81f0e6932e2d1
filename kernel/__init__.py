"""kvos kernel: the public names.

    k = kernel.boot(device="cpu", memory="256MiB")
    sys = k.syscalls()                    # root; k.syscalls(as_tenant=tid) for one tenant
    tid = sys.spawn_tenant("smollm2-135m")
    pid = sys.spawn(tid, "Hello", max_tokens=32)
    print(sys.wait(pid).text)
"""
from typing import TYPE_CHECKING

from kernel import results
from kernel.errors import KernelPanic, KvosError
from kernel.proc import State
from kernel.results import *  # noqa: F403  (every result type is a public name)
from kernel.sched.policies import FCFS, FairShare, Policy, PriorityPolicy, StaticBatching
from kernel.syscalls import SYSCALLS

if TYPE_CHECKING:
    from kernel.kernel import Kernel


def __getattr__(name: str):
    # The kernel proper imports torch: loaded on first use, so a daemon client (which needs the
    # errors, the syscall table and the result types) starts without it, a second sooner here.
    if name == "Kernel":
        from kernel.kernel import Kernel
        return Kernel
    raise AttributeError(f"module 'kernel' has no attribute {name!r}")


def boot(device="cpu", memory=None, page_size=16, policy="fcfs", token_budget=512, swap="1GiB",
         **options) -> "Kernel":
    """Boot a kernel.

    memory: KV bytes ("256MiB"); None takes the device's default (256 MiB on the CPU, 80% of
    free GPU memory on CUDA, what the GPU preset leaves after the weights on sim).
    frames / swap_frames: the pool and the swap area in frames of the first tenant's pages, instead
    of memory / swap in bytes (a pool sized to a model without loading it first).
    Options: chunk (max tokens of one process per step, default token_budget), max_running
    (batch size bound), frame_bytes (default: page_size tokens of the first tenant's model),
    alloc ("paged" | "prealloc"), batch ("ragged" | "padded"), watermark (free frames kept at
    admission), threads (CPU threads for torch and the C kernels), seed, pids ("sequential", or
    "random": ids that tell a tenant nothing of the others' activity), loop (True: steps run in a
    thread of their own from boot on; otherwise waiting syscalls drive them), tp (tensor parallel:
    device "cpu" split over tp processes, one kernel; memory and threads are then per rank;
    docs/cluster-tp.md), graphs (False; True: pure-decode steps run padded in static buffers, replayed
    from CUDA graphs on a GPU; "eager": the same without capture; docs/kernels.md section 7), speculate
    (0; k: a decoding process whose last tokens occurred earlier in its file computes up to k of the
    tokens that followed them in the same step, and keeps those its draws match: kernel/speculate.py;
    on the simulator, drafts are kept by the device's draft_acceptance), speculate_batch (8: steps with
    more decoding processes than this draft for none).

    The booted Kernel is held by whoever booted it: userspace uses only its syscalls() handles
    (and the daemon its shutdown()); everything else of it is the kernel's own.
    """
    from kernel.kernel import Kernel
    return Kernel(device=device, memory=memory, page_size=page_size, policy=policy,
                  token_budget=token_budget, swap=swap, **options)


__all__ = ["boot", "Kernel", "KvosError", "KernelPanic", "State", "SYSCALLS",
           "Policy", "FCFS", "PriorityPolicy", "FairShare", "StaticBatching", *results.__all__]
