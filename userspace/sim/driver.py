"""The virtual-time driver: runs a workload through a root syscall handle and measures it.

Spawns requests as the virtual clock passes their arrival (loopctl "idle" jumps idle time), runs one
step per trace(since, timeout) and from its record forks samples and beams, ends requests at their
length, reaps exits, samples meminfo and ps. Syscalls only: a daemon's Client would do. docs/simulator.md.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import numpy as np

from kernel.errors import EBUSY, KvosError
from userspace.sim.beam import SimBeamSearch
from userspace.sim.metrics import RequestResult, RunResult
from userspace.sim.workloads import prompt_tokens

# How long one trace() call may wait for its step. In manual mode it runs the step itself and
# returns at once, so this only bounds a kernel that something else is stepping.
STEP_TIMEOUT = 60.0


@dataclass
class _Group:
    """The processes serving one request."""
    result: RequestResult
    live: set = field(default_factory=set)
    cut: int | None = None               # end a process at this many tokens (budget > output)
    cut_pids: set = field(default_factory=set)
    fork_root: int | None = None         # fork n - 1 samples off this pid after its prefill
    fork_n: int = 0
    beam: SimBeamSearch | None = None
    fresh: set = field(default_factory=set)   # beams that produced a token since the last round


class Driver:
    """Run `requests` on tenant `tid` through `root`, a root syscall handle of a sim kernel in manual
    mode (no loop thread: the driver decides when each step runs).

    share: parallel samples and beams fork one process (pages shared copy-on-write);
    False spawns independent copies with their own token ids (nothing shared).
    record_gaps: keep every time-between-tokens (for stall and tail measurements).
    """

    def __init__(self, root, tid, requests: list, *, share: bool = True, record_gaps: bool = False,
                 sample_interval: float = 0.5, seed: int = 0, beam_alpha: float = 1.0, max_steps: int = 10_000_000):
        self.sys, self.tid = root, tid
        self.requests = requests
        self.share, self.record_gaps = share, record_gaps
        self.sample_interval, self.seed, self.beam_alpha, self.max_steps = sample_interval, seed, beam_alpha, max_steps
        info = root.tenantinfo(tid)
        self.vocab, self.max_context = info.vocab_size, info.max_context
        self.owner: dict = {}            # pid -> _Group, while the process lives (until reaped)
        self.running: set = set()        # of those, the ones on the run queue (kept for beam rounds only)
        self.has_beams = share and any(r.beam_width > 1 for r in requests)
        self.reaped_early: set = set()   # reaped before a step record reported their exit: skip it there
        self.last_token: dict = {}       # pid -> virtual time of its last token (record_gaps)
        self.gaps: list = []
        self.kv_samples: list = []
        self.step_samples: list = []
        self.cursor = 0                  # the step of the last record seen
        self.clock = 0.0                 # the kernel's clock (seconds since boot) as of the last record or idle jump
        self.busy = 0.0                  # device seconds spent in steps: the sum of their costs
        self._last_sample = None         # busy seconds at the last memory sample

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> RunResult:
        started = time.perf_counter()
        stat = self.sys.schedstat()
        self.t0 = self.clock = stat.clock
        self.busy, self.cursor = stat.busy_seconds, stat.steps
        order = sorted(range(len(self.requests)), key=lambda i: self.requests[i].arrival)
        results = [RequestResult(i, r) for i, r in enumerate(self.requests)]
        nxt, steps = 0, 0
        while True:
            now = self.clock - self.t0
            while nxt < len(order) and self.requests[order[nxt]].arrival <= now:
                self._spawn(results[order[nxt]])
                nxt += 1
            # manual mode: this runs the next step and returns its record, or [] when nothing is runnable
            records = self.sys.trace(since=self.cursor, timeout=STEP_TIMEOUT)
            if not records:
                self._reap_zombies()
                if nxt >= len(order):
                    break
                self._idle_until(self.t0 + self.requests[order[nxt]].arrival)
                continue
            for record in records:
                steps += 1
                self._after_step(record)
            if steps > self.max_steps:
                raise RuntimeError(f"the run did not finish within {self.max_steps} steps")
        if self.owner:
            raise RuntimeError(f"the kernel cannot make progress: {len(self.owner)} processes still live "
                               f"after the last step")
        end = max((r.finished for r in results if r.finished is not None), default=0.0)
        stat = self.sys.schedstat()
        counters = {f.name: getattr(stat, f.name) for f in fields(stat)
                    if isinstance(getattr(stat, f.name), (int, float))}
        return RunResult(results, end, self.busy, time.perf_counter() - started, counters,
                         self._weighted_samples(), self.step_samples, self.gaps)

    def _idle_until(self, t: float) -> None:
        """Let the virtual clock jump to `t` (the next arrival): nothing is runnable until then."""
        try:
            self.sys.loopctl("idle", until=t)
        except KvosError as err:
            if err.errno != EBUSY:
                raise
            raise RuntimeError("the kernel cannot make progress: processes wait but no step runs") from None
        self.clock = max(self.clock, t)

    # -- spawning -----------------------------------------------------------------------------
    def _spawn(self, result: RequestResult) -> None:
        req, index = result.request, result.index
        group = _Group(result)
        group.cut = req.output_len if req.budget > req.output_len else None
        # the kernel ends a process at the model's context, as any server would: count it as truncated
        result.expected = min(req.output_len, self.max_context - req.prompt_len)
        fan = max(req.n, req.beam_width, 1)
        copies = 1 if self.share else fan
        for copy in range(copies):
            tokens = prompt_tokens(req, index, self.vocab, self.seed, copy=copy)
            try:
                # seed: what a speculating process's kept drafts are drawn from (seed 0: the index alone)
                pid = self.sys.spawn(self.tid, tokens, max_tokens=req.budget, ignore_eos=True,
                                     seed=self.seed * 1_000_003 + index)
            except KvosError as err:            # ENOMEM: longer than the context or the pool
                result.rejected = f"{err.errno}: {err.reason}"
                return
            self._adopt(pid, group)
        if self.share and fan > 1:
            root = next(iter(group.live))
            if req.output_len == 1:          # it exits with its first token: fork now, share through the page cache
                for child in self.sys.fork(root, fan - 1):
                    self._adopt(child, group)
            elif req.beam_width > 1:
                group.beam = SimBeamSearch(req.beam_width, np.random.default_rng([self.seed, 3, index]),
                                           self.beam_alpha)
                group.beam.start(root)
            else:
                group.fork_root, group.fork_n = root, req.n - 1

    def _adopt(self, pid: int, group: _Group, now: float | None = None, running: bool = False) -> None:
        """running: a fork of a running parent, which the kernel puts on the run queue at once."""
        self.owner[pid] = group
        group.live.add(pid)
        if running:
            self.running.add(pid)
        if now is not None and self.record_gaps:
            self.last_token[pid] = now

    # -- after every step -------------------------------------------------------------------------
    def _after_step(self, record) -> None:
        self.cursor, self.clock = record.step, record.ended_at
        # the device's own price of the step (the clock difference, record.seconds, may differ in the last bit)
        cost = record.cost["total"] if record.cost else record.seconds
        self.busy += cost
        generated = sum(w.token is not None for w in record.works)
        host_wait = record.cost.get("host_wait", 0.0) if record.cost else 0.0   # the GPU waiting for the host
        self.step_samples.append((cost, record.running, record.waiting, generated, host_wait))
        exited = []
        for pid, _ in record.exits:
            if pid in self.reaped_early:
                self.reaped_early.discard(pid)
            elif pid in self.owner:
                exited.append(pid)
        if self.has_beams:
            self._track(record, exited)
        killed = self._tokens(record, set(exited))
        self.reaped_early.update(killed)
        self._reap(exited + killed, record.ended_at - self.t0)
        if self._last_sample is None or self.busy - self._last_sample >= self.sample_interval:
            self._sample_memory()

    def _track(self, record, exited: list) -> None:
        """Who is on the run queue now. Admitted or swapped in joins it, preempted leaves it (a process
        swapped in and preempted again in one step is in both); a process that computed stays, since
        the kernel never preempts one it has served in that step."""
        mine, running = self.owner, self.running
        running.update(p for p in record.admitted if p in mine)
        running.update(p for p in record.swapped_in if p in mine)
        running.difference_update(p for p, _ in record.preempted)
        running.update(w.pid for w in record.works if w.pid in mine)
        running.difference_update(exited)

    def _tokens(self, record, exited: set) -> list:
        """Times each new token, ends processes at their length, forks samples, runs beam rounds.
        Returns the pids it killed."""
        now = record.ended_at
        rel = now - self.t0
        beams, killed = [], []
        for work in record.works:
            if work.token is None:               # a prefill chunk short of the prompt's end: no token yet
                continue
            pid = work.pid
            group = self.owner.get(pid)
            if group is None:
                continue
            if self.record_gaps:
                prev = self.last_token.get(pid)
                if prev is not None:
                    self.gaps.append(now - prev)
                self.last_token[pid] = now
            if group.result.first_token is None:
                group.result.first_token = rel
            if pid in exited:
                continue
            if group.cut is not None and work.generated >= group.cut:
                group.cut_pids.add(pid)           # its EOS: the prescribed length is reached
                self.sys.kill(pid)
                killed.append(pid)
                continue
            if pid == group.fork_root and group.fork_n:
                for child in self.sys.fork(pid, group.fork_n):
                    self._adopt(child, group, now, running=True)
                group.fork_n = 0
            if group.beam is not None:
                group.fresh.add(pid)
                beams.append(group)
        for group in beams:
            killed += self._beam_round(group, now)
        return killed

    def _beam_round(self, group: _Group, now: float) -> list:
        """A round once every live beam has a new token and all are resident and running. -> killed pids"""
        beam = group.beam
        if not beam.beams or not group.fresh.issuperset(beam.beams):
            return []
        if not self.running.issuperset(beam.beams):
            return []
        group.fresh = set()
        killed, forked = beam.round(self.sys)
        for children in forked.values():
            for child in children:
                self._adopt(child, group, now, running=True)
        return killed

    def _reap(self, pids: list, rel: float) -> None:
        for pid in pids:
            group = self.owner.pop(pid)
            self.running.discard(pid)
            self.last_token.pop(pid, None)
            group.live.discard(pid)
            status = self.sys.wait(pid)
            result = group.result
            if status.reason == "error":
                result.errors.append(f"request {result.index} pid {pid}: {status.error}")
            elif status.reason != "killed" or pid in group.cut_pids:
                result.tokens += len(status.tokens)
                result.sequences += 1
                if len(status.tokens) != result.expected:
                    result.errors.append(f"request {result.index} pid {pid}: {len(status.tokens)} tokens, "
                                         f"prescribed {result.expected}")
            if group.beam is not None:
                group.beam.beams.pop(pid, None)
            if not group.live:
                result.finished = rel

    def _reap_zombies(self) -> None:
        """Nothing is runnable: processes of ours still listed ended between records (the kernel's OOM
        killer in a step that computed nothing), so no record reported them yet. ps() shows them."""
        if not self.owner:
            return
        dead = [p.pid for p in self.sys.ps() if p.pid in self.owner and p.state == "zombie"]
        self.reaped_early.update(dead)
        self._reap(dead, self.clock - self.t0)

    def _sample_memory(self) -> None:
        """KV utilisation from meminfo, and the frames the live processes would hold unshared (ps)."""
        busy = self.busy                     # weights: device time, so idle gaps weigh nothing
        info = self.sys.meminfo()
        if info.mapped == 0 and not self.owner:
            return
        # a process's resident pages, each counted for every process that maps it (swapped ones hold none)
        unshared = sum(p.pages - p.swapped_pages for p in self.sys.ps() if p.pid in self.owner) if self.owner else 0
        self._last_sample = busy
        occupancy = info.tokens_stored / (info.total * (info.token_capacity / info.mapped)) if info.mapped else 0.0
        self.kv_samples.append((busy, info.utilization, occupancy, info.mapped, unshared))

    def _weighted_samples(self) -> list:
        """Each memory sample holds until the next one (the last until the end): (device seconds, ...)."""
        ends = [s[0] for s in self.kv_samples[1:]] + [self.busy]
        return [(end - s[0], *s[1:]) for s, end in zip(self.kv_samples, ends)]
