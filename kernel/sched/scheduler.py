"""The preemptive scheduler: one time slice is one forward step.

schedule() re-decides every step under a token budget: running decodes first,
then prefill chunks of running processes, then admission of waiting ones
(swapped processes come back by swap-in, new and reclaimed ones by prefill,
mapping what the page cache already holds). At most `chunk` tokens of one
process run per step, so a long prompt never stalls the decodes. Memory comes
from the memory manager as the plan is built, since what fits depends on what
was taken before; the bytes (copy-on-write, swap) move later, in one batch.

When frames run out, a victim is preempted: a sleeping process first, else the
policy's choice among processes not yet served this step and of lower
priority than the one in need. A tenant over its own memory limit preempts its
own processes only; under pool pressure a victim must belong to the tenant in
need or to a tenant above its guaranteed share (min(limit, pool * weight /
total weight of active tenants)). The victim is swapped out when the swap area
has room, else its pages are dropped and recomputed later. Running slots
(max_running) are shared the same way. A tenant below its share of memory or of
slots takes what its next process needs back from tenants above theirs before
anyone is served (kernel/sched/shares.py), and its running processes are planned
before theirs, so that processes already served can never be what it waits for.

The scheduler decides; the kernel applies. A process that can never fit (even
alone) goes into plan.ended with its ENOMEM reason, its memory already released
for the rest of the plan, and the kernel ends it after schedule() returns: the
one out-of-memory path, whether found while making room or because nothing can
run at all.
"""
from __future__ import annotations

from itertools import chain

from kernel.errors import KernelPanic
from kernel.mm import SwapFull
from kernel.proc import Residency, State
from kernel.sched.plan import Plan, Work
from kernel.sched.policies import Policy
from kernel.sched.shares import Shares, claim, memory_victim
from kernel.speculate import MAX_DECODES, may_draft, propose

_SKIP, _STOP = 0, -1     # admission results besides "this many tokens planned"
_ON_ITS_WAY = (State.NEW, State.READY, State.RUNNING, State.PREEMPTED)


class Scheduler:
    def __init__(self, kernel, policy: Policy, token_budget: int, chunk: int, max_running: int,
                 prealloc: bool = False, speculate: int = 0):
        self.kernel = kernel
        self.speculate = speculate   # drafts a decoding process may carry (kernel/speculate.py); 0: none
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
        drafting = self.speculate and sum(p.remaining == 1 for p in self.running.values()) <= MAX_DECODES
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
            if planned == _STOP:
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
        draft = propose(proc, room)
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

    # -- memory for a running process -----------------------------------------------------
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

    # -- admission -----------------------------------------------------------------------
    def _admit(self, proc, budget: int, plan: Plan) -> int:
        """Bring a waiting process in; returns tokens planned, _SKIP or _STOP (pool full)."""
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
                return _SKIP
            while new + cached_hits + growth + mm.watermark > mm.frames.available:   # hits leave the LRU
                sleeper = self._idle_victim(proc)
                if sleeper is None:
                    return _STOP
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
        pages return to the page cache). _SKIP when the tenant's limit is what is short, so
        other tenants may still come in; _STOP when the pool is, so nobody jumps the queue."""
        if fresh:
            self.mm.free(proc.asid)
            proc.asid, proc.residency, proc.num_computed = None, Residency.NONE, 0
        room = self.mm.cgroups[proc.tenant.cgid].room()
        return _SKIP if room is not None and room < self.mm.frames.available - self.mm.watermark else _STOP

    def _run(self, proc, plan: Plan) -> None:
        self._unwait(proc)
        if proc.state != State.PREEMPTED:
            plan.admitted.append(proc)
            self.stats.admissions += 1
            self.kernel.log("admit", f"pid {proc.pid} admitted ({proc.num_computed} tokens cached, "
                            f"{proc.remaining} to compute)", proc=proc)
        self.add_running(proc)
