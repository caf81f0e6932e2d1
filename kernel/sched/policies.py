"""Scheduling policies: who is served first, who is preempted first, what service costs.

A policy orders candidates lazily (`order` is a generator, so a policy can look
at the service already planned in this step before it picks the next one), picks
victims by `victim_key` (largest first), and is told of every planned token
through `charge`. Users pass their own subclass to boot(policy=...).
"""
from __future__ import annotations


class Policy:
    name = "base"
    admits_while_running = True     # False: a batch is admitted together and runs to its end

    def key(self, proc):
        """Service order: smaller first."""
        return (proc.arrival,)

    def order(self, procs):
        """Yield processes in service order. The scheduler charges each one it serves before
        asking for the next, so a policy may use the counters as they move."""
        yield from sorted(procs, key=self.key)

    def victim_key(self, proc):
        """Preemption order: the largest key is preempted first."""
        return self.key(proc)

    def charge(self, proc, tokens: int) -> None:
        """`tokens` were planned for `proc` this step."""

    def on_tenant_active(self, tenant, active_tenants) -> None:
        """`tenant` just went from no runnable process to some."""


class FCFS(Policy):
    """First come, first served; the latest arrival is preempted first."""
    name = "fcfs"


class PriorityPolicy(Policy):
    """Lower nice value first, then arrival; the highest nice value, then the latest arrival, is preempted."""
    name = "priority"

    def key(self, proc):
        return (proc.priority, proc.arrival)


class FairShare(Policy):
    """Weighted fair share across tenants by served tokens (the virtual token counter of VTC).

    Each tenant's counter grows by tokens / weight as it is served; the tenant
    with the smallest counter is served next. A tenant that becomes active is
    lifted to the smallest counter among active tenants, so it cannot claim the
    service it did not ask for while idle.
    """
    name = "fair"

    def __init__(self, prefill_weight: float = 1.0, decode_weight: float = 1.0):
        self.prefill_weight = prefill_weight
        self.decode_weight = decode_weight

    def key(self, proc):
        return (proc.tenant.virtual_tokens, proc.arrival)

    def order(self, procs):
        # LAB(fair): BEGIN -> yield from sorted(procs, key=self.key)
        import heapq
        from itertools import count
        queues: dict = {}
        for proc in sorted(procs, key=lambda p: p.arrival):
            queues.setdefault(proc.tenant.tid, []).append(proc)
        tie = count()
        heap = [(q[0].tenant.virtual_tokens, next(tie), tid) for tid, q in queues.items()]
        heapq.heapify(heap)
        position = dict.fromkeys(queues, 0)
        while heap:
            _, _, tid = heapq.heappop(heap)
            queue = queues[tid]
            proc = queue[position[tid]]
            yield proc
            position[tid] += 1
            if position[tid] < len(queue):       # its counter moved when it was charged: back in by it
                heapq.heappush(heap, (proc.tenant.virtual_tokens, next(tie), tid))
        # LAB(fair): END

    def charge(self, proc, tokens: int) -> None:
        # LAB(fair): BEGIN -> pass
        weight = self.decode_weight if proc.is_decoding else self.prefill_weight
        proc.tenant.virtual_tokens += weight * tokens / proc.tenant.weight
        # LAB(fair): END

    def on_tenant_active(self, tenant, active_tenants) -> None:
        # LAB(fair): BEGIN -> pass
        others = [t.virtual_tokens for t in active_tenants if t is not tenant]
        if others:      # never below the others: service not asked for while idle is not owed
            tenant.virtual_tokens = max(tenant.virtual_tokens, min(others))
        # LAB(fair): END


class StaticBatching(FCFS):
    """Legacy static batching: admit a batch, run it until its last member ends (the convoy effect)."""
    name = "static"
    admits_while_running = False


POLICIES = {cls.name: cls for cls in (FCFS, PriorityPolicy, FairShare, StaticBatching)}


def make_policy(policy) -> Policy:
    from kernel.errors import EINVAL, KvosError
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, type) and issubclass(policy, Policy):
        return policy()
    if isinstance(policy, str) and policy in POLICIES:
        return POLICIES[policy]()
    raise KvosError(EINVAL, f"unknown policy {policy!r}: choose one of {sorted(POLICIES)} or pass a Policy")
