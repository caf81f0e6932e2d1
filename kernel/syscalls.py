"""The syscall table: the one door from userspace into the kernel (DESIGN section 4).

SYSCALLS maps each name to its handler. A handler receives the kernel and the
calling tenant (None for root), decodes and validates its arguments, then calls
the mechanism. Every failure is a KvosError raised before anything changed.
SyscallHandle is generated from the table; the CLI and the daemon are built
on the same table.
"""
from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass

from kernel.argcheck import (
    check_fits,
    check_int,
    check_number,
    check_priority,
    check_room_for,
    proc_of,
    prompt_tokens,
    segment_of,
    tenant_of,
)
from kernel.errors import E2BIG, EAGAIN, EBUSY, EINVAL, EPERM, ESRCH, KernelPanic, KvosError
from kernel.proc import Residency, State
from kernel.results import ProcInfo, ReadResult, SchedStat, TenantSched
from kernel.sampling import SamplingParams
from kernel.tenant import DEFAULT_MAX_PROCS, DEFAULT_MAX_QUEUED, NICE_MAX, NICE_MIN


@dataclass(frozen=True)
class Syscall:
    name: str
    handler: object
    root_only: bool
    blocking: bool
    doc: str
    signature: inspect.Signature         # the handler's, checked before every call


SYSCALLS: dict = {}


def syscall(name: str, root_only: bool = False, blocking: bool = False):
    def register(handler):
        SYSCALLS[name] = Syscall(name, handler, root_only, blocking, inspect.getdoc(handler) or "",
                                 inspect.signature(handler))
        return handler
    return register


# -- tenants ----------------------------------------------------------------------------------------
@syscall("spawn_tenant", root_only=True)
def sys_spawn_tenant(kernel, caller, model, *, name=None, mem_limit=None, weight=1, prefix_sharing="tenant",
                     max_procs=DEFAULT_MAX_PROCS, max_queued=DEFAULT_MAX_QUEUED, nice_min=NICE_MIN,
                     max_prompt_tokens=None, max_new_tokens=None):
    """Load a model program (weights shared with tenants already running it) and create its cgroup. -> tid

    Limits: mem_limit (bytes), max_procs (live processes), max_queued (waiting for admission),
    nice_min (the lowest priority value its processes may take), max_prompt_tokens and
    max_new_tokens (per process; default the model's context)."""
    if name is not None and (not isinstance(name, str) or not name or len(name) > 64):
        raise KvosError(EINVAL, f"name must be a string of 1 to 64 characters, got {name!r}")
    if name is not None and any(t.name == name for t in kernel.tenants.values()):
        raise KvosError(EINVAL, f"a tenant named {name!r} exists")
    check_number("weight", weight, 1e-6, 1e6)
    if prefix_sharing not in ("tenant", "global"):
        raise KvosError(EINVAL, f"prefix_sharing must be 'tenant' or 'global', got {prefix_sharing!r}")
    check_int("max_procs", max_procs, 1, 1 << 20)
    check_int("max_queued", max_queued, 1, 1 << 20)
    check_int("nice_min", nice_min, NICE_MIN, NICE_MAX)
    for key, value in (("max_prompt_tokens", max_prompt_tokens), ("max_new_tokens", max_new_tokens)):
        if value is not None:
            check_int(key, value, 1, 1 << 30)
    return kernel.create_tenant(model, name, mem_limit, weight, prefix_sharing, max_procs, nice_min, max_queued,
                                max_prompt_tokens, max_new_tokens).tid


@syscall("kill_tenant", root_only=True)
def sys_kill_tenant(kernel, caller, tid):
    """End every process of a tenant, remove its segments and its cgroup."""
    kernel.remove_tenant(tenant_of(kernel, caller, tid))


# -- processes ----------------------------------------------------------------------------------------
@syscall("spawn")
def sys_spawn(kernel, caller, tid, prompt, *, priority=0, shm=None, interactive=False, **sampling):
    """A new process running `prompt` (text, token ids or a chat). It waits in the run queue until admitted. -> pid

    Sampling keys: max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, ignore_eos,
    logprobs. interactive=True: the process sleeps after each turn and write() starts the next.
    """
    tenant = tenant_of(kernel, caller, tid)
    params = SamplingParams.from_kwargs(**sampling)
    params.check_vocab(tenant.program.vocab_size)
    check_priority(tenant, caller, priority)
    if not isinstance(interactive, bool):
        raise KvosError(EINVAL, f"interactive must be True or False, got {interactive!r}")
    if params.max_tokens == 0 and not interactive:
        raise KvosError(EINVAL, "max_tokens must be at least 1 (0 is for interactive processes)")
    prefix = []
    if shm is not None:                  # the segment must be the target tenant's, even for root
        prefix = segment_of(kernel, tenant, shm, "shm").tokens
    if params.max_tokens > tenant.max_new_tokens:
        raise KvosError(E2BIG, f"max_tokens {params.max_tokens} exceeds tenant {tenant.name!r}'s limit "
                               f"of {tenant.max_new_tokens}")
    ids = prefix + prompt_tokens(tenant.program, prompt)
    check_fits(kernel, tenant, len(ids), "prompt")
    check_room_for(kernel, tenant, 1)
    proc = kernel.create_process(tenant, ids, params, priority, interactive, shm, params.seed)
    kernel.log("spawn", f"pid {proc.pid}: {len(ids)} prompt tokens, max_tokens {params.max_tokens}", proc=proc)
    return proc.pid


@syscall("spawn_n")
def sys_spawn_n(kernel, caller, tid, prompt, n, *, priority=0, shm=None, interactive=False, **sampling):
    """spawn, then fork the new process n - 1 times, in one call: no step runs in between, so the
    n processes share the prompt's pages and nothing else (n samples of one prompt). The first pid
    is the parent. A refused call leaves no process behind. -> [pid]"""
    check_int("n", n, 1, 1024)
    check_room_for(kernel, tenant_of(kernel, caller, tid), n)
    pid = sys_spawn(kernel, caller, tid, prompt, priority=priority, shm=shm, interactive=interactive, **sampling)
    if n == 1:
        return [pid]
    try:
        return [pid] + sys_fork(kernel, caller, pid, n - 1)
    except KvosError:
        proc = kernel.procs[pid]
        kernel.exit_process(proc, "killed")
        kernel.reap(proc)
        raise


@syscall("fork")
def sys_fork(kernel, caller, pid, n=1):
    """n children sharing every page of the process copy-on-write, each with its own seed. -> [pid]"""
    proc = proc_of(kernel, caller, pid)
    check_int("n", n, 1, 1024)
    if not proc.alive:
        raise KvosError(ESRCH, f"process {pid} has exited")
    if proc.builds_segment is not None:
        raise KvosError(EPERM, f"process {pid} is a kernel shm builder")
    check_room_for(kernel, proc.tenant, n)
    return [c.pid for c in kernel.fork_process(proc, n)]


@syscall("write")
def sys_write(kernel, caller, pid, prompt):
    """Append input to a sleeping interactive process and start its next turn; its pages stay."""
    proc = proc_of(kernel, caller, pid)
    if not proc.alive:
        raise KvosError(ESRCH, f"process {pid} has exited")
    if not proc.interactive:
        raise KvosError(EINVAL, f"process {pid} was not spawned interactive; it takes no more input")
    if proc.state != State.SLEEPING:
        raise KvosError(EBUSY, f"process {pid} is in the middle of a turn ({proc.state.value})")
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        prompt_tokens(proc.tenant.program, prompt, "input")          # validates the messages
        from kernel.chat import chat_continuation
        ids = chat_continuation(proc.tenant.program, prompt, proc.tokens[-1] if proc.output else None)
    else:
        ids = prompt_tokens(proc.tenant.program, prompt, "input")
    check_fits(kernel, proc.tenant, len(proc.tokens) + len(ids), "process with its new input")
    kernel.wake(proc, ids)


def _block(kernel, until, timeout) -> bool:
    """Wait until until() holds, stepping the kernel when no loop thread runs it. False on
    timeout or when nothing can make progress."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with kernel.lock:
        while not until():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            loop = kernel.loop_thread
            if loop is not None and loop.is_alive() and loop is not threading.current_thread():
                kernel.changed.wait(remaining if remaining is not None else 1.0)
            elif not kernel.step() and not until():
                return False
        return True


@syscall("read", blocking=True)
def sys_read(kernel, caller, pid, timeout=0.0):
    """What the process produced since the last read; waits up to `timeout` seconds for something new."""
    with kernel.lock:       # held throughout: a read woken by a step's end takes its tokens before the next step
        proc = proc_of(kernel, caller, pid)
        if timeout is not None:
            check_number("timeout", timeout, 0.0)
        start = proc.read_offset
        if timeout:
            _block(kernel, lambda: len(proc.output) > start or proc.turn_done or not proc.alive, timeout)
        detok = kernel.detokenizer(proc)
        generated = proc.generated_tokens
        detok.add(generated, final=proc.turn_done or not proc.alive)
        text_from = getattr(proc, "text_offset", 0)
        visible = detok.visible
        proc.text_offset = len(visible)
        new = generated[start:]
        proc.read_offset = len(generated)
        logprobs = proc.logprobs[getattr(proc, "logprob_offset", 0):]
        proc.logprob_offset = len(proc.logprobs)
        return ReadResult(pid, new, visible[text_from:], proc.state.value, proc.turn_done or not proc.alive,
                          proc.exit.reason if proc.exit else getattr(proc, "last_reason", None), logprobs)


@syscall("wait", blocking=True)
def sys_wait(kernel, caller, pid, timeout=None):
    """Until the process exits; returns its exit status and reaps it. A sleeping interactive
    process has its input closed: it exits with the reason of its last turn."""
    with kernel.lock:       # held throughout, as in read (the condition wait lets the loop in)
        proc = proc_of(kernel, caller, pid)
        if timeout is not None:
            check_number("timeout", timeout, 0.0)
        done = _block(kernel, lambda: not proc.alive or proc.state == State.SLEEPING, timeout)
        if proc.state == State.SLEEPING:
            kernel.exit_process(proc, getattr(proc, "last_reason", "stop"))
        if proc.alive:
            if not done and timeout is not None:
                raise KvosError(EAGAIN, f"process {pid} still runs after {timeout} s")
            raise KernelPanic(f"wait: process {pid} ({proc.state.value}) cannot make progress")
        kernel.reap(proc)
        return proc.exit


@syscall("kill")
def sys_kill(kernel, caller, pid):
    """End a process now; its frames go back (full pages may stay in the page cache)."""
    proc = proc_of(kernel, caller, pid)
    if proc.builds_segment is not None:
        raise KvosError(EPERM, f"process {pid} is a kernel shm builder; use shmrm")
    kernel.exit_process(proc, "killed")


@syscall("nice")
def sys_nice(kernel, caller, pid, inc):
    """Change a process's priority by inc (lower runs first under the priority policy). -> new value"""
    proc = proc_of(kernel, caller, pid)
    check_int("inc", inc, -40, 40)
    value = max(NICE_MIN, min(NICE_MAX, proc.priority + inc))
    if caller is not None and value < proc.tenant.nice_min:
        raise KvosError(EPERM, f"priority {value} is below tenant {proc.tenant.name!r}'s floor "
                               f"{proc.tenant.nice_min}")
    proc.priority = value
    return value


# -- shared prefixes ------------------------------------------------------------------------------------
@syscall("shmget")
def sys_shmget(kernel, caller, tid, prompt):
    """Prefill `prompt` once and pin it as a shared prefix; spawn(..., shm=shmid) attaches it. -> shmid"""
    tenant = tenant_of(kernel, caller, tid)
    ids = prompt_tokens(tenant.program, prompt)
    check_fits(kernel, tenant, len(ids), "segment")
    check_room_for(kernel, tenant, 1)
    return kernel.create_segment(tenant, ids).shmid


@syscall("shmrm")
def sys_shmrm(kernel, caller, shmid):
    """Unpin a shared prefix; processes attached to it keep their pages."""
    kernel.remove_segment(segment_of(kernel, caller, shmid))


# -- /proc ---------------------------------------------------------------------------------------------
def _proc_info(kernel, proc) -> ProcInfo:
    pages = shared = swapped = 0
    if proc.asid is not None:
        space = kernel.mm.space(proc.asid)
        if space.is_swapped:
            swapped = pages = len(space.swap_slots)
        else:
            pages = len(space.frames)
            shared = sum(1 for f in space.frames if kernel.mm.frames.refcount[f] > 1)
    generated = len(proc.output)
    rate = 0.0
    if proc.first_token_at and proc.last_token_at and generated > 1:
        span = proc.last_token_at - proc.first_token_at
        rate = (generated - 1) / span if span > 0 else 0.0
    return ProcInfo(proc.pid, proc.tenant.tid, proc.tenant.name, proc.state.value, proc.residency.value,
                    proc.priority, proc.prompt_len, generated, proc.num_computed, pages, shared, swapped,
                    proc.cow_faults, proc.preemptions, rate,
                    (proc.first_token_at - proc.spawned_at) if proc.first_token_at else None)


@syscall("ps")
def sys_ps(kernel, caller):
    """Every process the caller may see. -> [ProcInfo]"""
    return [_proc_info(kernel, p) for p in kernel.procs.values() if caller is None or p.tenant is caller]


@syscall("pagemap")
def sys_pagemap(kernel, caller, pid, text=False):
    """A process's page table: per virtual page, its frame, refcount, flags and tokens
    (and, with text=True, the tokens as text). -> PageMap"""
    from kernel.mm.introspect import PageMap
    proc = proc_of(kernel, caller, pid)
    if not isinstance(text, bool):
        raise KvosError(EINVAL, f"text must be True or False, got {text!r}")
    if proc.asid is None:
        return PageMap(proc.tenant.page_size, 0, [])
    pagemap = kernel.mm.pagemap(proc.asid)
    if text:
        for page in pagemap.pages:
            page.text = proc.tenant.program.decode(page.tokens)
    return pagemap


@syscall("meminfo")
def sys_meminfo(kernel, caller, frames=False):
    """Memory: the whole pool for root; the caller's own cgroup for a tenant. With frames=True,
    root also gets every frame's state and tenant (the memory map). -> MemInfo"""
    from kernel.mm.introspect import MemInfo, frame_map
    if not isinstance(frames, bool):
        raise KvosError(EINVAL, f"frames must be True or False, got {frames!r}")
    if kernel.mm is None:
        return MemInfo(kernel.frame_bytes or 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, {})
    info = kernel.mm.meminfo()
    if caller is None:
        if frames:
            info.frames = frame_map(kernel.mm)
        return info
    mine = {}
    for proc in kernel.procs.values():
        if proc.tenant is caller and proc.asid is not None and proc.residency == Residency.RESIDENT:
            space = kernel.mm.space(proc.asid)
            for vpn, frame in enumerate(space.frames):
                mine[frame] = (len(space.page_tokens(vpn)), space.page_size)
    own = info.cgroups.get(caller.name)
    return MemInfo(info.frame_bytes, caller.mem_limit or info.total, 0, 0, own.charged if own else 0,
                   0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                   sum(t for t, _ in mine.values()), sum(p for _, p in mine.values()),
                   {caller.name: own} if own else {})


@syscall("schedstat")
def sys_schedstat(kernel, caller):
    """Scheduler counters, per-tenant service and recent steps. -> SchedStat"""
    s = kernel.stats
    tenants = []
    for t in kernel.tenants.values():
        if caller is not None and t is not caller:
            continue
        procs = [kernel.procs[p] for p in t.pids if p in kernel.procs]
        tenants.append(TenantSched(t.tid, t.name, t.weight, t.served_tokens,
                                   sum(p.state == State.RUNNING for p in procs),
                                   sum(p.state in (State.NEW, State.READY, State.PREEMPTED) for p in procs),
                                   sum(p.state == State.SLEEPING for p in procs),
                                   t.program.name, sorted(t.program.eos_token_ids), t.program.vocab_size,
                                   t.program.max_context, t.page_size))
    return SchedStat(kernel.policy.name, s.steps, s.busy_seconds, s.prefill_tokens, s.decode_tokens,
                     s.cached_tokens, s.generated_tokens, s.padding_tokens, s.admissions, s.preemptions,
                     s.swap_outs, s.swap_ins, s.reclaims, s.recomputed_tokens, s.exits, s.oom_kills,
                     s.forward_errors, s.tokens_per_second, len(kernel.sched.running), len(kernel.sched.waiting),
                     tenants, list(s.history)[-64:])


@syscall("dmesg")
def sys_dmesg(kernel, caller, since=0, limit=None):
    """Kernel log entries after `since` (a tenant sees only its own). -> [LogEntry]"""
    check_int("since", since, 0)
    if limit is not None:
        check_int("limit", limit, 1, 1 << 20)
    return kernel.dmesg.read(None if caller is None else caller.tid, since, limit)


# -- the handle ------------------------------------------------------------------------------------------
class SyscallHandle:
    """kernel.syscalls(as_tenant=None): root, or a handle that sees and touches one tenant's things."""

    def __init__(self, kernel, as_tenant=None):
        self._kernel = kernel
        self._tenant = None
        if as_tenant is not None:
            with kernel.lock:
                self._tenant = tenant_of(kernel, None, as_tenant)

    @property
    def tid(self):
        return None if self._tenant is None else self._tenant.tid

    @property
    def alive(self) -> bool:
        """True for root; for a tenant handle, whether its tenant still exists (not killed)."""
        return self._tenant is None or self._tenant.alive

    def atomic(self):
        """A context in which no kernel step runs between this handle's syscalls (a loop thread
        waits for it): spawn then fork gives children that share only the prompt, whatever the
        loop does. Blocking calls (wait, read with a timeout) inside it let the loop run."""
        return self._kernel.lock

    def _call(self, name: str, args, kwargs):
        sc = SYSCALLS[name]
        kernel = self._kernel
        if sc.root_only and self._tenant is not None:
            raise KvosError(EPERM, f"{name}: only root may call it")
        if self._tenant is not None and not self._tenant.alive:
            raise KvosError(ESRCH, f"tenant {self._tenant.tid} no longer exists")
        try:
            sc.signature.bind(kernel, self._tenant, *args, **kwargs)
        except TypeError as err:
            raise KvosError(EINVAL, f"{name}: {err}") from None
        if sc.blocking:
            return sc.handler(kernel, self._tenant, *args, **kwargs)
        with kernel.lock:
            if kernel.mm is None and name not in ("spawn_tenant", "ps", "meminfo", "schedstat", "dmesg"):
                raise KvosError(ESRCH, f"{name}: no tenant exists yet")
            if not kernel.accepting and name in _NEW_WORK:
                raise KvosError(EAGAIN, f"{name}: the kernel is shutting down")
            result = sc.handler(kernel, self._tenant, *args, **kwargs)
            if name in _NEW_WORK or name in ("kill", "kill_tenant", "shmrm"):
                kernel.changed.notify_all()          # a loop thread waiting for work wakes up
            return result


_NEW_WORK = frozenset({"spawn_tenant", "spawn", "spawn_n", "fork", "write", "shmget"})


def install_syscall_methods(cls) -> None:
    """Give cls one method per syscall, each calling cls._call(name, args, kwargs): the Python
    handle here, the daemon's client over HTTP; both keep the table's names and docs."""
    def method(sc: Syscall):
        def call(self, *args, **kwargs):
            return self._call(sc.name, args, kwargs)
        call.__name__ = sc.name
        call.__doc__ = sc.doc
        return call

    for sc in SYSCALLS.values():
        setattr(cls, sc.name, method(sc))


install_syscall_methods(SyscallHandle)
