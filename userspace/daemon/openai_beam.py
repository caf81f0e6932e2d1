"""vLLM's `use_beam_search` over the OpenAI API: userspace/libc/beam.py's search, in the request's thread.

Each prompt's n best beams become its n choices, best first. The search is process management: every
beam is a process, a beam chosen twice is forked (its pages shared copy-on-write), a beam not chosen
is killed; scores are the model's own log-probabilities, normalized by length ** length_penalty at
the end. What a beam search cannot honour is a 400 naming the field: sampling (top_p, seed,
penalties, a temperature other than 0 or 1), constraints, stop strings, logprobs, tools and stream.
"""
from __future__ import annotations

import threading
import time

import anyio
import anyio.to_thread
from fastapi.responses import JSONResponse

from kernel.errors import EAGAIN, EINVAL, KvosError
from kernel.results import ExitStatus
from userspace.daemon.runs import POLL_SECONDS, Launch, usage_of
from userspace.daemon.waiting import Disconnected
from userspace.libc.beam import beam_search

# A beam search holds a worker thread while it runs: at most this many at once (more wait their turn),
# and a tenant may run at most BEAM_SEARCHES_PER_TENANT (more are EAGAIN), so searches can neither take
# the threads every other call needs nor keep another tenant's searches waiting for long.
BEAM_SEARCHES = 16
BEAM_SEARCHES_PER_TENANT = 4
DEFAULT_MAX_TOKENS = 256      # the kernel's default max_tokens
MAX_WIDTH = 20                # a beam's candidates are its top logprobs, at most the kernel's 20
# Fields a beam search takes besides the prompt: the rest must stay at their defaults.
TAKES = frozenset({"model", "messages", "prompt", "n", "max_tokens", "max_completion_tokens", "ignore_eos",
                   "stop_token_ids", "length_penalty", "use_beam_search", "return_token_ids", "best_of",
                   "temperature", "stream", "stream_options", "truncate_prompt_tokens",
                   "add_generation_prompt", "continue_final_message"})


def check(req) -> None:
    """EINVAL naming the first field a beam search cannot honour."""
    if req.stream:
        raise KvosError(EINVAL, "stream with use_beam_search is not supported: the beams are ranked at the end")
    if req.n > MAX_WIDTH:
        raise KvosError(EINVAL, f"n with use_beam_search is at most {MAX_WIDTH} (each beam's candidates are its "
                                f"{MAX_WIDTH} most likely tokens at most), got {req.n}")
    if req.temperature not in (None, 0, 1):
        raise KvosError(EINVAL, "temperature with use_beam_search must be 0 or 1 (beams are scored by the "
                                "model's own log-probabilities)")
    if not isinstance(req.length_penalty, (int, float)) or isinstance(req.length_penalty, bool):
        raise KvosError(EINVAL, "length_penalty must be a number")
    for name, info in type(req).model_fields.items():
        if name not in TAKES and getattr(req, name) != info.get_default(call_default_factory=True):
            raise KvosError(EINVAL, f"{name} with use_beam_search is not supported")


def search(handle, tid, prompts: list, req, eos_token_ids, on_round=None) -> list:
    """Each prompt's beams, best first. -> [[Beam]] (a prompt's n, or fewer if fewer survived)"""
    limit = getattr(req, "max_completion_tokens", None)
    limit = req.max_tokens if limit is None else limit
    limit = DEFAULT_MAX_TOKENS if limit is None else limit
    if limit < 1:
        raise KvosError(EINVAL, f"max_tokens with use_beam_search must be at least 1, got {limit}")
    eos = () if req.ignore_eos else tuple(eos_token_ids) + tuple(req.stop_token_ids or ())
    return [beam_search(handle, tid, prompt, width=req.n, max_tokens=limit, eos_token_ids=eos,
                        length_penalty=float(req.length_penalty), on_round=on_round) for prompt in prompts]


def statuses(handle, tid, prompts: list, results: list, elapsed: float) -> tuple:
    """Per choice, an ExitStatus as a process's would read (text without the EOS that ended it), and
    which prompt it answers. -> (statuses, prompt_of)"""
    out, prompt_of = [], []
    for i, (prompt, beams) in enumerate(zip(prompts, results)):
        prompt_tokens = len(handle.tokenize(tid, prompt))
        for b in beams:
            text = handle.detokenize(tid, b.tokens[:-1] if b.finished else b.tokens)
            out.append(ExitStatus(pid=b.pid, reason="stop" if b.finished else "length", tokens=list(b.tokens),
                                  text=text, prompt_tokens=prompt_tokens, elapsed=elapsed))
            prompt_of.append(i)
    return out, prompt_of


class BeamSearches:
    """kvosd's beam searches: the worker threads they may hold and how many each tenant runs."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.beam_threads = None          # an anyio.CapacityLimiter, made on the event loop at first use
        self.beams_of: dict = {}          # tenant -> beam searches running

    async def serve(self, request, handle, tid, tenant, req, prompts, endpoint):
        """use_beam_search: the search runs in a worker thread (its syscalls block); a client that goes
        away ends it at the next round, every beam killed (userspace/daemon/openai_beam.py)."""
        check(req)
        if self.beams_of.get(tenant, 0) >= BEAM_SEARCHES_PER_TENANT:
            raise KvosError(EAGAIN, f"at most {BEAM_SEARCHES_PER_TENANT} beam searches at once per tenant")
        if self.beam_threads is None:
            self.beam_threads = anyio.CapacityLimiter(BEAM_SEARCHES)
        info = await anyio.to_thread.run_sync(handle.tenantinfo, tid)
        gone = threading.Event()

        def on_round(_pids):
            if gone.is_set():
                raise Disconnected()

        async def watch():
            while not gone.is_set():
                await anyio.sleep(POLL_SECONDS)
                if await request.is_disconnected():
                    gone.set()

        started = time.monotonic()
        run = Launch(handle, tenant, [], [], started)
        failed = None          # raised by the search: kept out of the task group, which would wrap it
        self.beams_of[tenant] = self.beams_of.get(tenant, 0) + 1
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(watch)
                try:
                    results = await anyio.to_thread.run_sync(search, handle, tid, prompts, req,
                                                             info.eos_token_ids, on_round, limiter=self.beam_threads)
                except Exception as err:
                    failed = err
                finally:
                    group.cancel_scope.cancel()
        finally:
            self.beams_of[tenant] -= 1
        if isinstance(failed, Disconnected):
            run.outcome = "disconnected"
            self.daemon.request_done(run, endpoint)
            return JSONResponse({}, status_code=499)          # nobody reads it
        if failed is not None:
            raise failed
        run.statuses, run.prompt_of = await anyio.to_thread.run_sync(
            statuses, handle, tid, prompts, results, time.monotonic() - started)
        run.pids, run.finished, run.outcome = [s.pid for s in run.statuses], True, "ok"
        self.daemon.request_done(run, endpoint)
        choices = []
        for i, s in enumerate(run.statuses):
            choice = {"index": i, "message": {"role": "assistant", "content": s.text}} if endpoint == "chat" \
                else {"index": i, "text": s.text}
            choice.update(logprobs=None, finish_reason=s.reason)
            if req.return_token_ids:
                choice["token_ids"] = s.tokens
            choices.append(choice)
        return JSONResponse({"id": f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{self.daemon.nonce}-{run.pids[0]}",
                             "object": "chat.completion" if endpoint == "chat" else "text_completion",
                             "created": int(time.time()), "model": req.model, "system_fingerprint": "kvos",
                             "choices": choices, "usage": usage_of(run)})
