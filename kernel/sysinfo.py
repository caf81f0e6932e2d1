"""/proc and its relatives: ps, pagemap, meminfo, schedstat, dmesg, uname, fsck, trace, loopctl, cacheevents.

A tenant sees only itself: its processes, its cgroup, its log lines, its own
service; the pool-wide counts, other tenants and the step history are root's.
trace() is the one way to watch the kernel step by step (the simulator's driver,
the benchmark harness, the TUI and the demo all use it); loopctl() pauses,
resumes and single-steps the kernel's loop, and lets idle time pass on the
simulated device. Both are root's, like ftrace and reboot. cacheevents() is root's
feed of the page cache (pages published and evicted) for prefix-aware routers.
"""
from __future__ import annotations

from kernel.argcheck import check_int, check_number, check_timeout, proc_of
from kernel.errors import EINVAL, KvosError
from kernel.proc import Residency, State
from kernel.results import CacheEvent, FsckReport, MemInfo, PageMap, ProcInfo, SchedStat, SystemInfo, TenantSched
from kernel.sched.stats import TRACE_STEPS
from kernel.systable import syscall


# -- processes -------------------------------------------------------------------------------------------------
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


def pagemap_finish(raw):
    pagemap, decode = raw
    if decode is not None:               # page text is the caller's work: decoded here, after the lock
        for page in pagemap.pages:
            page.text = decode(page.tokens)
    return pagemap


@syscall("pagemap", finish=pagemap_finish)
def sys_pagemap(kernel, caller, pid, text=False):
    """A process's page table: per virtual page, its frame, refcount, flags and tokens
    (and, with text=True, the tokens as text). -> PageMap"""
    proc = proc_of(kernel, caller, pid)
    if not isinstance(text, bool):
        raise KvosError(EINVAL, f"text must be True or False, got {text!r}")
    if proc.asid is None:
        return PageMap(proc.tenant.page_size, 0, []), None
    return kernel.mm.pagemap(proc.asid), proc.tenant.program.decode if text else None


# -- memory ----------------------------------------------------------------------------------------------------------
@syscall("meminfo")
def sys_meminfo(kernel, caller, frames=False):
    """Memory: the whole pool for root; the caller's own cgroup for a tenant. With frames=True,
    root also gets every frame's state, tenant and mapping pids (the memory map). -> MemInfo"""
    from kernel.mm.introspect import frame_map
    if not isinstance(frames, bool):
        raise KvosError(EINVAL, f"frames must be True or False, got {frames!r}")
    if kernel.mm is None:
        return MemInfo(kernel.frame_bytes or 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, {})
    info = kernel.mm.meminfo()
    for tenant in kernel.tenants.values():
        cg = info.cgroups.get(tenant.name)
        if cg is not None:
            cg.pinned, cg.share = kernel.pinned_frames(tenant), kernel.guaranteed_frames(tenant)
    if caller is None:
        if frames:
            info.frames = frame_map(kernel.mm, kernel.mappers())
        return info
    mine = {}
    for proc in kernel.procs.values():
        if proc.tenant is caller and proc.asid is not None and proc.residency == Residency.RESIDENT:
            space = kernel.mm.space(proc.asid)
            for vpn, frame in enumerate(space.frames):
                mine[frame] = (len(space.page_tokens(vpn)), space.page_size)
    own = info.cgroups.get(caller.name)
    return MemInfo(info.frame_bytes, caller.mem_limit or info.total, 0, 0, own.charged if own else 0,
                   0, own.pinned if own else 0, 0, 0, 0, 0, 0, 0, 0, 0,
                   sum(t for t, _ in mine.values()), sum(p for _, p in mine.values()),
                   {caller.name: own} if own else {})


# -- the scheduler ---------------------------------------------------------------------------------------------------
def _tenant_sched(kernel, t) -> TenantSched:
    procs = [kernel.procs[p] for p in t.pids if p in kernel.procs]
    return TenantSched(t.tid, t.name, t.weight, t.served_tokens,
                       sum(p.state == State.RUNNING for p in procs),
                       sum(p.state in (State.NEW, State.READY, State.PREEMPTED) for p in procs),
                       sum(p.state == State.SLEEPING for p in procs),
                       t.program.name, sorted(t.program.eos_token_ids), t.program.vocab_size,
                       t.program.max_context, t.page_size)


@syscall("schedstat")
def sys_schedstat(kernel, caller):
    """Scheduler counters, per-tenant service and recent steps. A tenant sees its own service and
    queue lengths only: the global counters read 0 and the step history is empty. -> SchedStat"""
    from kernel.step import step_record
    if caller is not None:
        own = _tenant_sched(kernel, caller)
        return SchedStat(kernel.policy.name, 0, 0.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0,
                         own.running, own.waiting, [own], [], kernel.clock() - kernel.dmesg.boot_time)
    s = kernel.stats
    return SchedStat(kernel.policy.name, s.steps, s.busy_seconds, s.prefill_tokens, s.decode_tokens,
                     s.cached_tokens, s.generated_tokens, s.padding_tokens, s.admissions, s.preemptions,
                     s.swap_outs, s.swap_ins, s.reclaims, s.recomputed_tokens, s.exits, s.oom_kills,
                     s.forward_errors, s.tokens_per_second, len(kernel.sched.running), len(kernel.sched.waiting),
                     [_tenant_sched(kernel, t) for t in kernel.tenants.values()],
                     [step_record(raw, detail=False) for raw in list(s.history)[-64:]],
                     kernel.clock() - kernel.dmesg.boot_time, draft_tokens=s.draft_tokens,
                     accepted_tokens=s.accepted_tokens)


@syscall("dmesg")
def sys_dmesg(kernel, caller, since=0, limit=None):
    """Kernel log entries after `since` (a tenant sees only its own). -> [LogEntry]"""
    check_int("since", since, 0)
    if limit is not None:
        check_int("limit", limit, 1, 1 << 20)
    return kernel.dmesg.read(None if caller is None else caller.tid, since, limit)


@syscall("uname")
def sys_uname(kernel, caller):
    """The kernel's version, its device and how it was booted (policy, page size, budgets, memory);
    on the simulated device also the GPU's constants and the KV memory arithmetic. -> SystemInfo"""
    import dataclasses
    from importlib.metadata import PackageNotFoundError, version
    try:
        release = version("kvos")
    except PackageNotFoundError:
        release = "unknown"
    device, sched = kernel.device, kernel.sched
    gpu = getattr(device, "gpu", None)
    budget = None
    if gpu is not None and kernel.tenants:
        budget = device.memory_budget(next(iter(kernel.tenants.values())).program)
    return SystemInfo(release, device.name, device.kind, kernel.policy.name, kernel.page_size, sched.token_budget,
                      sched.chunk, sched.max_running, kernel.frame_bytes or 0, kernel.memory_bytes or 0,
                      kernel.swap_bytes, dataclasses.asdict(gpu) if gpu is not None else None, budget)


@syscall("fsck", root_only=True)
def sys_fsck(kernel, caller):
    """Check every invariant of memory and the process table now. A broken one is a kernel panic
    (a bug in kvos), never the caller's error. -> FsckReport"""
    from kernel.fsck import fsck
    fsck(kernel)
    mm = kernel.mm
    return FsckReport(mm.num_frames if mm else 0, len(kernel.procs), len(mm.spaces) if mm else 0,
                      len(mm.segments) if mm else 0)


# -- watching and driving the kernel (root) ---------------------------------------------------------------------
def _step_records(raws) -> list:
    """trace's finish half: ring entries become StepRecords outside the kernel lock."""
    from kernel.step import step_record
    return [step_record(raw) for raw in raws]


@syscall("trace", root_only=True, blocking=True, finish=_step_records)
def sys_trace(kernel, caller, since=0, limit=None, timeout=0.0):
    """The step records after step `since`, oldest first: what ran (pid, tokens, the sampled token),
    admissions, swap-ins, preemptions, copy-on-write faults, exits, queue lengths, free frames.
    Waits up to `timeout` seconds for a step after `since`; with no loop thread running, a wait
    runs the next step itself, and returns at once when nothing is runnable. The kernel keeps
    the last 512 records: a gap in the step numbers says records were lost. Records list what
    ran (works) only while someone traces: from a first call on, as long as calls come at least
    every 512 steps (a tracepoint costs nothing when nobody reads it). -> [StepRecord]"""
    from kernel.step import record_step
    from kernel.sysproc import block
    check_int("since", since, 0)
    if limit is not None:
        check_int("limit", limit, 1, 1 << 20)
    timeout = check_timeout(timeout, default=0.0)
    with kernel.lock:
        stats = kernel.stats
        stats.traced_until = stats.steps + TRACE_STEPS + 1      # records carry their works while we read
        history = stats.history
        if timeout and (not history or record_step(history[-1]) <= since):
            block(kernel, None, lambda: bool(history) and record_step(history[-1]) > since, timeout)   # any step
        out = []
        for raw in reversed(history):              # newest first: a caller keeping up reads one or two
            if record_step(raw) <= since:
                break
            out.append(raw)                        # immutable: safe to hand to the finish half as it is
        out.reverse()
        return out[:limit] if limit else out


@syscall("loopctl", root_only=True, blocking=True)
def sys_loopctl(kernel, caller, action="status", until=None):
    """The kernel's loop: "status"; "pause" and "resume" its thread; "step": one time slice (of the
    paused loop, or run here when no loop thread runs); "idle": on the simulated device, let the
    virtual clock pass to `until` (seconds since boot) while nothing is runnable. -> LoopStatus"""
    from kernel import loop
    if action not in ("status", "pause", "resume", "step", "idle"):
        raise KvosError(EINVAL, f"action must be status, pause, resume, step or idle, got {action!r}")
    if (until is not None) != (action == "idle"):
        raise KvosError(EINVAL, "until goes with action='idle' (and only there)")
    if action == "pause":
        loop.pause(kernel)
    elif action == "resume":
        loop.resume(kernel)
    elif action == "step":
        loop.step_once(kernel)
    elif action == "idle":
        check_number("until", until, 0.0)
        loop.idle_until(kernel, until)
    return loop.status(kernel)


# -- the page cache's events (root) -----------------------------------------------------------------------------
def _cache_events(raw) -> list:
    """cacheevents' finish half: ring entries become CacheEvents (hex names) outside the kernel lock."""
    events, owners = raw
    return [CacheEvent(seq, kind, name.hex(), parent.hex(), owners.get(namespace))
            for seq, kind, name, parent, namespace in events]


@syscall("cacheevents", root_only=True, finish=_cache_events)
def sys_cacheevents(kernel, caller, since=0, limit=None):
    """Page-cache events after `since`, oldest first: a full page published (named, so that
    prompts sharing its prefix map it) or evicted (its frame reused), by name (hex of the page-name
    chain; kernel.pagename), with its parent's name and its tenant. Tenants given the same
    cache_salt on several kernels name their pages alike there, so a router following each
    kernel's events knows which prefixes it holds. The kernel keeps the last 65536 events: a gap
    after `since` says events were lost (the reader should forget what it knew). -> [CacheEvent]"""
    check_int("since", since, 0)
    if limit is not None:
        check_int("limit", limit, 1, 1 << 20)
    if kernel.mm is None:
        return [], {}
    owners: dict = {}
    for tenant in sorted(kernel.tenants.values(), key=lambda t: -t.tid):    # the lowest tid of a shared one
        owners[tenant.namespace] = tenant.tid
    return kernel.mm.page_cache.events_after(since, limit), owners
