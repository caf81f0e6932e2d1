"""Tenants: a running model with a memory cgroup, a weight and limits (a cgroup of processes)."""
from __future__ import annotations

from dataclasses import dataclass, field

# Defaults for the per-tenant limits (docs/reliability.md lists them).
DEFAULT_MAX_PROCS = 1024         # processes held per tenant, zombies included (RLIMIT_NPROC): EAGAIN beyond
DEFAULT_MAX_QUEUED = 4096        # processes waiting for admission per tenant: load shedding, EAGAIN
DEFAULT_MAX_BLOCKED = 1024       # blocking calls and watches (wait, read with a timeout) in flight: EAGAIN
NICE_MIN, NICE_MAX = -20, 19


@dataclass(eq=False)          # identity: one object per tenant/process
class Tenant:
    tid: int
    name: str
    program: object                  # kernel.program.Program, shared with tenants running the same model
    cgid: int                        # memory cgroup in the memory manager
    weight: float = 1.0
    prefix_sharing: str = "tenant"   # "tenant": names salted per tenant; "global": shared namespace
    namespace: bytes = b""           # root of this tenant's page names
    page_size: int = 16              # tokens per frame for this program
    max_procs: int = DEFAULT_MAX_PROCS
    max_queued: int = DEFAULT_MAX_QUEUED
    max_blocked: int = DEFAULT_MAX_BLOCKED
    nice_min: int = NICE_MIN         # the lowest nice value its processes may ask for
    mem_limit: int | None = None     # frames
    max_prompt_tokens: int = 0       # longest input a process may hold (default: the model's context - 1)
    max_new_tokens: int = 0          # largest max_tokens per turn (default: the model's context)
    # the scheduler owns these
    served_tokens: int = 0           # prefill + decode tokens computed for this tenant
    virtual_tokens: float = 0.0      # the fair policy's counter (served / weight, lifted on activation)
    pids: set = field(default_factory=set)     # its processes in the table, zombies included
    num_live: int = 0                # of them, processes not yet exited
    # the syscall layer owns these
    blocked: int = 0                 # blocking calls in flight
    alive: bool = True
