"""Memory for a running process: shrinking a chunk, preempting victims, and the OOM ends
(part of Scheduler, kernel/sched/scheduler.py).

When frames run out, a victim is preempted: a sleeping process first, else the
policy's choice among processes not yet served this step and of lower
priority than the one in need. A tenant over its own memory limit preempts its
own processes only; under pool pressure a victim must belong to the tenant in
need or to a tenant above its guaranteed share (min(limit, pool * weight /
total weight of active tenants)). The victim is swapped out when the swap area
has room, else its pages are dropped and recomputed later.

A process that can never fit (even alone) goes into plan.ended with its ENOMEM
reason, its memory already released for the rest of the plan, and the kernel
ends it after schedule() returns: the one out-of-memory path, whether found
while making room or because nothing can run at all.
"""
from __future__ import annotations

from kernel.mm import SwapFull
from kernel.proc import Residency, State
from kernel.sched.plan import Plan


class Preemption:
    """Scheduler's preemption half: making room, choosing victims, swapping or reclaiming them."""

    def _fits(self, proc, count: int, admission: bool = False) -> bool:
        need = self.mm.frames_needed(proc.asid, count)
        return need == 0 or self.mm.can_allocate(proc.tenant.cgid, need, admission=admission)

    def _largest_fit(self, proc, count: int, admission: bool = False) -> int:
        """The most tokens, at most `count`, whose frames are available now (0 if none)."""
        lo, hi = 0, count
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._fits(proc, mid, admission):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _make_room(self, proc, count: int, plan: Plan) -> int:
        """Tokens `proc` may compute now (<= count), preempting victims if needed; 0 if it
        was preempted or killed itself."""
        while not self._fits(proc, count):
            if count > 1:                                 # a prefill chunk shrinks before anyone is preempted
                fit = self._largest_fit(proc, count)
                if fit:
                    return fit
            cgroup = self.mm.cgroups[proc.tenant.cgid]
            need = self.mm.frames_needed(proc.asid, count)
            by_limit = cgroup.room() is not None and need > cgroup.room()
            victim = self._pick_victim(proc, by_limit, need)
            if victim is not None:
                self.preempt(victim, plan)
                continue
            if self._can_never_fit(proc, count):
                self._end(proc, plan, f"ENOMEM: out of memory: needs {need} more frame(s) and could not fit "
                                      f"even alone (pool or tenant limit too small)")
            else:
                self.preempt(proc, plan)
            return 0
        return count

    def _pick_victim(self, proc, by_limit: bool, need: int):
        """A process whose pages may go so that `proc` can run, or None: of its own tenant and of
        lower priority; or, under pool pressure, of a tenant above its share -- of lower priority,
        or of any priority when `proc`'s tenant is within its own share even with `need` more."""
        sleeper = self._idle_victim(proc, (lambda q: q.tenant is proc.tenant) if by_limit else None)
        if sleeper is not None:
            return sleeper
        shares, key = self._shares, self.policy.victim_key
        mine_key = key(proc)
        owed = not by_limit and not shares.over_memory(proc.tenant, extra=need)

        def may_go(q) -> bool:
            if q is proc or q.pid in self.served:
                return False
            if q.tenant is proc.tenant:
                return key(q) > mine_key
            return not by_limit and shares.over_memory(q.tenant) and (owed or key(q) > mine_key)
        candidates = [q for q in self.running.values() if may_go(q)]
        return max(candidates, key=key) if candidates else None

    def _idle_victim(self, proc, allowed=None):
        """A sleeping process with resident pages, least recently active first. Idle pages go
        before anyone's running work, whatever their tenant (unless `allowed` narrows it, as a
        tenant's own limit does): swapping them costs their owner latency on the next turn,
        never output."""
        sleepers = [q for q in self.kernel.sleeping_resident()
                    if q is not proc and (allowed is None or allowed(q))]
        return min(sleepers, key=lambda q: q.last_token_at or q.spawned_at) if sleepers else None

    def _can_never_fit(self, proc, count: int) -> bool:
        """Whether `proc` could not run even with every other process gone."""
        pages = -(-(proc.num_computed + count) // proc.tenant.page_size)
        pinned = self.mm.frames.num_pinned
        limit = self.mm.cgroups[proc.tenant.cgid].limit
        return pages > self.mm.num_frames - pinned or (limit is not None and pages > limit)

    def preempt(self, proc, plan: Plan) -> None:
        """Swap `proc` out, or drop its pages for recompute when swap is full."""
        try:
            self.mm.swap_out(proc.asid)
            proc.residency, how = Residency.SWAPPED, "swap"
            proc.swaps += 1
            self.stats.swap_outs += 1
        except SwapFull:
            # LAB(swap): BEGIN -> raise NotImplementedError("lab swap: the reclaim in Scheduler.preempt") from None
            self.mm.free(proc.asid)
            proc.asid, proc.residency, how = None, Residency.NONE, "reclaim"
            self.stats.reclaims += 1
            proc.dropped = proc.num_computed          # what readmission must compute or find cached again
            proc.num_computed = 0
            # LAB(swap): END
        if proc.state == State.RUNNING:
            self._unrun(proc)
            proc.state = State.PREEMPTED
            self._wait(proc)
        proc.preemptions += 1
        self.stats.preemptions += 1
        plan.preempted.append((proc, how))
        held = proc.dropped if how == "reclaim" else proc.num_computed
        self.kernel.log("preempt", f"pid {proc.pid} preempted ({how}) holding {held} computed tokens",
                        proc=proc, level="warn")

    def _end(self, proc, plan: Plan, error: str) -> None:
        """Decide that `proc` ends with `error` (the kernel applies it after schedule()): off the
        queues, its memory released now for the rest of this plan."""
        self.remove(proc)
        if proc.asid is not None:
            self.mm.free(proc.asid)
            proc.asid, proc.residency = None, Residency.NONE
        plan.ended.append((proc, error))
        self.stats.oom_kills += 1

    def _end_the_unrunnable(self, admissible: list, plan: Plan) -> None:
        """Nothing runs and nothing could be admitted: no memory will ever come back for the first
        admissible waiting process, so it ends with ENOMEM (the OOM killer) instead of waiting forever."""
        waiting = [p for p in admissible if p.pid in self.waiting]
        if waiting:
            victim = next(iter(self.policy.order(waiting)))
            self._end(victim, plan, "ENOMEM: cannot be admitted: the pool (less pinned shm pages) or its "
                                    "tenant's limit is too small for it")
