"""Guaranteed shares of the frame pool and of the running slots, and the claims that enforce them.

A tenant's share of memory is min(its limit, pool x its weight / the weights of the tenants that
hold or want memory); its share of running slots is max_running x its weight / the weights of the
tenants that run or wait (at least one). A tenant within its share is never pushed out by one
above its share, and one below its share takes back what its next process needs before anyone
else is served in a step: otherwise processes served first (the decodes, all of them, most steps)
could never be preempted for it, and it would wait until the others finished. Computed once per
step (Shares), because who is active does not change while a plan is built.
"""
from __future__ import annotations

from kernel.proc import Residency


class Shares:
    """The shares of one step: built when schedule() begins."""

    def __init__(self, sched):
        self.sched = sched
        tenants = sched.kernel.tenants
        queued = {tenants[tid] for tid, n in sched.queued.items() if n}
        running = {tenants[tid] for tid, n in sched.running_by.items() if n}
        # One tenant (the usual case): no share to defend, and no need to look at every process.
        self.single = len(tenants) <= 1
        sleeping = set() if self.single else {p.tenant for p in sched.kernel.sleeping_resident()}
        self.active = queued | running | sleeping
        self.weight = sum(t.weight for t in self.active)
        self.slot_weight = sum(t.weight for t in queued | running)

    def memory(self, tenant) -> float:
        """Frames `tenant` is guaranteed this step."""
        total = self.weight if tenant in self.active else self.weight + tenant.weight
        share = self.sched.mm.num_frames * tenant.weight / total
        return share if tenant.mem_limit is None else min(share, tenant.mem_limit)

    def over_memory(self, tenant, extra: int = 0) -> bool:
        """Whether `tenant` holds (with `extra` more frames would hold) more than its share."""
        return self.sched.mm.cgroups[tenant.cgid].charged + extra > self.memory(tenant)

    def slots(self, tenant) -> int:
        """Running slots `tenant` is guaranteed this step."""
        total = self.slot_weight or tenant.weight
        return max(1, int(self.sched.max_running * tenant.weight / total))

    def over_slots(self, tenant) -> bool:
        return self.sched.running_by.get(tenant.tid, 0) > self.slots(tenant)


def frames_to_admit(sched, proc) -> int:
    """Frames admitting `proc` takes at most: its swapped pages and room for its next token, or the
    pages of its first chunk (page-cache hits would make it less)."""
    mm = sched.mm
    if proc.residency == Residency.SWAPPED:
        new, _, cached = mm.swap_in_plan(proc.asid)
        space = mm.space(proc.asid)
        return new + cached + int(space.num_tokens % space.page_size == 0)
    tokens = sched.quantum(proc, sched.token_budget)
    return -(-tokens // proc.tenant.page_size)


def claim(sched, shares: Shares, admissible: list, plan) -> list:
    """Before anyone is served: every tenant below its share of slots or of memory whose next
    admissible process cannot get in takes what that process needs from tenants above their
    shares. Returns those processes, for the scheduler to admit first."""
    firsts: dict = {}
    for proc in admissible:
        best = firsts.get(proc.tenant)
        if best is None or sched.policy.key(proc) < sched.policy.key(best):
            firsts[proc.tenant] = proc
    claims = []
    mm = sched.mm
    for tenant, proc in firsts.items():
        took = False
        if len(sched.running) >= sched.max_running and sched.running_by.get(tenant.tid, 0) < shares.slots(tenant):
            rich = [t for t in shares.active if t is not tenant and shares.over_slots(t)]
            if rich:
                richest = max(rich, key=lambda t: sched.running_by[t.tid] / shares.slots(t))
                sched.preempt(max((q for q in sched.running.values() if q.tenant is richest),
                                  key=sched.policy.victim_key), plan)
                took = True
        need = frames_to_admit(sched, proc)
        if need + mm.watermark > mm.frames.available and not shares.over_memory(tenant, extra=need):
            while need + mm.watermark > mm.frames.available:
                victim = memory_victim(sched, shares, tenant)
                if victim is None:
                    break
                sched.preempt(victim, plan)
                took = True
                if proc.residency == Residency.SWAPPED:       # cached pages it would map may have gone
                    need = frames_to_admit(sched, proc)
        if took:
            claims.append(proc)
    return claims


def memory_victim(sched, shares: Shares, tenant):
    """A process of a tenant above its memory share whose pages may go for `tenant`: an idle
    sleeper first (least recently active), else the policy's victim among running processes not
    served in this step. None when there is none."""
    others = [q for q in sched.kernel.sleeping_resident() if q.tenant is not tenant and shares.over_memory(q.tenant)]
    if others:
        return min(others, key=lambda q: q.last_token_at or q.spawned_at)
    running = [q for q in sched.running.values() if q.tenant is not tenant and q.pid not in sched.served
               and shares.over_memory(q.tenant)]
    return max(running, key=sched.policy.victim_key) if running else None
