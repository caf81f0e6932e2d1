"""Admission: a waiting process joins the running set (part of Scheduler, kernel/sched/scheduler.py).

A swapped process comes back by swap-in, with room for the page its next token
may open; a new or reclaimed one gets an address space (its shm segment, then
what the page cache holds) and its first chunk. When the pool is short, idle
sleepers are swapped out first, then a tenant below its guaranteed share
claims frames back from tenants above theirs. A process that does not fit now
is refused without a trace: the address space made for it goes back.
Uses the Scheduler's queues (waiting, running), its policy and its memory
manager; the victims it needs come from kernel/sched/preempt.py.
"""
from __future__ import annotations

from kernel.errors import KernelPanic
from kernel.proc import Residency, State
from kernel.sched.plan import Plan
from kernel.sched.shares import memory_victim

SKIP, STOP = 0, -1       # admission results besides "this many tokens planned": next one, or no more
_ON_ITS_WAY = (State.NEW, State.READY, State.RUNNING, State.PREEMPTED)


class Admission:
    """Scheduler's admission half: who may come in, and bringing them in."""

    def _admissible(self) -> list:
        """Waiting processes that may be admitted now."""
        procs = [p for p in self.waiting.values() if self._may_admit(p)]
        if not self.policy.admits_while_running and (self.running or any(
                p.state == State.PREEMPTED for p in self.waiting.values())):
            procs = [p for p in procs if p.state == State.PREEMPTED]   # finish the batch first
        return procs

    def _may_admit(self, proc) -> bool:
        if proc.after is not None:                       # a fork child waits for its parent's prompt
            parent = self.kernel.procs.get(proc.after)
            # Only while the parent is on its way to computing it: a sleeping parent (reclaimed
            # perhaps) computes nothing until written to, so waiting for it could be forever.
            if parent is not None and parent.state in _ON_ITS_WAY and parent.num_computed < parent.prompt_len:
                return False
            proc.after = None
        if proc.shm is not None:
            seg = self.kernel.shm_segments.get(proc.shm)
            if seg is not None and not seg.ready and proc.asid is None:
                return False
        return True

    def _admit(self, proc, budget: int, plan: Plan) -> int:
        """Bring a waiting process in; returns tokens planned, SKIP or STOP (pool full)."""
        mm = self.mm
        cgid = proc.tenant.cgid
        if proc.residency == Residency.SWAPPED:
            new, charges, cached_hits = mm.swap_in_plan(proc.asid)
            # Room for its pages and for the page its next token may open: admitting it only to
            # preempt it again at once would thrash.
            space = mm.space(proc.asid)
            growth = int(space.num_tokens % space.page_size == 0)
            room = mm.cgroups[cgid].room()
            if room is not None and charges + growth > room:
                return SKIP
            while new + cached_hits + growth + mm.watermark > mm.frames.available:   # hits leave the LRU
                sleeper = self._idle_victim(proc)
                if sleeper is None:
                    return STOP
                self.preempt(sleeper, plan)
                new, charges, cached_hits = mm.swap_in_plan(proc.asid)
            mm.swap_in(proc.asid)
            proc.residency = Residency.RESIDENT
            self.stats.swap_ins += 1
            plan.swapped_in.append(proc)
            self.kernel.log("swap-in", f"pid {proc.pid} swapped in", proc=proc)
            self._run(proc, plan)
            count = self._make_room(proc, self.quantum(proc, budget), plan)
            if count:
                self._plan_work(proc, count, plan)
            return count
        fresh = proc.asid is None
        if fresh:
            self._map_address_space(proc)
        count = self.quantum(proc, budget)
        if self.prealloc and fresh:
            want = len(proc.tokens) + proc.params.max_tokens - proc.turn_generated
            if not self._reserve(proc, want):
                return self._refuse(proc, fresh)
        if not self._fits(proc, count, admission=True):
            count = self._largest_fit(proc, count, admission=True)
            while not count and self._evict_idle_for(proc, plan):
                count = self._largest_fit(proc, self.quantum(proc, budget), admission=True)
            if not count and self._claim_share(proc, plan):
                count = self._largest_fit(proc, self.quantum(proc, budget), admission=True)
            if not count:
                return self._refuse(proc, fresh)
        self._run(proc, plan)
        self._plan_work(proc, count, plan)
        return count

    def _evict_idle_for(self, proc, plan: Plan) -> bool:
        """Swap out one idle sleeper so that `proc` may be admitted (only when the pool, not the
        tenant's own limit, is what is short). Returns whether one went."""
        room = self.mm.cgroups[proc.tenant.cgid].room()
        if room is not None and room < 1:
            return False
        sleeper = self._idle_victim(proc)
        if sleeper is None:
            return False
        self.preempt(sleeper, plan)
        return True

    def _claim_share(self, proc, plan: Plan) -> bool:
        """A tenant below its guaranteed share takes frames back from tenants above theirs
        (idle sleepers first, then running processes not served this step). Returns whether
        anything was preempted."""
        if self._shares.over_memory(proc.tenant, extra=1):
            return False
        freed = False
        while not self._fits(proc, 1, admission=True):
            victim = memory_victim(self, self._shares, proc.tenant)
            if victim is None:
                break
            self.preempt(victim, plan)
            freed = True
        return freed

    def _map_address_space(self, proc) -> None:
        """A new address space: the shm segment, then whatever the page cache holds."""
        kernel, mm = self.kernel, self.mm
        proc.asid = mm.create(proc.tenant.cgid, proc.tenant.page_size, proc.tenant.namespace)
        proc.residency = Residency.RESIDENT
        if proc.shm is not None and proc.shm in kernel.shm_segments:
            seg = kernel.shm_segments[proc.shm]
            proc.num_computed = mm.attach(proc.asid, seg.mm_shmid)
            self.stats.cached_tokens += proc.num_computed
        limit = proc.remaining - 1
        if proc.prompt_logprobs is not None and proc.prompt_scored < len(proc.prompt_logprobs) - 1:
            limit = min(limit, max(0, proc.prompt_scored - proc.num_computed))    # its own rows score the prompt
        hit = mm.map_cached(proc.asid, proc.tokens[proc.num_computed:], max_tokens=limit)
        proc.num_computed += hit
        self.stats.cached_tokens += hit
        if proc.dropped:                                 # reclaimed: what the cache no longer holds is recomputed
            self.stats.recomputed_tokens += max(0, proc.dropped - proc.num_computed)
            proc.dropped = 0

    def _reserve(self, proc, tokens: int) -> bool:
        from kernel.mm import MemoryPressure
        space = self.mm.space(proc.asid)
        need = max(0, -(-tokens // space.page_size) - len(space.frames))
        if not self.mm.can_allocate(proc.tenant.cgid, need, admission=True):
            return False
        try:
            self.mm.reserve(proc.asid, tokens)
        except MemoryPressure as err:
            raise KernelPanic(f"Scheduler._reserve: checked room but {err}") from err
        return True

    def _refuse(self, proc, fresh: bool) -> int:
        """Not admitted now. An address space made by this admission is given back (its cached
        pages return to the page cache). SKIP when the tenant's limit is what is short, so
        other tenants may still come in; STOP when the pool is, so nobody jumps the queue."""
        if fresh:
            self.mm.free(proc.asid)
            proc.asid, proc.residency, proc.num_computed = None, Residency.NONE, 0
        room = self.mm.cgroups[proc.tenant.cgid].room()
        return SKIP if room is not None and room < self.mm.frames.available - self.mm.watermark else STOP

    def _run(self, proc, plan: Plan) -> None:
        self._unwait(proc)
        if proc.state != State.PREEMPTED:
            plan.admitted.append(proc)
            self.stats.admissions += 1
            self.kernel.log("admit", f"pid {proc.pid} admitted ({proc.num_computed} tokens cached, "
                            f"{proc.remaining} to compute)", proc=proc)
        self.add_running(proc)
