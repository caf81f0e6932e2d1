"""An OpenAI-compatible API on the syscalls: /v1/models, /v1/completions, /v1/chat/completions.

A request becomes processes of the caller's tenant: one spawn per prompt, and
fork(pid, n - 1) for n choices (they share the prompt's pages). Streaming reads
each process as it produces (an event per request, no thread held while it waits:
userspace/daemon/waiting.py) and sends server-sent events. Whoever stops listening
-- a client that disconnects, a cancelled request -- gets its processes killed and
reaped, so their frames go back.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kernel.errors import ESRCH, KvosError
from userspace.daemon import logprobs_shapes, lora_api, openai_beam, openai_tools, waiting
from userspace.daemon.errors import openai_error
from userspace.daemon.openai_requests import (
    ChatRequest,
    CompletionRequest,
    chat_messages,
    completion_prompts,
    parse,
    sampling_params,
)
from userspace.daemon.openai_response_request import ResponsesRequest
from userspace.daemon.openai_responses import ResponsesAPI
from userspace.daemon.openapi_doc import request_body
from userspace.daemon.runs import POLL_SECONDS, Launch, exit_error, launch, usage_of
from userspace.daemon.sysapi import json_object
from userspace.daemon.waiting import Disconnected
from userspace.libc.bad_words import bad_words_ids


async def follow(daemon, run: Launch, request: Request | None = None):
    """Yield (choice, ReadResult) as the processes produce, observing token timings; then reap them.
    With a request, stop (raise Disconnected) once its client has gone."""
    pending = list(range(len(run.pids)))
    last_token_at: dict = {}
    while pending:
        results = await waiting.next_output(run.handle, [run.pids[i] for i in pending], POLL_SECONDS)
        now = time.monotonic()
        for i, r in zip(pending, results):
            if r.tokens:
                daemon.observe_tokens(run, i, len(r.tokens), now, last_token_at)
            yield i, r
        pending = [i for i, r in zip(pending, results) if not r.turn_done]
        if request is not None and pending and await request.is_disconnected():
            raise Disconnected()
    run.statuses = await anyio.to_thread.run_sync(lambda: [run.handle.wait(pid) for pid in run.pids])
    run.finished = True


class ProcessStream(StreamingResponse):
    """A streamed response whose processes are released however it ends (even if never started)."""

    def __init__(self, daemon, run: Launch, events, endpoint):
        super().__init__(events, media_type="text/event-stream",
                         headers={"X-Kvos-Pids": ",".join(map(str, run.pids)), "Cache-Control": "no-cache"})
        self.daemon, self.run, self.endpoint = daemon, run, endpoint

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.run.finished:
                self.daemon.release_later(self.run)
            self.daemon.request_done(self.run, self.endpoint)


# -- responses -------------------------------------------------------------------------------------------
def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _outcome(run: Launch) -> str:
    reasons = {s.reason for s in run.statuses}
    run.outcome = "error" if "error" in reasons else "killed" if "killed" in reasons else "ok"
    return run.outcome


class OpenAIAPI:
    def __init__(self, daemon):
        self.daemon = daemon
        self.beams = openai_beam.BeamSearches(daemon)

    def resolve(self, who, model: str):
        """(handle, tid, tenant name) serving `model` for this key: a tenant key serves its own tenant
        (by its name or its model); root may name any tenant. Takes the kernel lock for root."""
        if who.tid is not None:
            if model in (who.name, who.model):
                return who.handle, who.tid, who.name
            raise KvosError(ESRCH, f"model {model!r} is not served to this key (it serves {who.name!r})")
        for t in self.daemon.root.schedstat().tenants:
            if t.name == model:
                return who.handle, t.tid, t.name
        for spec_name, spec_model in self.daemon.models.items():
            if spec_model == model:
                return self.resolve(who, spec_name)
        raise KvosError(ESRCH, f"no tenant serves model {model!r}")

    async def models(self, request: Request):
        who = self.daemon.authenticate(request)

        def tenants():             # schedstat takes the kernel lock, held through a step: not on the loop
            tids = [who.tid] if who.tid is not None else [t.tid for t in self.daemon.root.schedstat().tenants]
            infos = []
            for tid in tids:
                try:
                    infos.append(who.handle.tenantinfo(tid))
                except KvosError as err:     # killed since schedstat
                    if err.errno != ESRCH:
                        raise
            return infos
        return JSONResponse({"object": "list", "data": [
            {"id": t.name, "object": "model", "created": int(self.daemon.booted_at), "owned_by": "kvos",
             "root": self.daemon.models.get(t.name, t.model), "parent": lora_api.base_of(t.model),
             "max_model_len": t.max_context}
            for t in await anyio.to_thread.run_sync(tenants)]})

    async def chat(self, request: Request):
        who = self.daemon.authenticate(request)
        req = parse(ChatRequest, await json_object(request, "chat.completions"))
        return await self._serve(request, who, req, [chat_messages(req)], "chat")

    async def completions(self, request: Request):
        who = self.daemon.authenticate(request)
        req = parse(CompletionRequest, await json_object(request, "completions"))
        return await self._serve(request, who, req, completion_prompts(req), "completions")

    async def _serve(self, request, who, req, prompts, endpoint):
        self.daemon.refuse_if_draining("spawn")
        handle, tid, tenant = await anyio.to_thread.run_sync(self.resolve, who, req.model)
        tools = None              # the tools whose calls this request's replies may hold
        if endpoint == "chat" and openai_tools.check(req.tools, req.tool_choice) is not None:
            tools = req.tools
        reply_head = ""           # chat with echo: the assistant message the reply continues, as vLLM's
        if endpoint == "chat" and req.echo and prompts[0][-1]["role"] == "assistant":
            reply_head = prompts[0][-1]["content"]
        template = req.template_options() if endpoint == "chat" else {}
        as_ids = req.truncate_prompt_tokens is not None or bool(template)    # tokenized here, then spawned as ids
        if as_ids:
            prompts = await anyio.to_thread.run_sync(tokenized, handle, tid, prompts, req.truncate_prompt_tokens,
                                                     tools, template)
        if req.use_beam_search:
            return await self.beams.serve(request, handle, tid, tenant, req, prompts, endpoint)
        params = sampling_params(req)
        if req.bad_words:             # spelled in the model's tokens here, in the request's thread
            params["bad_words_ids"] = await anyio.to_thread.run_sync(bad_words_ids, handle, tid, req.bad_words)
        echoes = None             # completions with echo: each prompt's text (token-id prompts detokenized)
        if endpoint == "completions" and req.echo:
            echoes = await anyio.to_thread.run_sync(
                lambda: [p if isinstance(p, str) else handle.detokenize(tid, p) for p in prompts])
            if "logprobs" in params:                  # the prompt's tokens scored too, as OpenAI's echo does
                params["prompt_logprobs"] = max(params.get("prompt_logprobs", 0), params["logprobs"])
        if tools is not None:
            info = await anyio.to_thread.run_sync(handle.tenantinfo, tid)
            params.update(openai_tools.spawn_keys(info, req.tools, req.tool_choice, params))
            if as_ids:
                del params["tools"]               # the ids already hold the template's tools
        run = await anyio.to_thread.run_sync(launch, handle, tid, tenant, prompts, req.n,
                                             params)
        meta = {"id": f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{self.daemon.nonce}-{run.pids[0]}",
                "created": int(time.time()), "model": req.model, "system_fingerprint": "kvos"}
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            events = self._events(run, endpoint, meta, usage, req.return_token_ids, params.get("logprobs") is not None,
                                  tools, echoes, "prediction" in params, reply_head)
            return ProcessStream(self.daemon, run, events, endpoint)
        entries = [[] for _ in run.pids]             # each choice's TokenLogprobs, when asked for
        prompt_entries = [[] for _ in run.pids]      # and its prompt's (echo with logprobs)
        try:
            async for i, r in follow(self.daemon, run, request):
                entries[i] += r.logprobs
                prompt_entries[i] += r.prompt_logprobs or []
        except Disconnected:
            run.outcome = "disconnected"
            self.daemon.request_done(run, endpoint)
            return JSONResponse({}, status_code=499)     # nobody reads it; the finally releases
        finally:
            if not run.finished:
                self.daemon.release_later(run)
        _outcome(run)
        self.daemon.request_done(run, endpoint)
        failed = next((s for s in run.statuses if s.reason == "error"), None)
        if failed is not None:
            raise exit_error(failed)
        choices = []
        wants_logprobs = params.get("logprobs") is not None
        scored = prompt_entries                      # the prompt's entries in full, for prompt_logprobs
        if req.prompt_logprobs is not None and endpoint == "completions" and wants_logprobs:
            prompt_entries = [[replace(e, top=e.top[:params["logprobs"]]) for e in entries]   # echo's own k
                              for entries in prompt_entries]
        for i, s in enumerate(run.statuses):
            logprobs = None
            reason = s.reason
            if endpoint == "chat":
                choice = {"index": i, "message": {"role": "assistant", "content": reply_head + s.text}}
                if tools is not None:
                    content, calls = openai_tools.parse_calls(s.text, tools)
                    if calls:
                        content = reply_head + (content or "") if reply_head else content
                        choice["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
                        reason = "tool_calls" if reason == "stop" else reason
                if wants_logprobs:
                    logprobs = logprobs_shapes.chat(entries[i])
            else:
                echo = echoes[run.prompt_of[i]] if echoes is not None else ""
                choice = {"index": i, "text": echo + s.text}
                if wants_logprobs:
                    logprobs = logprobs_shapes.completion(prompt_entries[i] + entries[i], 0, len(prompt_entries[i]),
                                                          len(echo))
            choice.update(logprobs=logprobs, finish_reason=reason)
            if req.prompt_logprobs is not None and endpoint == "completions":
                choice["prompt_logprobs"] = logprobs_shapes.prompt(scored[i], req.prompt_logprobs)
            if req.return_token_ids:
                choice["token_ids"] = s.tokens
            choices.append(choice)
        kind = "chat.completion" if endpoint == "chat" else "text_completion"
        body = {**meta, "object": kind, "choices": choices, "usage": usage_of(run, "prediction" in params)}
        if req.prompt_logprobs is not None and endpoint == "chat":     # one prompt: vLLM gives it once
            body["prompt_logprobs"] = logprobs_shapes.prompt(scored[0], req.prompt_logprobs)
        return JSONResponse(body)

    async def _events(self, run, endpoint, meta, include_usage, with_ids, with_logprobs, tools=None, echoes=None,
                      predicted=False, reply_head=""):
        """The server-sent events of a streamed request, ending with usage (if asked) and [DONE]. A
        reply that may hold tool calls is sent whole at its end, its calls parsed out. With echo, a
        completion's first chunk starts with its prompt (and the prompt's logprobs), and a chat
        choice's opening chunk holds the assistant message it continues (reply_head)."""
        head = {**meta, "object": "chat.completion.chunk" if endpoint == "chat" else "text_completion"}
        offsets = [0] * len(run.pids)            # completions' text_offset, carried from chunk to chunk
        echo_due = [echoes is not None] * len(run.pids)
        prompt_entries = [[] for _ in run.pids]

        def choice(i, text, reason, tokens, entries):
            logprobs = None
            if endpoint == "chat":
                out = {"index": i, "delta": {"content": text} if text else {}}
                if with_logprobs:
                    logprobs = logprobs_shapes.chat(entries)
            else:
                echo, scored = "", []
                if echo_due[i]:
                    echo, scored, echo_due[i] = echoes[run.prompt_of[i]], prompt_entries[i], False
                out = {"index": i, "text": echo + text}
                if with_logprobs:
                    logprobs = logprobs_shapes.completion(scored + entries, offsets[i], len(scored),
                                                          offsets[i] + len(echo))
                    offsets[i] += len(echo) + sum(len(e.text) for e in entries)
            out.update(logprobs=logprobs, finish_reason=reason)
            if with_ids:
                out["token_ids"] = tokens
            return out

        if endpoint == "chat":               # OpenAI opens each choice with the role
            for i in range(len(run.pids)):
                yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": reply_head},
                                                 "logprobs": None, "finish_reason": None}]})
        held = [[] for _ in run.pids]            # with tools: each choice's reads, sent at its end
        try:
            async for i, r in follow(self.daemon, run):
                prompt_entries[i] += r.prompt_logprobs or []
                reason = r.finish_reason if r.turn_done and r.finish_reason != "error" else None
                if tools is not None:
                    held[i].append(r)
                    if not r.turn_done:
                        continue
                    r, reason, calls = _whole(held[i], tools, reason)
                    if calls:
                        yield _sse({**head, "choices": [{"index": i, "delta": {"tool_calls": calls},
                                                         "logprobs": None, "finish_reason": None}]})
                # the echo goes first, with the prompt's logprobs when asked (they come with the first token)
                echo_ready = echo_due[i] and (not with_logprobs or prompt_entries[i] or r.turn_done)
                if r.text or reason or ((with_ids or with_logprobs) and r.tokens) or echo_ready:
                    yield _sse({**head, "choices": [choice(i, r.text, reason, r.tokens, r.logprobs)]})
        except KvosError as err:            # a process reaped or its tenant killed by someone else
            run.outcome = "error"
            yield _sse(openai_error(err, self.daemon.http_status(err)))
            return
        _outcome(run)
        failed = next((s for s in run.statuses if s.reason == "error"), None)
        if failed is not None:
            err = exit_error(failed)
            yield _sse(openai_error(err, self.daemon.http_status(err)))
            return
        if include_usage:
            yield _sse({**head, "choices": [], "usage": usage_of(run, predicted)})
        yield "data: [DONE]\n\n"


def tokenized(handle, tid, prompts: list, keep: int | None, tools, template: dict) -> list:
    """Each prompt as token ids (a chat in its template, with the tools it is given and the template
    options of `template`: add_generation_prompt, continue_final_message), only its last `keep` where
    keep is given (vLLM's truncate_prompt_tokens: -1 keeps the model's context). Tokenized here, in
    the request's worker thread: tokenizing is the caller's work."""
    if keep == -1:
        keep = handle.tenantinfo(tid).max_context
    ids = [handle.tokenize(tid, prompt, tools=tools, **template) for prompt in prompts]
    return ids if keep is None else [p[-keep:] for p in ids]


def _whole(reads, tools, reason):
    """One ReadResult of a choice's reads (text, tokens and logprobs joined), its finish reason and
    the tool calls parsed out of its text (the text then keeps only what is not a call)."""
    last = reads[-1]
    text = "".join(r.text for r in reads)
    content, calls = openai_tools.parse_calls(text, tools)
    whole = type(last)(last.pid, [t for r in reads for t in r.tokens], content or "", last.state, last.turn_done,
                       last.finish_reason, [e for r in reads for e in r.logprobs])
    for k, call in enumerate(calls):
        call["index"] = k
    return whole, ("tool_calls" if calls and reason == "stop" else reason), calls


def add_routes(app: FastAPI, daemon) -> list:
    """Mount /v1; returns the request models for the OpenAPI description."""
    api = OpenAIAPI(daemon)

    app.add_api_route("/v1/models", api.models, methods=["GET"], tags=["openai"],
                      summary="The models (tenants) this key may use")
    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"], tags=["openai"],
                      summary="Chat completion (streamed with stream=true; n choices by fork)",
                      openapi_extra=request_body(ChatRequest))
    app.add_api_route("/v1/completions", api.completions, methods=["POST"], tags=["openai"],
                      summary="Text completion (streamed with stream=true; n choices by fork)",
                      openapi_extra=request_body(CompletionRequest))
    responses = ResponsesAPI(daemon, api.resolve)
    app.add_api_route("/v1/responses", responses.create, methods=["POST"], tags=["openai"],
                      summary="A response (streamed with stream=true); stored ones sleep as processes, and "
                              "previous_response_id continues one by fork",
                      openapi_extra=request_body(ResponsesRequest))
    app.add_api_route("/v1/responses/{response_id}", responses.store.get, methods=["GET"], tags=["openai"],
                      summary="A stored response")
    app.add_api_route("/v1/responses/{response_id}", responses.store.delete, methods=["DELETE"], tags=["openai"],
                      summary="End a stored response's process")
    app.add_api_route("/v1/responses/{response_id}/cancel", responses.store.cancel, methods=["POST"], tags=["openai"],
                      summary="End a background response's turn (a kill); it stays stored, cancelled")
    app.add_api_route("/v1/responses/{response_id}/input_items", responses.store.input_items, methods=["GET"],
                      tags=["openai"], summary="A stored response's input items (its conversation before the reply)")
    return [ChatRequest, CompletionRequest, ResponsesRequest]
