"""fsck for the whole kernel: the memory invariants, then the process table's.

Between steps every live process sits in exactly one place (the run queue,
the wait queue, or asleep), its residency matches its address space, and the
tokens its address space holds are the first num_computed tokens of its file.
Every address space and segment of the memory manager has exactly one owner.
"""
from kernel.errors import KernelPanic
from kernel.proc import Residency, State


def _panic(why):
    raise KernelPanic(f"fsck: {why}")


def fsck(kernel) -> None:
    if kernel.mm is None:
        return
    mm = kernel.mm
    mm.fsck()
    running = set(kernel.sched.running)
    waiting = set(kernel.sched.waiting)
    if running & waiting:
        _panic("a process is both running and waiting")
    if any(p.pid != pid for pid, p in list(kernel.sched.running.items()) + list(kernel.sched.waiting.items())):
        _panic("a run queue entry is filed under another pid")
    queued = {}
    for p in kernel.sched.waiting.values():
        queued[p.tenant.tid] = queued.get(p.tenant.tid, 0) + 1
    if any(queued.get(t, 0) != n for t, n in kernel.sched.queued.items()):
        _panic(f"per-tenant wait counts {kernel.sched.queued} but the queue holds {queued}")
    for tenant in kernel.tenants.values():
        live = sum(1 for pid in tenant.pids if pid in kernel.procs and kernel.procs[pid].alive)
        if live != tenant.num_live:
            _panic(f"tenant {tenant.name!r} counts {tenant.num_live} live processes but has {live}")
    owners = {}
    for pid, proc in kernel.procs.items():
        where = (pid in running) + (pid in waiting)
        if proc.state == State.RUNNING and not (pid in running and where == 1):
            _panic(f"pid {pid} is running but not on the run queue")
        if proc.state in (State.NEW, State.READY, State.PREEMPTED) and not (pid in waiting and where == 1):
            _panic(f"pid {pid} is {proc.state.value} but not on the wait queue")
        if proc.state in (State.SLEEPING, State.ZOMBIE) and where:
            _panic(f"pid {pid} is {proc.state.value} but queued")
        if proc.tenant.tid not in kernel.tenants or pid not in proc.tenant.pids:
            _panic(f"pid {pid} has no live tenant that knows it")
        if not 0 <= proc.num_computed <= len(proc.tokens):
            _panic(f"pid {pid}: {proc.num_computed} tokens computed of {len(proc.tokens)}")
        if proc.state == State.ZOMBIE:
            if proc.asid is not None:
                _panic(f"zombie pid {pid} still has address space {proc.asid}")
            continue
        if (proc.asid is None) != (proc.residency == Residency.NONE):
            _panic(f"pid {pid}: residency {proc.residency.value} but address space {proc.asid}")
        if proc.state == State.RUNNING and proc.residency != Residency.RESIDENT:
            _panic(f"pid {pid} runs without resident pages")
        if proc.asid is not None:
            if proc.asid in owners:
                _panic(f"address space {proc.asid} belongs to pids {owners[proc.asid]} and {pid}")
            owners[proc.asid] = pid
            space = mm.spaces.get(proc.asid)
            if space is None:
                _panic(f"pid {pid}: address space {proc.asid} does not exist")
            if space.is_swapped != (proc.residency == Residency.SWAPPED):
                _panic(f"pid {pid}: residency {proc.residency.value} but the space says swapped={space.is_swapped}")
            if space.num_tokens != proc.num_computed or space.tokens != proc.tokens[:proc.num_computed]:
                _panic(f"pid {pid}: its address space holds other tokens than it computed")
    orphans = set(mm.spaces) - set(owners) - _null_spaces(kernel)
    if orphans:
        _panic(f"address spaces without a process: {sorted(orphans)[:5]}")
    built = {s.mm_shmid for s in kernel.shm_segments.values() if s.ready}
    if built != set(mm.segments):
        _panic(f"shm segments {sorted(built)} but the memory manager holds {sorted(mm.segments)}")


def _null_spaces(kernel) -> set:
    if kernel.null_frame is None:
        return set()
    return {a for a, s in kernel.mm.spaces.items() if s.namespace == b"null"}
