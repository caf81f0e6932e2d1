"""The workload of `kvos demo` and `kvos top`: clients on the syscalls, each in its own thread.

Two tenants of one model: an interactive assistant (its questions arrive a few
steps apart and share a system prompt through a shm segment) and a batch job;
one parallel sample (fork) and one beam search (fork the best, kill the rest).
Each client uses its tenant's own handle and waits while the kernel's loop thread
steps, the way callers of a server would. The system prompt is split off the chat
with the tokenize syscall, and beams are turned into text with detokenize.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from userspace.libc import beam_search, parallel_sample
from userspace.shell import prompts


@dataclass
class Reply:
    """What one client got back: the text the summary shows and the JSON carries."""
    kind: str                     # "chat", "follow-up" (a chat's second turn), "batch", "sample", "beam"
    tenant: str
    prompt: str
    pid: int | None
    text: str
    tokens: list
    finish_reason: str            # stop, length, killed, error
    ttft: float | None = None     # seconds from spawn to the first token
    elapsed: float = 0.0          # seconds from spawn to exit
    score: float | None = None    # beam search: sum of the log-probabilities


@dataclass
class WorkloadPlan:
    chats: list                   # the assistant's questions (system prompt in shm)
    follow_ups: dict = field(default_factory=dict)   # question -> its second turn
    batch: list = field(default_factory=list)   # the batch tenant's tasks
    sample_prompt: str | None = None
    sample_n: int = 3
    beam_prompt: str | None = None
    beam_width: int = 3
    chat_tokens: int = 128        # max_tokens of each kind
    batch_tokens: int = 320
    sample_tokens: int = 64
    beam_tokens: int = 24
    arrival_every: int = 10       # kernel steps between two questions' arrivals
    assistant_weight: float = 3
    batch_weight: float = 1
    system_prompt: str = prompts.SYSTEM_PROMPT

    @property
    def num_requests(self) -> int:
        return len(self.chats) + len(self.batch) + bool(self.sample_prompt) + bool(self.beam_prompt)


def default_plan(quick: bool = False, **sizes) -> WorkloadPlan:
    """The demo's workload; quick: fewer and shorter requests (tests, the tiny model)."""
    if quick:
        plan = WorkloadPlan(chats=prompts.ASSISTANT_QUESTIONS[:4], follow_ups=dict(prompts.FOLLOW_UPS),
                            batch=prompts.BATCH_TASKS[:2],
                            sample_prompt=prompts.SAMPLE_PROMPT, beam_prompt=prompts.BEAM_PROMPT,
                            chat_tokens=16, batch_tokens=24, sample_tokens=12, beam_tokens=6, arrival_every=2)
    else:
        plan = WorkloadPlan(chats=list(prompts.ASSISTANT_QUESTIONS), follow_ups=dict(prompts.FOLLOW_UPS),
                            batch=list(prompts.BATCH_TASKS),
                            sample_prompt=prompts.SAMPLE_PROMPT, beam_prompt=prompts.BEAM_PROMPT)
    for key, value in sizes.items():
        if value is not None:
            setattr(plan, key, value)
    return plan


def read_turn(sys, pid, poll: float = 0.1) -> tuple[str, list, str]:
    """(text, token ids, finish reason) of a process's current turn, read as it comes."""
    text, tokens = [], []
    while True:
        r = sys.read(pid, timeout=poll)
        text.append(r.text)
        tokens += r.tokens
        if r.turn_done:
            return "".join(text), tokens, r.finish_reason or "stop"


def split_system_prompt(sys, tid: int, system: str, question: str) -> tuple[list, list]:
    """(the system turn's tokens, the rest of the chat's tokens) in tenant tid's chat template.
    The first part goes in shm; if the template does not split cleanly there, it is empty."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    full = sys.tokenize(tid, messages)
    prefix = sys.tokenize(tid, messages[:1], add_generation_prompt=False)
    if full[:len(prefix)] != prefix:
        return [], full
    return prefix, full[len(prefix):]


class Workload:
    """Tenants, a shm segment and client threads; replies collect in `replies` as clients finish."""

    def __init__(self, root, plan: WorkloadPlan, model: str, handle):
        """root: the root handle; handle(tid): a handle that acts as tenant tid."""
        self.plan = plan
        self.model = model
        self.root = root
        self._handle = handle
        self.replies: list = []
        self.errors: list = []                # client failures, as one-line strings
        self.cancelled = False
        self.tids: dict = {}                  # tenant name -> tid
        self.started_at = self.finished_at = None
        self._threads: list = []
        self._remaining = 0                   # clients not yet finished
        self._lock = threading.Lock()

    # -- setup (before the loop starts) ---------------------------------------------------
    def create_tenants(self, spawn_tenant=None) -> None:
        spawn_tenant = spawn_tenant or (lambda sys, model, **kw: sys.spawn_tenant(model, **kw))
        plan = self.plan
        self.tids["assistant"] = spawn_tenant(self.root, self.model, name="assistant",
                                              weight=plan.assistant_weight)
        if plan.batch or plan.beam_prompt:
            self.tids["batch"] = spawn_tenant(self.root, self.model, name="batch", weight=plan.batch_weight)

    def handle(self, tenant: str):
        return self._handle(self.tids[tenant])

    # -- clients ------------------------------------------------------------------------------
    def start(self) -> None:
        """Put the shared system prompt in shm, then start every client thread."""
        plan = self.plan
        self.started_at = time.monotonic()
        assistant = self.handle("assistant")
        shmid = None
        prefix, _ = split_system_prompt(assistant, self.tids["assistant"], plan.system_prompt, "?")
        if prefix:
            shmid = assistant.shmget(self.tids["assistant"], prefix)
        clients = [(self._chat, q, i * plan.arrival_every, shmid) for i, q in enumerate(plan.chats)]
        clients += [(self._batch, task) for task in plan.batch]
        if plan.sample_prompt:
            clients.append((self._sample, plan.sample_prompt))
        if plan.beam_prompt:
            clients.append((self._beam, plan.beam_prompt))
        self._remaining = len(clients)
        self._threads = [threading.Thread(target=self._client, args=c, name=f"kvos-client-{i}", daemon=True)
                         for i, c in enumerate(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:              # a client's failure is reported, the others go on
            with self._lock:
                if not self.cancelled:        # after cancel(), its processes are gone: not a failure
                    self.errors.append(f"{fn.__name__.strip('_')} client ({args[0]!r}): {exc}")
        finally:
            with self._lock:
                self._remaining -= 1
                if not self._remaining:
                    self.finished_at = time.monotonic()

    def _wait_for_step(self, step: int) -> None:
        """Arrive at kernel step `step`, or at once when the kernel has nothing else to run.
        The root handle's schedstat: a tenant's reads 0 for the global counters."""
        while True:
            stat = self.root.schedstat()
            if stat.steps >= step or (stat.running == 0 and stat.waiting == 0):
                return
            time.sleep(0.02)

    def _add(self, reply: Reply) -> None:
        with self._lock:
            self.replies.append(reply)

    def _record(self, kind, tenant, prompt, status) -> None:
        self._add(Reply(kind, tenant, prompt, status.pid, status.text, list(status.tokens), status.reason,
                        status.time_to_first_token, status.elapsed))

    def _chat(self, question: str, arrival: int, shmid) -> None:
        """A question, and its follow-up if it has one, on one interactive process: the second turn is
        written into the same process, so the first turn's pages are not computed again."""
        sys, plan = self.handle("assistant"), self.plan
        self._wait_for_step(arrival)
        tid = self.tids["assistant"]
        prefix, rest = split_system_prompt(sys, tid, plan.system_prompt, question)
        params = dict(max_tokens=plan.chat_tokens, temperature=0, interactive=True)
        if shmid is not None:
            pid = sys.spawn(tid, rest, shm=shmid, **params)
        else:
            pid = sys.spawn(tid, prefix + rest, **params)
        turns = [(question, read_turn(sys, pid))]
        follow_up = plan.follow_ups.get(question)
        if follow_up and turns[0][1][2] != "killed":
            sys.write(pid, [{"role": "user", "content": follow_up}])
            turns.append((follow_up, read_turn(sys, pid)))
        status = sys.wait(pid)
        for i, (prompt, (text, tokens, reason)) in enumerate(turns):
            self._add(Reply("chat" if i == 0 else "follow-up", "assistant", prompt, pid, text, tokens, reason,
                            status.time_to_first_token if i == 0 else None, status.elapsed))

    def _batch(self, task: str) -> None:
        """A writing task. Sampled (seeded, so preemption cannot change it): greedy decoding of a small
        model falls into repeating itself over a few hundred tokens."""
        sys = self.handle("batch")
        seed = self.plan.batch.index(task)
        pid = sys.spawn(self.tids["batch"], [{"role": "user", "content": task}],
                        max_tokens=self.plan.batch_tokens, temperature=0.7, top_p=0.9, seed=seed)
        self._record("batch", "batch", task, sys.wait(pid))

    def _sample(self, prompt: str) -> None:
        sys = self.handle("assistant")
        for status in parallel_sample(sys, self.tids["assistant"], [{"role": "user", "content": prompt}],
                                      n=self.plan.sample_n, max_tokens=self.plan.sample_tokens,
                                      temperature=0.8, seed=7):
            self._record("sample", "assistant", prompt, status)

    def _beam(self, prompt: str) -> None:
        tenant = "batch" if "batch" in self.tids else "assistant"
        sys, tid = self.handle(tenant), self.tids[tenant]
        started = time.monotonic()
        beams = beam_search(sys, tid, [{"role": "user", "content": prompt}],
                            width=self.plan.beam_width, max_tokens=self.plan.beam_tokens,
                            eos_token_ids=sys.tenantinfo(tid).eos_token_ids)
        elapsed = time.monotonic() - started
        for beam in beams:
            self._add(Reply("beam", tenant, prompt, None, sys.detokenize(tid, beam.tokens), list(beam.tokens),
                            "stop" if beam.finished else "length", None, elapsed, beam.score))

    # -- progress -------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return bool(self._threads) and not any(t.is_alive() for t in self._threads)

    @property
    def clients_left(self) -> int:
        return sum(t.is_alive() for t in self._threads)

    @property
    def expected_replies(self) -> int:
        plan = self.plan
        return len(plan.chats) + sum(q in plan.follow_ups for q in plan.chats) + len(plan.batch) + \
            (plan.sample_n if plan.sample_prompt else 0) + (plan.beam_width if plan.beam_prompt else 0)

    def cancel(self, timeout: float = 10.0) -> None:
        """End the workload early: kill its tenants (their processes go, clients see ESRCH and return).
        Call it while the kernel's loop runs unpaused, so that every client's wait gets its answer."""
        from kernel.errors import KvosError
        self.cancelled = True
        for tid in self.tids.values():
            try:
                self.root.kill_tenant(tid)
            except KvosError:
                pass                          # already gone
        self.join(timeout)

    def join(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self.done

    @property
    def wall_seconds(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.monotonic()) - self.started_at
