"""The preemptive scheduler: one time slice is one forward step.

schedule() re-decides every step under a token budget: running decodes first,
then prefill chunks of running processes, then admission of waiting ones
(kernel/sched/admission.py: swapped processes come back by swap-in, new and
reclaimed ones by prefill, mapping what the page cache already holds). At most
`chunk` tokens of one process run per step, so a long prompt never stalls the
decodes. Memory comes from the memory manager as the plan is built, since what
fits depends on what was taken before; the bytes (copy-on-write, swap) move
later, in one batch. When frames run out, a victim is preempted
(kernel/sched/preempt.py).

A tenant below its share of memory or of running slots (max_running, shared
as memory is) takes what its next process needs back from tenants above theirs
before anyone is served (kernel/sched/shares.py), and its running processes are
planned before theirs, so that processes already served can never be what it
waits for.

The scheduler decides; the kernel applies: the plan (kernel/sched/plan.py)
carries every decision, and Kernel.step applies it after schedule() returns.
Scheduler is one class in three files, one mechanism each: the queues and the
plan here, admission and preemption in the mixins it is built from.
"""
from __future__ import annotations

from itertools import chain

from kernel.proc import State
from kernel.sched.admission import STOP, Admission
from kernel.sched.plan import Plan, Work
from kernel.sched.policies import Policy
from kernel.sched.preempt import Preemption
from kernel.sched.shares import Shares, claim
from kernel.speculate import MAX_DECODES, may_draft, propose_any, propose_filler


class Scheduler(Admission, Preemption):
    def __init__(self, kernel, policy: Policy, token_budget: int, chunk: int, max_running: int,
                 prealloc: bool = False, speculate: int = 0, speculate_batch: int = MAX_DECODES):
        self.kernel = kernel
        self.speculate = speculate   # drafts a decoding process may carry (kernel/speculate.py); 0: none
        self.speculate_batch = speculate_batch   # ... while at most this many processes decode in the step
        self.propose = propose_any if kernel.device.has_tensors else propose_filler   # where drafts come from
        self.policy = policy
        self.token_budget = token_budget
        self.chunk = chunk
        self.max_running = max_running
        self.prealloc = prealloc
        self.running: dict = {}      # pid -> RUNNING process (insertion-ordered)
        self.waiting: dict = {}      # pid -> NEW, READY or PREEMPTED process
        self.queued: dict = {}       # tid -> processes of that tenant waiting
        self.running_by: dict = {}   # tid -> processes of that tenant running
        self.served: set = set()     # pids planned in the step being built
        self._shares = None          # the step's guaranteed shares (kernel/sched/shares.py)

    @property
    def mm(self):
        return self.kernel.mm

    @property
    def stats(self):
        return self.kernel.stats

    # -- queues -------------------------------------------------------------------
    def enqueue(self, proc) -> None:
        """Queue a process for admission (spawned, forked, or woken by write)."""
        tenant = proc.tenant
        if not self.queued.get(tenant.tid) and not any(p.tenant is tenant for p in self.running.values()):
            active = {p.tenant for p in self.running.values()} | {p.tenant for p in self.waiting.values()}
            self.policy.on_tenant_active(tenant, active)
        if proc.state not in (State.NEW, State.PREEMPTED):
            proc.state = State.READY
        self._wait(proc)

    def _wait(self, proc) -> None:
        self.waiting[proc.pid] = proc
        self.queued[proc.tenant.tid] = self.queued.get(proc.tenant.tid, 0) + 1

    def _unwait(self, proc) -> None:
        del self.waiting[proc.pid]
        self.queued[proc.tenant.tid] -= 1

    def add_running(self, proc) -> None:
        proc.state = State.RUNNING
        self.running[proc.pid] = proc
        self.running_by[proc.tenant.tid] = self.running_by.get(proc.tenant.tid, 0) + 1

    def _unrun(self, proc) -> None:
        del self.running[proc.pid]
        self.running_by[proc.tenant.tid] -= 1

    def remove(self, proc) -> None:
        if proc.pid in self.running:
            self._unrun(proc)
        if proc.pid in self.waiting:
            self._unwait(proc)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    # -- the plan --------------------------------------------------------------------
    def schedule(self) -> Plan:
        plan = Plan()
        self.served = set()
        shares = self._shares = Shares(self)
        # Claims are between tenants: with one, there is nobody to take from.
        claims = claim(self, shares, self._admissible(), plan) if self.waiting and not shares.single else []
        budget = self.token_budget
        # LAB(sched): BEGIN -> groups = (list(self.running.values()),)
        decoders = [p for p in self.running.values() if p.remaining == 1]
        prefillers = [p for p in self.running.values() if p.remaining > 1]
        groups = (decoders, prefillers)      # decodes first: a long prompt never stalls a running stream
        # LAB(sched): END
        drafting = self.speculate and sum(p.remaining == 1 for p in self.running.values()) <= self.speculate_batch
        for group in groups:
            # Tenants within their memory share first: one above it is then never served before
            # them, so it can always be what they preempt when they need a frame.
            if shares.single:
                ordered = self.policy.order(group)
            else:
                over = {t: shares.over_memory(t) for t in shares.active}
                ordered = chain(self.policy.order([p for p in group if not over[p.tenant]]),
                                self.policy.order([p for p in group if over[p.tenant]]))
            for proc in ordered:
                if budget <= 0 or len(plan.works) >= self.max_running:
                    break
                if proc.state != State.RUNNING:          # preempted as a victim earlier in this step
                    continue
                count = self._make_room(proc, self.quantum(proc, budget), plan)
                if count:
                    draft = self._draft(proc, count, budget - count) if drafting else ()
                    self._plan_work(proc, count, plan, draft)
                    budget -= count + len(draft)
        admissible = self._admissible()        # now: a victim of the step so far may come straight back
        claimed = {p.pid for p in claims}
        for proc in chain(claims, (p for p in self.policy.order(admissible) if p.pid not in claimed)):
            if budget <= 0 or len(self.running) >= self.max_running:
                break
            if proc.pid not in self.waiting:                 # admitted already, as a claim
                continue
            planned = self._admit(proc, budget, plan)
            if planned == STOP:
                break
            budget -= planned
        if plan.empty and not self.running and not plan.preempted and not plan.ended:
            self._end_the_unrunnable(admissible, plan)
        for proc in self.waiting.values():
            if proc.state == State.NEW:
                proc.state = State.READY
        return plan

    def quantum(self, proc, budget: int) -> int:
        """Tokens `proc` may compute in this step, memory permitting, with `budget` tokens of the
        step left: what it still has to compute, at most one chunk (chunked prefill), at most the budget."""
        # LAB(sched): BEGIN -> return proc.remaining
        return min(proc.remaining, self.chunk, budget)
        # LAB(sched): END

    def _draft(self, proc, count: int, budget: int) -> tuple:
        """Tokens to compute after a decoding process's last one, on speculation (kernel/speculate.py):
        no more than the budget, the turn's tokens after the next and the context allow, and only
        when their frames are free now (a guess never preempts anyone)."""
        if count != 1 or proc.remaining != 1 or proc.builds_segment is not None \
                or not may_draft(proc, self.stats.steps):
            return ()
        room = min(self.speculate, budget, proc.params.max_tokens - proc.turn_generated - 1,
                   proc.tenant.program.max_context - len(proc.tokens) - 1)
        if room <= 0:
            return ()
        draft = self.propose(proc, room)
        return draft if draft and self._fits(proc, 1 + len(draft)) else ()

    def _plan_work(self, proc, count: int, plan: Plan, draft: tuple = ()) -> None:
        mm = self.kernel.mm
        start = proc.num_computed
        faults = mm.cow_faults
        slots = mm.append(proc.asid, proc.tokens[start:start + count] + list(draft) if draft
                          else proc.tokens[start:start + count])
        if mm.cow_faults != faults:
            proc.cow_faults += mm.cow_faults - faults
            plan.cow_faults.append(proc)
            self.kernel.log("cow", f"pid {proc.pid} wrote into a shared page: copied to a private frame",
                            proc=proc)
        last = start + count == len(proc.tokens)
        logits = last and proc.builds_segment is None
        plan.works.append(Work(proc, start, count + len(draft), slots, last, logits,
                               logits and proc.params.max_tokens > proc.turn_generated, draft))
        computed = count + len(draft)
        if proc.is_decoding:
            plan.decode_tokens += computed
        else:
            plan.prefill_tokens += computed
        self.policy.charge(proc, computed)
        proc.tenant.served_tokens += computed
        self.served.add(proc.pid)
