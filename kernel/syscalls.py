"""The syscall table: the one door from userspace into the kernel (DESIGN section 4).

SYSCALLS maps each name to its handler. A handler receives the kernel and the
calling tenant (None for root), decodes and validates its arguments, then calls
the mechanism. Every failure is a KvosError raised before anything changed.
SyscallHandle is generated from the table; the CLI and the daemon are built
on the same table.
"""
from __future__ import annotations

import inspect
import math
import threading
import time
from dataclasses import dataclass, field

from kernel.errors import E2BIG, EAGAIN, EBUSY, EINVAL, ENOMEM, EPERM, ESRCH, KernelPanic, KvosError
from kernel.proc import Residency, State
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


# -- results ------------------------------------------------------------------------------
@dataclass
class ReadResult:
    pid: int
    tokens: list                 # token ids generated since the last read
    text: str                    # their text (held back while a character is incomplete)
    state: str
    turn_done: bool              # the current turn ended (the process sleeps or exited)
    finish_reason: str | None
    logprobs: list = field(default_factory=list)   # new entries: [(token, logprob)] per position


@dataclass
class ProcInfo:
    pid: int
    tid: int
    tenant: str
    state: str
    residency: str
    priority: int
    prompt_tokens: int
    generated_tokens: int
    computed_tokens: int
    pages: int
    shared_pages: int
    swapped_pages: int
    cow_faults: int
    preemptions: int
    tokens_per_second: float
    time_to_first_token: float | None


@dataclass
class TenantSched:
    tid: int
    name: str
    weight: float
    served_tokens: int
    running: int
    waiting: int
    sleeping: int
    model: str = ""                  # what the tenant runs, for clients that need its facts
    eos_token_ids: list = field(default_factory=list)
    vocab_size: int = 0
    max_context: int = 0
    page_size: int = 0               # tokens per frame for this model


@dataclass
class SchedStat:
    policy: str
    steps: int
    busy_seconds: float
    prefill_tokens: int
    decode_tokens: int
    cached_tokens: int
    generated_tokens: int
    padding_tokens: int
    admissions: int
    preemptions: int
    swap_outs: int
    swap_ins: int
    reclaims: int
    recomputed_tokens: int
    exits: int
    oom_kills: int
    forward_errors: int
    tokens_per_second: float
    running: int
    waiting: int
    tenants: list
    recent_steps: list           # the last StepRecords (seconds, batch size, prefill, decode, padding)


# -- argument checks ---------------------------------------------------------------------------
def _int(name, value, lo=None, hi=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise KvosError(EINVAL, f"{name} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise KvosError(EINVAL, f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _number(name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or \
            value < lo or (hi is not None and value > hi) or math.isinf(value):
        raise KvosError(EINVAL, f"{name} must be a number in [{lo}, {hi if hi is not None else 'inf'}), got {value!r}")
    return float(value)


def _tenant(kernel, caller, tid):
    _int("tid", tid)
    tenant = kernel.tenants.get(tid)
    if tenant is None:
        raise KvosError(ESRCH, f"no tenant {tid}")
    if caller is not None and caller is not tenant:
        raise KvosError(EPERM, f"tenant {caller.tid} may not use tenant {tid}")
    return tenant


def _proc(kernel, caller, pid):
    _int("pid", pid)
    proc = kernel.procs.get(pid)
    if proc is None:
        raise KvosError(ESRCH, f"no process {pid}")
    if caller is not None and proc.tenant is not caller:
        raise KvosError(EPERM, f"process {pid} belongs to another tenant")
    return proc


def _tokens(program, prompt, what="prompt"):
    """Token ids of a prompt: text, a list of token ids, or a chat (list of {role, content})."""
    if isinstance(prompt, str):
        if not prompt:
            raise KvosError(EINVAL, f"{what} is empty")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as err:
            raise KvosError(EINVAL, f"{what} is not valid text: {err.reason}") from None
        ids = program.encode(prompt)
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        for m in prompt:
            if set(m) - {"role", "content", "name"} or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise KvosError(EINVAL, f"{what}: a chat message needs string 'role' and 'content', got {m!r}")
        ids = program.apply_chat_template(list(prompt))
    elif isinstance(prompt, (list, tuple)):
        ids = list(prompt)
        program.check_tokens(ids)
    else:
        raise KvosError(EINVAL, f"{what} must be text, a list of token ids or a chat, got {type(prompt).__name__}")
    if not ids:
        raise KvosError(EINVAL, f"{what} is empty")
    return ids


def _check_fits(kernel, tenant, num_tokens, what):
    if num_tokens > tenant.max_prompt_tokens and num_tokens < tenant.program.max_context:
        raise KvosError(E2BIG, f"{what} of {num_tokens} tokens exceeds tenant {tenant.name!r}'s limit "
                               f"of {tenant.max_prompt_tokens}")
    if num_tokens >= tenant.program.max_context:
        raise KvosError(ENOMEM, f"{what} of {num_tokens} tokens does not fit the model's context "
                                f"of {tenant.program.max_context}")
    pages = -(-(num_tokens + 1) // tenant.page_size)
    frames = kernel.mm.num_frames - kernel.mm.frames.num_pinned
    if pages > frames:
        raise KvosError(ENOMEM, f"{what} of {num_tokens} tokens needs {pages} frames; the pool has {frames}")
    if tenant.mem_limit is not None and pages > tenant.mem_limit:
        raise KvosError(ENOMEM, f"{what} of {num_tokens} tokens needs {pages} frames; tenant "
                                f"{tenant.name!r} may use {tenant.mem_limit}")


def _check_room_for(kernel, tenant, n):
    live = tenant.num_live
    if live + n > tenant.max_procs:
        raise KvosError(EAGAIN, f"tenant {tenant.name!r} has {live} processes; its limit is {tenant.max_procs}")
    queued = kernel.sched.queued.get(tenant.tid, 0)
    if queued + n > tenant.max_queued:
        raise KvosError(EAGAIN, f"tenant {tenant.name!r} has {queued} processes waiting; its queue limit is "
                                f"{tenant.max_queued}")


def _priority(tenant, caller, priority):
    _int("priority", priority, NICE_MIN, NICE_MAX)
    if caller is not None and priority < tenant.nice_min:
        raise KvosError(EPERM, f"priority {priority} is below tenant {tenant.name!r}'s floor {tenant.nice_min}")
    return priority


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
    _number("weight", weight, 1e-6, 1e6)
    if prefix_sharing not in ("tenant", "global"):
        raise KvosError(EINVAL, f"prefix_sharing must be 'tenant' or 'global', got {prefix_sharing!r}")
    _int("max_procs", max_procs, 1, 1 << 20)
    _int("max_queued", max_queued, 1, 1 << 20)
    _int("nice_min", nice_min, NICE_MIN, NICE_MAX)
    for key, value in (("max_prompt_tokens", max_prompt_tokens), ("max_new_tokens", max_new_tokens)):
        if value is not None:
            _int(key, value, 1, 1 << 30)
    return kernel.create_tenant(model, name, mem_limit, weight, prefix_sharing, max_procs, nice_min, max_queued,
                                max_prompt_tokens, max_new_tokens).tid


@syscall("kill_tenant", root_only=True)
def sys_kill_tenant(kernel, caller, tid):
    """End every process of a tenant, remove its segments and its cgroup."""
    kernel.remove_tenant(_tenant(kernel, caller, tid))


# -- processes ----------------------------------------------------------------------------------------
@syscall("spawn")
def sys_spawn(kernel, caller, tid, prompt, *, priority=0, shm=None, interactive=False, **sampling):
    """A new process running `prompt` (text, token ids or a chat). It waits in the run queue until admitted. -> pid

    Sampling keys: max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, ignore_eos,
    logprobs. interactive=True: the process sleeps after each turn and write() starts the next.
    """
    tenant = _tenant(kernel, caller, tid)
    params = SamplingParams.from_kwargs(**sampling)
    params.check_vocab(tenant.program.vocab_size)
    _priority(tenant, caller, priority)
    if not isinstance(interactive, bool):
        raise KvosError(EINVAL, f"interactive must be True or False, got {interactive!r}")
    if params.max_tokens == 0 and not interactive:
        raise KvosError(EINVAL, "max_tokens must be at least 1 (0 is for interactive processes)")
    prefix = []
    if shm is not None:
        _int("shm", shm)
        seg = kernel.shm_segments.get(shm)
        if seg is None:
            raise KvosError(ESRCH, f"no shm segment {shm}")
        if seg.tenant is not tenant:
            raise KvosError(EPERM, f"shm segment {shm} belongs to another tenant")
        prefix = seg.tokens
    if params.max_tokens > tenant.max_new_tokens:
        raise KvosError(E2BIG, f"max_tokens {params.max_tokens} exceeds tenant {tenant.name!r}'s limit "
                               f"of {tenant.max_new_tokens}")
    ids = prefix + _tokens(tenant.program, prompt)
    _check_fits(kernel, tenant, len(ids), "prompt")
    _check_room_for(kernel, tenant, 1)
    proc = kernel.create_process(tenant, ids, params, priority, interactive, shm, params.seed)
    kernel.log("spawn", f"pid {proc.pid}: {len(ids)} prompt tokens, max_tokens {params.max_tokens}", proc=proc)
    return proc.pid


@syscall("fork")
def sys_fork(kernel, caller, pid, n=1):
    """n children sharing every page of the process copy-on-write, each with its own seed. -> [pid]"""
    proc = _proc(kernel, caller, pid)
    _int("n", n, 1, 1024)
    if not proc.alive:
        raise KvosError(ESRCH, f"process {pid} has exited")
    if proc.builds_segment is not None:
        raise KvosError(EPERM, f"process {pid} is a kernel shm builder")
    _check_room_for(kernel, proc.tenant, n)
    return [c.pid for c in kernel.fork_process(proc, n)]


@syscall("write")
def sys_write(kernel, caller, pid, prompt):
    """Append input to a sleeping interactive process and start its next turn; its pages stay."""
    proc = _proc(kernel, caller, pid)
    if not proc.alive:
        raise KvosError(ESRCH, f"process {pid} has exited")
    if not proc.interactive:
        raise KvosError(EINVAL, f"process {pid} was not spawned interactive; it takes no more input")
    if proc.state != State.SLEEPING:
        raise KvosError(EBUSY, f"process {pid} is in the middle of a turn ({proc.state.value})")
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        _tokens(proc.tenant.program, prompt, "input")          # validates the messages
        from kernel.chat import chat_continuation
        ids = chat_continuation(proc.tenant.program, prompt, proc.tokens[-1] if proc.output else None)
    else:
        ids = _tokens(proc.tenant.program, prompt, "input")
    _check_fits(kernel, proc.tenant, len(proc.tokens) + len(ids), "process with its new input")
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
    with kernel.lock:
        proc = _proc(kernel, caller, pid)
        if timeout is not None:
            _number("timeout", timeout, 0.0)
    start = proc.read_offset
    if timeout:
        _block(kernel, lambda: len(proc.output) > start or proc.turn_done or not proc.alive, timeout)
    with kernel.lock:
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
    with kernel.lock:
        proc = _proc(kernel, caller, pid)
        if timeout is not None:
            _number("timeout", timeout, 0.0)
    done = _block(kernel, lambda: not proc.alive or proc.state == State.SLEEPING, timeout)
    with kernel.lock:
        if proc.state == State.SLEEPING:
            kernel.exit_process(proc, getattr(proc, "last_reason", "stop"))
        if proc.alive:
            if not done and timeout is not None:
                raise KvosError(EAGAIN, f"process {pid} still runs after {timeout} s")
            raise KernelPanic(f"wait: process {pid} ({proc.state.value}) cannot make progress")
        if kernel.procs.pop(pid, None) is not None:
            proc.tenant.pids.discard(pid)
        return proc.exit


@syscall("kill")
def sys_kill(kernel, caller, pid):
    """End a process now; its frames go back (full pages may stay in the page cache)."""
    proc = _proc(kernel, caller, pid)
    if proc.builds_segment is not None:
        raise KvosError(EPERM, f"process {pid} is a kernel shm builder; use shmrm")
    kernel.exit_process(proc, "killed")


@syscall("nice")
def sys_nice(kernel, caller, pid, inc):
    """Change a process's priority by inc (lower runs first under the priority policy). -> new value"""
    proc = _proc(kernel, caller, pid)
    _int("inc", inc, -40, 40)
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
    tenant = _tenant(kernel, caller, tid)
    ids = _tokens(tenant.program, prompt)
    _check_fits(kernel, tenant, len(ids), "segment")
    _check_room_for(kernel, tenant, 1)
    return kernel.create_segment(tenant, ids).shmid


@syscall("shmrm")
def sys_shmrm(kernel, caller, shmid):
    """Unpin a shared prefix; processes attached to it keep their pages."""
    _int("shmid", shmid)
    seg = kernel.shm_segments.get(shmid)
    if seg is None:
        raise KvosError(ESRCH, f"no shm segment {shmid}")
    if caller is not None and seg.tenant is not caller:
        raise KvosError(EPERM, f"shm segment {shmid} belongs to another tenant")
    kernel.remove_segment(seg)


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
    proc = _proc(kernel, caller, pid)
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
    _int("since", since, 0)
    if limit is not None:
        _int("limit", limit, 1, 1 << 20)
    return kernel.dmesg.read(None if caller is None else caller.tid, since, limit)


# -- the handle ------------------------------------------------------------------------------------------
class SyscallHandle:
    """kernel.syscalls(as_tenant=None): root, or a handle that sees and touches one tenant's things."""

    def __init__(self, kernel, as_tenant=None):
        self._kernel = kernel
        self._tenant = None
        if as_tenant is not None:
            with kernel.lock:
                self._tenant = _tenant(kernel, None, as_tenant)

    @property
    def tid(self):
        return None if self._tenant is None else self._tenant.tid

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


_NEW_WORK = frozenset({"spawn_tenant", "spawn", "fork", "write", "shmget"})


def _method(sc: Syscall):
    def call(self, *args, **kwargs):
        return self._call(sc.name, args, kwargs)
    call.__name__ = sc.name
    call.__doc__ = sc.doc
    return call


for _sc in SYSCALLS.values():
    setattr(SyscallHandle, _sc.name, _method(_sc))
