"""The virtual-time driver: runs a workload on a booted sim kernel and measures it.

Spawns requests through syscalls as the virtual clock passes their arrival (jumping idle time),
then after every step reads the device's plan: forks samples and beams, ends requests at their
length, reaps exits, samples meminfo. A harness, like a benchmark: it reads the Kernel object
but changes processes only through syscalls. Metrics: docs/simulator.md.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from kernel.errors import KvosError
from kernel.proc import State
from userspace.sim.beam import SimBeamSearch
from userspace.sim.metrics import RequestResult, RunResult
from userspace.sim.workloads import prompt_tokens


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
    """Run `requests` on tenant `tid` of a booted sim kernel `k`.

    share: parallel samples and beams fork one process (pages shared copy-on-write);
    False spawns independent copies with their own token ids (nothing shared).
    record_gaps: keep every time-between-tokens (for stall and tail measurements).
    """

    def __init__(self, k, tid, requests: list, *, share: bool = True, record_gaps: bool = False,
                 sample_interval: float = 0.5, seed: int = 0, beam_alpha: float = 1.0, max_steps: int = 10_000_000):
        self.k, self.tid, self.sys = k, tid, k.syscalls()
        self.device = k.device
        self.requests = requests
        self.share, self.record_gaps = share, record_gaps
        self.sample_interval, self.seed, self.beam_alpha, self.max_steps = sample_interval, seed, beam_alpha, max_steps
        self.vocab = k.tenants[tid].program.vocab_size
        self.max_context = k.tenants[tid].program.max_context
        self.owner: dict = {}            # pid -> _Group, while the process lives
        self.procs: dict = {}            # pid -> Process, while it lives
        self.last_token: dict = {}       # pid -> virtual time of its last token (record_gaps)
        self.gaps: list = []
        self.kv_samples: list = []
        self.step_samples: list = []
        self._generated = 0
        self._seen_plan = None
        self._seen_exits = 0
        self._last_sample = None            # device busy seconds at the last memory sample

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> RunResult:
        k, dev = self.k, self.device
        started = time.perf_counter()
        self.t0 = dev.clock()
        order = sorted(range(len(self.requests)), key=lambda i: self.requests[i].arrival)
        results = [RequestResult(i, r) for i, r in enumerate(self.requests)]
        nxt, steps = 0, 0
        while True:
            now = dev.clock() - self.t0
            while nxt < len(order) and self.requests[order[nxt]].arrival <= now:
                self._spawn(results[order[nxt]])
                nxt += 1
            if k.sched.idle:
                if nxt >= len(order):
                    break
                dev.advance_to(self.t0 + self.requests[order[nxt]].arrival)
                continue
            progressed = k.step()
            steps += 1
            self._after_step()
            if not progressed:
                if nxt >= len(order):
                    raise RuntimeError(f"the kernel cannot make progress with {len(k.sched.waiting)} waiting "
                                       f"and {len(k.sched.running)} running processes")
                dev.advance_to(self.t0 + self.requests[order[nxt]].arrival)
            if steps > self.max_steps:
                raise RuntimeError(f"the run did not finish within {self.max_steps} steps")
        if self.owner:
            raise RuntimeError(f"{len(self.owner)} processes still live after the run")
        end = max((r.finished for r in results if r.finished is not None), default=0.0)
        stats = vars(k.stats)
        return RunResult(results, end, dev.busy, time.perf_counter() - started,
                         {key: v for key, v in stats.items() if isinstance(v, (int, float))},
                         self._weighted_samples(), self.step_samples, self.gaps)

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
                pid = self.sys.spawn(self.tid, tokens, max_tokens=req.budget, ignore_eos=True, seed=index)
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

    def _adopt(self, pid: int, group: _Group, now: float | None = None) -> None:
        self.owner[pid] = group
        self.procs[pid] = self.k.procs[pid]
        group.live.add(pid)
        if now is not None and self.record_gaps:
            self.last_token[pid] = now

    # -- after every step -------------------------------------------------------------------------
    def _after_step(self) -> None:
        dev, k = self.device, self.k
        plan = dev.last_plan
        if plan is not None and plan is not self._seen_plan:
            self._seen_plan = plan
            generated = k.stats.generated_tokens
            self.step_samples.append((dev.last_cost.total, len(k.sched.running), len(k.sched.waiting),
                                      generated - self._generated))
            self._generated = generated
            self._tokens(plan, dev.clock())
        if k.stats.exits != self._seen_exits:
            self._seen_exits = k.stats.exits
            self._reap()
        if self._last_sample is None or dev.busy - self._last_sample >= self.sample_interval:
            self._sample_memory()

    def _tokens(self, plan, now: float) -> None:
        rel = now - self.t0
        beams = []
        for work in plan.works:
            if not work.last:
                continue
            proc = work.proc
            group = self.owner.get(proc.pid)
            if group is None:
                continue
            pid = proc.pid
            if self.record_gaps:
                prev = self.last_token.get(pid)
                if prev is not None:
                    self.gaps.append(now - prev)
                self.last_token[pid] = now
            if group.result.first_token is None:
                group.result.first_token = rel
            if not proc.alive:
                continue
            if group.cut is not None and len(proc.output) >= group.cut:
                group.cut_pids.add(pid)           # its EOS: the prescribed length is reached
                self.sys.kill(pid)
                continue
            if pid == group.fork_root and group.fork_n:
                for child in self.sys.fork(pid, group.fork_n):
                    self._adopt(child, group, now)
                group.fork_n = 0
            if group.beam is not None:
                group.fresh.add(pid)
                beams.append(group)
        for group in beams:
            self._beam_round(group, now)

    def _beam_round(self, group: _Group, now: float) -> None:
        """A round once every live beam has a new token and all are resident and running."""
        beam = group.beam
        if not beam.beams or not group.fresh.issuperset(beam.beams):
            return
        if any(self.procs[p].state != State.RUNNING for p in beam.beams):
            return
        group.fresh = set()
        _, forked = beam.round(self.sys)
        for children in forked.values():
            for child in children:
                self._adopt(child, group, now)

    def _reap(self) -> None:
        rel = self.device.clock() - self.t0
        for pid in [p for p, proc in self.procs.items() if not proc.alive]:
            group = self.owner.pop(pid)
            del self.procs[pid]
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

    def _sample_memory(self) -> None:
        """KV utilisation from meminfo, and the frames the live processes would hold unshared."""
        busy = self.device.busy             # weights: device time, so idle gaps weigh nothing
        info = self.sys.meminfo()
        if info.mapped == 0 and not self.procs:
            return
        spaces = self.k.mm.spaces
        unshared = sum(len(spaces[p.asid].frames) for p in self.procs.values()
                       if p.asid is not None and p.asid in spaces)
        self._last_sample = busy
        occupancy = info.tokens_stored / (info.total * (info.token_capacity / info.mapped)) if info.mapped else 0.0
        self.kv_samples.append((busy, info.utilization, occupancy, info.mapped, unshared))

    def _weighted_samples(self) -> list:
        """Each memory sample holds until the next one (the last until the end): (device seconds, ...)."""
        ends = [s[0] for s in self.kv_samples[1:]] + [self.device.busy]
        return [(end - s[0], *s[1:]) for s, end in zip(self.kv_samples, ends)]
