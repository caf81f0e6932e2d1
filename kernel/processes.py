"""The process table's verbs: create, fork, exit, reap, end a turn, resume (part of Kernel).

A process enters the table at create_process (queued for admission) or fork_process (sharing its
parent's pages copy-on-write, or waiting for the parent's prompt to reach the page cache), and
leaves it at reap, which wait() calls after exit_process has given its pages back and kept its
exit status. An interactive process sleeps at end_turn instead of exiting, keeps its pages, and
resume starts its next turn. Every verb runs under the kernel lock and wakes the callers
waiting on the process (kernel/watch.py).
"""
from __future__ import annotations

import torch

from kernel.proc import ExitStatus, Process, Residency, State
from kernel.sampling import SamplingParams, Uniforms, shapes
from kernel.watch import wake


class ProcessTable:
    """Kernel's process verbs (its procs table, scheduler, memory manager, clock and log)."""

    def create_process(self, tenant, tokens, params: SamplingParams, priority=0, interactive=False,
                       shm=None, seed=None, stops=None, constraint=None, prediction=None) -> Process:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.rng))
        proc = Process(pid=self._next("pid"), tenant=tenant, params=params, seed=seed,
                       uniforms=Uniforms(seed), priority=priority,
                       interactive=interactive, tokens=list(tokens), prompt_len=len(tokens),
                       turn_start=len(tokens), arrival=self._next("arrival"), shm=shm,
                       spawned_at=self.clock(), stops=stops, constraint=constraint,
                       shaped=shapes(params, constraint))
        if params.prompt_logprobs is not None:
            proc.prompt_logprobs = [None] * len(tokens)
        if prediction:
            proc.prediction = tuple(prediction)
        self.procs[proc.pid] = proc
        tenant.pids.add(proc.pid)
        tenant.num_live += 1
        self.sched.enqueue(proc)
        return proc

    def fork_process(self, parent: Process, n: int) -> list:
        children = []
        for _ in range(n):
            # The k-th child of a parent gets a seed from the parent's seed and k alone, so a
            # seeded request forked n ways reproduces all n outputs, whatever the pids are.
            parent.forks += 1
            seed = (parent.seed * 1_000_003 + parent.forks) % 2**62
            child = Process(pid=self._next("pid"), tenant=parent.tenant, params=parent.params, seed=seed,
                            uniforms=Uniforms(seed), priority=parent.priority,
                            interactive=parent.interactive, tokens=list(parent.tokens),
                            prompt_len=parent.prompt_len, turn_start=parent.turn_start,
                            turn_generated=parent.turn_generated, output=list(parent.output),
                            arrival=self._next("arrival"), shm=parent.shm, turn_done=parent.turn_done,
                            last_reason=parent.last_reason, stops=parent.stops,
                            out_bytes=bytearray(parent.out_bytes), turn_byte_start=parent.turn_byte_start,
                            stop_state=parent.stop_state, spawned_at=self.clock(), shaped=parent.shaped,
                            constraint=None if parent.constraint is None else parent.constraint.fork(),
                            prompt_logprobs=None if parent.prompt_logprobs is None else list(parent.prompt_logprobs),
                            prompt_scored=parent.prompt_scored, prediction=parent.prediction,
                            prediction_at=parent.prediction_at)
            self.procs[child.pid] = child
            parent.tenant.pids.add(child.pid)
            parent.tenant.num_live += 1
            if parent.residency == Residency.RESIDENT:
                child.asid = self.mm.fork(parent.asid)
                child.residency = Residency.RESIDENT
                child.num_computed = parent.num_computed
            elif parent.num_computed < parent.prompt_len or parent.residency == Residency.NONE:
                child.after = parent.pid             # share its prompt through the page cache once computed
            if parent.state == State.RUNNING and child.residency == Residency.RESIDENT:
                self.sched.add_running(child)
            elif parent.state == State.SLEEPING:
                child.state = State.SLEEPING
            else:
                self.sched.enqueue(child)
            children.append(child)
            self.log("fork", f"pid {parent.pid} forked pid {child.pid} (seed {seed})", proc=child)
        return children

    def exit_process(self, proc: Process, reason: str, error: str | None = None) -> None:
        """End a process: pages go back (full ones stay in the page cache), status kept for wait()."""
        if not proc.alive:
            return
        self.sched.remove(proc)
        if proc.asid is not None:
            self.mm.free(proc.asid)
            proc.asid, proc.residency = None, Residency.NONE
        proc.state = State.ZOMBIE
        proc.tenant.num_live -= 1
        proc.error = error
        proc.turn_done = True
        proc.exit = ExitStatus(         # its text is the caller's to decode (wait's finish half)
            pid=proc.pid, reason=reason, tokens=proc.generated_tokens, text="",
            prompt_tokens=proc.prompt_len, error=error, accepted_prediction_tokens=proc.prediction_accepted,
            rejected_prediction_tokens=proc.prediction_rejected,
            time_to_first_token=(proc.first_token_at - proc.spawned_at) if proc.first_token_at else None,
            elapsed=self.clock() - proc.spawned_at)
        self.stats.exits += 1
        self._events.exits.append((proc.pid, reason))
        level = "error" if reason == "error" else "info"
        self.log("exit", f"pid {proc.pid} exited ({reason}{': ' + error if error else ''}) after "
                 f"{len(proc.output)} tokens", proc=proc, level=level)
        if proc.builds_segment is not None:          # a failed builder takes its segment with it
            self.shm_segments.pop(proc.builds_segment.shmid, None)
            self.reap(proc)
        wake(proc, "exit")
        self.changed.notify_all()

    def reap(self, proc: Process) -> None:
        """Take an exited process out of the process table (wait() does, after exit_process)."""
        if self.procs.get(proc.pid) is proc:
            del self.procs[proc.pid]
        proc.tenant.pids.discard(proc.pid)
        proc.reaped = True
        wake(proc, "exit")                      # other waits on it learn it is gone

    def end_turn(self, proc: Process, reason: str) -> None:
        proc.turn_done = True
        proc.last_reason = reason
        if proc.interactive:
            self.sched.remove(proc)
            proc.state = State.SLEEPING
            self.log("sleep", f"pid {proc.pid} turn ended ({reason}); sleeping", proc=proc)
            wake(proc, "turn")
        else:
            self.exit_process(proc, reason)

    def resume(self, proc: Process, tokens: list) -> None:
        """write(): new input for a sleeping process starts its next turn; its pages stay where they are."""
        proc.tokens.extend(tokens)
        proc.prompt_len += len(tokens)
        proc.turn_start = len(proc.tokens)
        proc.turn_generated = 0
        proc.turn_done = False
        proc.turn_byte_start, proc.stop_state = len(proc.out_bytes), 0
        proc.history = None                          # the penalties see the new input from the next draw
        if proc.constraint is not None:
            proc.constraint.reset()                  # each turn's output is one value of the schema
        self.sched.enqueue(proc)
