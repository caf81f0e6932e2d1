"""Process syscalls: spawn, spawn_n, fork, write, read, wait, kill, nice.

Each prepare half (caller's context, no lock) turns text or a chat into token ids
and stop strings into a StopSet; each handler (kernel mode) checks them against
the kernel's state and acts. read and wait block: they hold the kernel lock from
wake-up to result and sleep on their process alone (kernel/watch.py), so a step
wakes only the callers whose process changed. Their finish half decodes bytes.
"""
from __future__ import annotations

import threading
import time
from dataclasses import replace

from kernel.argcheck import (
    check_fits,
    check_int,
    check_priority,
    check_room_for,
    check_timeout,
    is_chat,
    proc_of,
    prompt_tokens,
    segment_of,
    tenant_of,
)
from kernel.errors import E2BIG, EAGAIN, EBUSY, EINVAL, EPERM, ESRCH, KernelPanic, KvosError
from kernel.output import StopSet, complete_utf8, decode
from kernel.proc import State
from kernel.results import ReadResult, TokenLogprob, TopLogprob
from kernel.sampling import SamplingParams
from kernel.systable import syscall
from kernel.watch import watch


# -- spawn -------------------------------------------------------------------------------------------------
def spawn_prepare(kernel, caller, tid, prompt, *, priority=0, shm=None, interactive=False, tools=None,
                  prediction=None, **sampling):
    tenant = tenant_of(kernel, caller, tid)
    if "max_tokens" not in sampling:         # the default never exceeds what the tenant may ask for
        sampling["max_tokens"] = min(SamplingParams.max_tokens, tenant.max_new_tokens)
    params = SamplingParams.from_kwargs(**sampling)
    params.check_vocab(tenant.program.vocab_size)
    check_priority(tenant, caller, priority)
    if not isinstance(interactive, bool):
        raise KvosError(EINVAL, f"interactive must be True or False, got {interactive!r}")
    if params.max_tokens == 0 and not interactive:
        raise KvosError(EINVAL, "max_tokens must be at least 1 (0 is for interactive processes)")
    if params.max_tokens > tenant.max_new_tokens:
        raise KvosError(E2BIG, f"max_tokens {params.max_tokens} exceeds tenant {tenant.name!r}'s limit "
                               f"of {tenant.max_new_tokens}")
    if shm is not None:
        check_int("shm", shm)
    if params.prompt_logprobs is not None:
        if shm is not None:       # a segment's pages were computed by its builder: no rows of this process score them
            raise KvosError(EINVAL, "prompt_logprobs cannot be combined with shm")
        if not getattr(kernel.device, "has_tensors", True):
            raise KvosError(EINVAL, "prompt_logprobs needs a device that computes logits")
    ids = prompt_tokens(tenant.program, prompt, tenant=tenant, tools=tools)
    if prediction is not None:           # text or token ids, like a prompt (not a chat), tokenized here
        if is_chat(prediction):
            raise KvosError(EINVAL, "prediction is text or token ids, not a chat")
        prediction = prompt_tokens(tenant.program, prediction, "prediction", tenant=tenant)
        check_fits(kernel, tenant, len(prediction), "prediction")
    return dict(tenant=tenant, ids=ids, params=params, stops=StopSet(params.stop) if params.stop else None,
                constraint=_constraint(kernel, tenant, params), priority=priority, shm=shm, interactive=interactive,
                prediction=prediction)


def _constraint(kernel, tenant, params):
    """The process's matcher for params.json_schema or params.grammar, compiled here, in the caller's
    context (cached per program and grammar); None without either."""
    kind = "json_schema" if params.json_schema is not None else "grammar" if params.grammar is not None else None
    if kind is None:
        return None
    if not getattr(kernel.device, "has_tensors", True):
        raise KvosError(EINVAL, f"{kind} needs a device that computes logits (the simulated one draws "
                                "filler tokens)")
    from kernel.grammar import compile_grammar
    return compile_grammar(tenant.program, kind, getattr(params, kind)).start()


@syscall("spawn", new_work=True, prepare=spawn_prepare)
def sys_spawn(kernel, caller, tenant, ids, params, stops, constraint, priority, shm, interactive, prediction):
    """A new process running `prompt` (text, token ids or a chat). It waits in the run queue until admitted. -> pid

    Sampling keys: max_tokens, temperature, top_p, top_k, min_p (in [0, 1]), seed, stop (at most 32
    strings of at most 256 bytes), stop_token_ids, ignore_eos, repetition_penalty (> 0; 1 is none),
    frequency_penalty and presence_penalty (in [-2, 2]), prompt_logprobs (None; or k in [0, 20]: each
    prompt token's log-probability given the tokens before it and the k most likely there, in the
    first read() that returns a token or the end; the prompt is computed by the process itself, not
    mapped from the page cache; not with shm), logit_bias ({token id: bias in [-100, 100]},
    at most 1,024), min_tokens (no EOS, stop token or stop string ends a turn before this many new
    tokens; not with a grammar), logprobs (None; or k in [0, 20]: each
    token's log-probability and the k most likely at its position, in read()), json_schema (a JSON
    Schema as a dict, at most 64 KiB: each turn's output is one JSON value valid under it, the
    kernel masking every draw with its grammar; {"type": "object"} for any JSON object), grammar
    (instead: a Lark grammar as llguidance reads it, which may embed schemas as %json {...}).
    tools=[...] (with a chat prompt): function tools the model's chat template is given, as
    OpenAI's request spells them (EINVAL if the template takes none). interactive=True: the
    process sleeps after each turn and write() starts the next. prediction (text or token ids):
    what the caller expects the output to be (OpenAI's predicted outputs); on a kernel booted with
    speculate=k its tokens are drafted where the output follows them (kernel/speculate.py); the
    output is the same with or without it.
    """
    if not tenant.alive:
        raise KvosError(ESRCH, f"tenant {tenant.tid} no longer exists")
    prefix = []
    if shm is not None:                  # the segment must be the target tenant's, even for root
        prefix = segment_of(kernel, tenant, shm, "shm").tokens
    ids = prefix + ids
    check_fits(kernel, tenant, len(ids), "prompt")
    check_room_for(kernel, tenant, 1)
    proc = kernel.create_process(tenant, ids, params, priority, interactive, shm, params.seed, stops, constraint,
                                 prediction)
    kernel.log("spawn", f"pid {proc.pid}: {len(ids)} prompt tokens, max_tokens {params.max_tokens}", proc=proc)
    return proc.pid


def spawn_n_prepare(kernel, caller, tid, prompt, n, *, priority=0, shm=None, interactive=False, tools=None,
                    prediction=None, **sampling):
    check_int("n", n, 1, 1024)
    args = spawn_prepare(kernel, caller, tid, prompt, priority=priority, shm=shm, interactive=interactive,
                         tools=tools, prediction=prediction, **sampling)
    return dict(args, n=n)


@syscall("spawn_n", new_work=True, prepare=spawn_n_prepare)
def sys_spawn_n(kernel, caller, tenant, ids, params, stops, constraint, priority, shm, interactive, prediction, n):
    """spawn, then fork the new process n - 1 times, in one call: no step runs in between, so the
    n processes share the prompt's pages and nothing else (n samples of one prompt). The first pid
    is the parent. A refused call leaves no process behind. -> [pid]"""
    check_room_for(kernel, tenant, n)
    pid = sys_spawn(kernel, caller, tenant, ids, params, stops, constraint, priority, shm, interactive, prediction)
    if n == 1:
        return [pid]
    try:
        return [pid] + sys_fork(kernel, caller, pid, n - 1)
    except KvosError:
        proc = kernel.procs[pid]
        kernel.exit_process(proc, "killed")
        kernel.reap(proc)
        raise


@syscall("fork", new_work=True)
def sys_fork(kernel, caller, pid, n=1):
    """n children sharing every page of the process copy-on-write, each with its own seed. -> [pid]"""
    proc = proc_of(kernel, caller, pid)
    check_int("n", n, 1, 1024)
    if not proc.alive:
        raise KvosError(ESRCH, f"process {pid} has exited")
    if proc.builds_segment is not None:
        raise KvosError(EPERM, f"process {pid} is a kernel shm builder")
    check_room_for(kernel, proc.tenant, n)
    return [c.pid for c in kernel.fork_process(proc, n)]


# -- write -------------------------------------------------------------------------------------------------
def write_prepare(kernel, caller, pid, prompt):
    proc = proc_of(kernel, caller, pid)
    program = proc.tenant.program
    if is_chat(prompt):
        prompt_tokens(program, prompt, "input")          # validates the messages
        from kernel.chat import chat_continuation
        closing, ids = chat_continuation(program, prompt)
    else:
        closing, ids = [], prompt_tokens(program, prompt, "input")
    return dict(proc=proc, closing=closing, ids=ids)


@syscall("write", new_work=True, prepare=write_prepare)
def sys_write(kernel, caller, proc, closing, ids):
    """Append input to a sleeping interactive process and start its next turn; its pages stay."""
    pid = proc.pid
    if kernel.procs.get(pid) is not proc or not proc.alive:
        raise KvosError(ESRCH, f"process {pid} has exited")
    if not proc.interactive:
        raise KvosError(EINVAL, f"process {pid} was not spawned interactive; it takes no more input")
    if proc.state != State.SLEEPING:
        raise KvosError(EBUSY, f"process {pid} is in the middle of a turn ({proc.state.value})")
    if closing and proc.output and closing[0] == proc.tokens[-1]:
        closing = closing[1:]            # the model ended its reply with this token itself
    ids = closing + ids
    check_fits(kernel, proc.tenant, len(proc.tokens) + len(ids), "process with its new input")
    kernel.resume(proc, ids)


# -- read and wait ---------------------------------------------------------------------------------------------
def block(kernel, proc, until, timeout, events=("output", "turn", "exit")) -> bool:
    """Wait (holding the kernel lock whenever awake) until until() holds. With a loop thread the
    caller sleeps until one of `events` of `proc` (any step when proc is None); without one it
    steps the kernel itself. False on timeout, or when nothing can make progress."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with kernel.lock:
        while not until():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            loop = kernel.loop_thread
            if loop is not None and loop.is_alive() and loop is not threading.current_thread():
                wait = remaining if remaining is not None else 1.0
                if proc is None:
                    kernel.changed.wait(wait)
                else:
                    woken = threading.Condition(kernel.lock)
                    cancel = watch(proc, woken.notify, events)
                    woken.wait(wait)
                    cancel()
            elif not kernel.step() and not until():
                return False
        return True


def read_finish(raw):
    result, data = raw
    return replace(result, text=decode(data), logprobs=_token_logprobs(result.logprobs),
                   prompt_logprobs=None if result.prompt_logprobs is None else _token_logprobs(result.prompt_logprobs))


def _token_logprobs(raw) -> list:
    """[TokenLogprob] from read's raw (token, bytes, logprob, [(token, bytes, logprob)], rank) entries."""
    return [TokenLogprob(t, lp, list(b), decode(b), [TopLogprob(u, ulp, list(ub), decode(ub)) for u, ub, ulp in top],
                         rank) for t, b, lp, top, rank in raw]


def _raw_logprob(spell, token, logprob, top, rank) -> tuple:
    """One entry as read returns it: (token, its bytes, logprob, [(token, bytes, logprob)] top-k, rank)."""
    return token, b"" if token is None else spell(token), logprob, [(u, spell(u), ulp) for u, ulp in top], rank


def _raw_prompt_logprobs(proc, spell) -> list:
    """The spawn prompt's entries as read's raw tuples: the first token (nothing scores it) and any
    position whose row never ran (the process ended first) have logprob None."""
    return [_raw_logprob(spell, token, *(entry or (None, (), None)))
            for token, entry in zip(proc.tokens, proc.prompt_logprobs)]


@syscall("read", blocking=True, finish=read_finish)
def sys_read(kernel, caller, pid, timeout=0.0):
    """What the process produced since the last read; waits up to `timeout` seconds for something new."""
    timeout = check_timeout(timeout, default=0.0)
    with kernel.lock:       # held throughout: a read woken by a step's end takes its tokens before the next step
        proc = proc_of(kernel, caller, pid)
        start = proc.read_offset
        if timeout:
            release = kernel.blocking.begin(caller)
            try:
                block(kernel, proc, lambda: len(proc.output) > start or proc.turn_done or not proc.alive, timeout)
            finally:
                release()
        done = proc.turn_done or not proc.alive
        end = len(proc.out_bytes)
        if not done:                   # hold back what may yet be a stop string, or half a character
            held = proc.stops.pending(proc.stop_state) if proc.stops is not None else 0
            end = max(proc.text_offset, complete_utf8(proc.out_bytes, proc.text_offset, end - held))
        data = bytes(proc.out_bytes[proc.text_offset:end])
        proc.text_offset = end
        generated = proc.generated_tokens
        new = generated[start:]
        proc.read_offset = len(generated)
        spell = proc.tenant.program.token_bytes       # raw here, text in the finish half
        logprobs = [_raw_logprob(spell, *entry) for entry in proc.logprobs[proc.logprob_offset:]]
        proc.logprob_offset = len(proc.logprobs)
        prompt = None
        if proc.prompt_logprobs is not None and not proc.prompt_logprobs_read and (proc.output or done):
            prompt = _raw_prompt_logprobs(proc, spell)    # the prompt is computed once a token is drawn
            proc.prompt_logprobs_read = True
        reason = proc.exit.reason if proc.exit else proc.last_reason
        return ReadResult(pid, new, "", proc.state.value, done, reason, logprobs, prompt), data


def wait_finish(raw):
    status, data = raw
    return replace(status, text=decode(data))


@syscall("wait", blocking=True, finish=wait_finish)
def sys_wait(kernel, caller, pid, timeout=None):
    """Until the process exits; returns its exit status and reaps it. A sleeping interactive
    process has its input closed: it exits with the reason of its last turn. Of several waits on
    one process exactly one reaps it; the others get ESRCH."""
    timeout = check_timeout(timeout, default=None)
    with kernel.lock:       # held throughout, as in read (the condition wait lets the loop in)
        proc = proc_of(kernel, caller, pid)
        release = kernel.blocking.begin(caller)
        try:
            done = block(kernel, proc, lambda: not proc.alive or proc.state == State.SLEEPING or proc.reaped,
                         timeout, events=("turn", "exit"))
        finally:
            release()
        if proc.reaped:
            raise KvosError(ESRCH, f"process {pid} was reaped by another wait")
        if proc.state == State.SLEEPING:
            kernel.exit_process(proc, proc.last_reason or "stop")
        if proc.alive:
            if not done and timeout is not None:
                raise KvosError(EAGAIN, f"process {pid} still runs after {timeout} s")
            raise KernelPanic(f"wait: process {pid} ({proc.state.value}) cannot make progress")
        kernel.reap(proc)
        return proc.exit, bytes(proc.out_bytes)


# -- signals ---------------------------------------------------------------------------------------------------
@syscall("kill")
def sys_kill(kernel, caller, pid):
    """End a process now; its frames go back (full pages may stay in the page cache)."""
    proc = proc_of(kernel, caller, pid)
    if proc.builds_segment is not None:
        raise KvosError(EPERM, f"process {pid} is a kernel shm builder; use shmrm")
    kernel.exit_process(proc, "killed")


@syscall("nice")
def sys_nice(kernel, caller, pid, inc):
    """Change a process's priority by inc (lower runs first under the priority policy). -> new value"""
    from kernel.tenant import NICE_MAX, NICE_MIN
    proc = proc_of(kernel, caller, pid)
    check_int("inc", inc, -40, 40)
    value = max(NICE_MIN, min(NICE_MAX, proc.priority + inc))
    if caller is not None and value < proc.tenant.nice_min:
        raise KvosError(EPERM, f"priority {value} is below tenant {proc.tenant.name!r}'s floor "
                               f"{proc.tenant.nice_min}")
    proc.priority = value
    return value
