"""Processes: one request (a sequence and its turns) and the process table.

A process owns a token "file" (prompt, generated tokens and later input),
the count of those whose K/V is computed, an address space while it has
pages, its sampling parameters and its own seeded stream of uniforms. States and their
transitions are in docs/processes.md:

  NEW -> READY -> RUNNING -> ZOMBIE (exit, awaiting wait())
  RUNNING -> PREEMPTED -> RUNNING        (swapped out, or reclaimed and recomputed)
  RUNNING -> SLEEPING -> READY           (interactive: a turn ended; write() wakes it)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from kernel.results import ExitStatus  # noqa: F401  (a process's exit status; re-exported)
from kernel.speculate import KEEPS_ENOUGH


class State(str, Enum):
    NEW = "new"              # spawned, not yet seen by the scheduler
    READY = "ready"          # waiting for admission (memory, budget, its turn)
    RUNNING = "running"      # admitted: has pages, gets tokens every step it fits
    PREEMPTED = "preempted"  # pages swapped out or reclaimed; resumes where it was
    SLEEPING = "sleeping"    # interactive, turn ended: pages kept, waits for write()
    ZOMBIE = "zombie"        # exited, exit status kept until wait()


class Residency(str, Enum):
    NONE = "none"            # no address space: never admitted, or reclaimed
    RESIDENT = "resident"    # pages in device frames
    SWAPPED = "swapped"      # pages in the host swap area


@dataclass(eq=False)          # identity: one object per tenant/process
class Process:
    pid: int
    tenant: object                   # kernel.tenant.Tenant
    params: object                   # kernel.sampling.SamplingParams
    uniforms: object                 # kernel.sampling.Uniforms: its own seeded stream of draws
    seed: int = 0                    # what seeded it (forks derive their children's from it)
    priority: int = 0                # nice value: lower runs first under the priority policy
    interactive: bool = False        # sleeps after a turn instead of exiting
    # the token file
    tokens: list = field(default_factory=list)
    prompt_len: int = 0              # tokens of input (prompt and writes) so far
    num_computed: int = 0            # tokens whose K/V is in the address space
    turn_start: int = 0              # index in tokens where this turn's output begins
    turn_generated: int = 0          # tokens sampled in this turn
    output: list = field(default_factory=list)   # (index in tokens) of every generated token
    # memory
    asid: int | None = None
    residency: Residency = Residency.NONE
    shm: int | None = None           # kernel shm id attached at spawn
    # scheduler owns these
    state: State = State.NEW
    arrival: int = 0                 # spawn order, for FCFS and victim choice
    after: int | None = None         # do not admit until this pid has its prompt computed (fork)
    preemptions: int = 0
    swaps: int = 0
    forks: int = 0                   # children forked so far (seeds the next child)
    dropped: int = 0                 # computed tokens lost at the last reclaim
    cow_faults: int = 0
    turn_done: bool = False
    # speculation (kernel/speculate.py): its file as bytes for the lookups; commit_draft records outcomes
    ngram_hay: bytearray | None = None
    draft_misses: int = 0            # drafts in a row of which nothing was taken
    drafts_kept: float = KEEPS_ENOUGH   # moving average of the share of its drafts kept (note_outcome)
    drafts_resume: int = 0           # the step from which it may draft again (backing off after misses)
    prediction: tuple = ()           # the caller's guess of its output (spawn's prediction), token ids
    prediction_hay: bytes | None = None   # the prediction as bytes, 4 a token, for the lookups
    prediction_at: int = 0           # where in it the last draft proposed from it began
    predicted_draft: bool = False    # this step's draft came from the prediction (commit_draft counts it)
    prediction_accepted: int = 0     # drafts from the prediction that the draws kept
    prediction_rejected: int = 0     # and those they did not
    last_reason: str | None = None   # why the last turn ended ("stop", "length")
    # the output stream (kernel/output.py): bytes of the generated tokens, each turn cut at its stop string
    stops: object = None             # kernel.output.StopSet compiled from params.stop, or None
    out_bytes: bytearray = field(default_factory=bytearray)
    stop_state: int = 0              # the StopSet automaton's state over this turn's bytes
    turn_byte_start: int = 0         # where this turn's bytes begin in out_bytes
    # what shapes its draws beyond SamplingParams' arithmetic (sample_rows looks at them only when shaped)
    shaped: bool = False             # it has penalties, a grammar or logprobs
    constraint: object = None        # kernel.grammar.Constraint: its place in its json_schema's grammar
    history: object = None           # kernel.penalties.TokenHistory, built when its penalties first need it
    # results
    read_offset: int = 0             # generated tokens already returned by read()
    text_offset: int = 0             # bytes of out_bytes already returned as text by read()
    logprobs: list = field(default_factory=list)   # per drawn token: (token, logprob, [(token, logprob)] top-k)
    logprob_offset: int = 0          # logprobs entries already returned by read()
    # spawned with prompt_logprobs: its spawn prompt scored by its own rows (kernel/step.py), read() once
    prompt_logprobs: list | None = None  # per spawn-prompt position: (logprob, [(token, logprob)] top-k) or None
    prompt_scored: int = 0           # prompt positions whose rows ran (a prefix): the page cache maps no further
    prompt_logprobs_read: bool = False
    exit: ExitStatus | None = None
    reaped: bool = False             # wait() took it out of the process table
    # who waits for it: (events, callback), run once under the kernel lock (kernel/watch.py)
    watchers: list = field(default_factory=list)
    error: str | None = None
    spawned_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    builds_segment: object = None    # kernel.shm.ShmSegment this process prefills, if any

    @property
    def remaining(self) -> int:
        """Tokens still to compute before the next sample."""
        return len(self.tokens) - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return self.remaining == 1 and self.turn_generated > 0

    @property
    def generated_tokens(self) -> list:
        return [self.tokens[i] for i in self.output]

    @property
    def alive(self) -> bool:
        return self.state != State.ZOMBIE
