"""The processes serving one OpenAI request (a Launch), how they start, how they end, and the error
a failed one carries. Shared by the completions, chat and responses routes and the daemon's reaper.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from kernel.errors import EIO, ERRNOS, KvosError

POLL_SECONDS = 0.5           # longest a request's read waits; also how often a request checks its client


@dataclass
class Launch:
    """The processes serving one request: choice i is pids[i]."""
    handle: object
    tenant: str
    pids: list
    prompt_of: list                   # choice -> index of its prompt
    started: float
    statuses: list = field(default_factory=list)    # ExitStatus per choice once reaped
    finished: bool = False            # reaped: nothing left to release
    outcome: str = "disconnected"     # for kvos_requests: ok, killed, error, disconnected
    first_token: float | None = None  # when the first token of any choice came (the request's TTFT)


def launch(handle, tid, tenant, prompts, n, params) -> Launch:
    """Spawn each prompt with n - 1 forked siblings (spawn_n: no step between spawn and fork, so no
    fork inherits the parent's first token); on a refusal, end what was started and re-raise.
    handle.atomic() puts every prompt of the request in the run queue before the next step."""
    started = time.monotonic()
    priority = params.pop("priority", 0)
    pids, prompt_of = [], []
    try:
        with handle.atomic():
            for i, prompt in enumerate(prompts):
                pids.extend(handle.spawn_n(tid, prompt, n, priority=priority, **params))
                prompt_of.extend([i] * n)
    except KvosError:
        release(handle, pids)
        raise
    return Launch(handle, tenant, pids, prompt_of, started)


def release(handle, pids) -> None:
    """Kill and reap: the frames go back (full pages may stay in the page cache)."""
    for pid in pids:
        for call in (handle.kill, handle.wait):
            try:
                call(pid)
            except KvosError:          # already gone (reaped, or its tenant was killed)
                break


def exit_error(status) -> KvosError:
    """The error a process that ended with reason "error" carries ("ENOMEM: ..." or a forward failure)."""
    text = status.error or "the process failed"
    errno, _, rest = text.partition(":")
    return KvosError(errno, rest.strip()) if errno in ERRNOS else KvosError(EIO, text)


def usage_of(run: Launch, predicted: bool = False) -> dict:
    """OpenAI's usage of a finished request (a prompt's tokens counted once, however many choices);
    predicted (the request had a prediction): with its drafts kept and not kept, all choices'."""
    prompt = sum(run.statuses[run.prompt_of.index(p)].prompt_tokens for p in sorted(set(run.prompt_of)))
    completion = sum(len(s.tokens) for s in run.statuses)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if predicted:
        usage["completion_tokens_details"] = {
            "reasoning_tokens": 0,
            "accepted_prediction_tokens": sum(s.accepted_prediction_tokens for s in run.statuses),
            "rejected_prediction_tokens": sum(s.rejected_prediction_tokens for s in run.statuses)}
    return usage
