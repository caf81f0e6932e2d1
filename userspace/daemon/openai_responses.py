"""OpenAI's Responses API on the syscalls: POST /v1/responses, GET and DELETE /v1/responses/{id}.

A response is one turn of an interactive process. Stored (`store`, the default), the process sleeps
after its turn and keeps its pages (under pressure the kernel swaps or reclaims idle sleepers first),
so `previous_response_id` continues the conversation without computing it again: the stored process
is forked (its pages shared copy-on-write) and the fork is written the new input, which leaves the
stored one as it was: a response can be continued more than once (branches). A tenant keeps at most
STORED_PER_TENANT responses; the oldest is ended (its id then answers 404). Not stored, the process
exits after its turn. Served: text input (a string, or messages with text parts), instructions,
max_output_tokens, temperature, top_p, text.format (text, json_schema, json_object), stream, store,
previous_response_id, truncation ("auto": openai_response_truncation.py), logprobs (include
"message.output_text.logprobs", top_logprobs), and function tools (tools, tool_choice; calls come
back as function_call items, results go in as function_call_output items: openai_response_tools.py).
Other tools, reasoning and other kinds of input are a 400 naming them. A continuation keeps its conversation's
sampling parameters and tools (write() carries none, and the template gave the tools once): other
values are a 400.
"""
from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import anyio.to_thread
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from kernel.errors import E2BIG, EINVAL, ENOENT, ENOMEM, KvosError
from kernel.results import ExitStatus
from userspace.daemon import logprobs_shapes, openai_response_truncation, openai_tools, waiting
from userspace.daemon.openai_requests import STRICT, json_schema, parse, text_of_parts
from userspace.daemon.openai_response_events import item_events, message_opening
from userspace.daemon.openai_response_tools import add_input_item, chat_shape, message_item, output_items
from userspace.daemon.runs import POLL_SECONDS, Launch, exit_error, release
from userspace.daemon.sysapi import json_object

STORED_PER_TENANT = 16        # responses a tenant keeps for previous_response_id (each a sleeping process),
                              # and never more than half its max_procs
IGNORED = frozenset({"user", "metadata", "safety_identifier", "prompt_cache_key", "service_tier",
                     "parallel_tool_calls", "prompt_cache_retention"})
OFF_VALUES = {"background": (False,),
              "reasoning": (), "conversation": (), "prompt": (),
              "max_tool_calls": ()}
# A conversation keeps these from its first turn (tool_choice as its mode: None, auto, required or a name).
PARAMS = ("max_output_tokens", "temperature", "top_p", "text", "tools", "tool_choice", "include", "top_logprobs")
LOGPROBS = "message.output_text.logprobs"     # the one `include` kvosd serves
MAX_TOP_LOGPROBS = 20


class ResponsesRequest(BaseModel):
    model_config = STRICT
    model: str
    input: str | list[dict]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    text: dict | None = None                 # {"format": {"type": "text" | "json_schema" | "json_object", ...}}
    tools: list[dict] | None = None          # function tools: {"type": "function", "name", "parameters", ...}
    tool_choice: str | dict | None = None    # "auto" (with tools), "none", "required", {"type": "function", "name"}
    include: list[str] | None = None         # ["message.output_text.logprobs"]: the text's logprobs
    top_logprobs: int | None = None          # with them, the most likely tokens at each position (0 to 20)
    truncation: str = "disabled"             # "auto": drop the conversation's oldest items to fit


@dataclass
class Reply:
    """What a turn's reads brought: its text, token ids, logprob entries and why it ended."""
    text: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    reason: str | None = None

    def add(self, r) -> None:
        self.text.append(r.text)
        self.tokens += r.tokens
        self.logprobs += r.logprobs
        self.reason = r.finish_reason


@dataclass
class Stored:
    tenant: str
    pid: int
    params: dict                  # the request's PARAMS, which a continuation must repeat
    response: dict                # what GET answers
    messages: list                # the conversation as chat messages, its reply included (truncation)


def messages_of(req: ResponsesRequest) -> list:
    """The chat messages of the request's input (instructions first, as the system message)."""
    out = [{"role": "system", "content": req.instructions}] if req.instructions is not None else []
    if isinstance(req.input, str):
        return out + [{"role": "user", "content": req.input}]
    for i, item in enumerate(req.input):
        kind = item.get("type", "message")
        if kind in ("function_call", "function_call_output"):
            add_input_item(out, item, i)
            continue
        if kind != "message":
            raise KvosError(EINVAL, f"input.{i}.type {kind!r} is not supported by kvosd (text messages and "
                                    "function calls and their outputs only)")
        role, content = item.get("role"), item.get("content")
        if role not in ("user", "system", "developer", "assistant"):
            raise KvosError(EINVAL, f"input.{i}.role must be user, system, developer or assistant, got {role!r}")
        if isinstance(content, list):
            content = text_of_parts(content, f"input.{i}.content", ("input_text", "output_text", "text"))
        if not isinstance(content, str):
            raise KvosError(EINVAL, f"input.{i}.content must be a string or a list of text parts")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    if not out:
        raise KvosError(EINVAL, "input holds no message")
    return out


def spawn_params(req: ResponsesRequest) -> dict:
    params = {}
    if req.max_output_tokens is not None:
        params["max_tokens"] = req.max_output_tokens
    for key in ("temperature", "top_p"):
        if getattr(req, key) is not None:
            params[key] = getattr(req, key)
    fmt = (req.text or {}).get("format")
    if req.text is not None and (set(req.text) - {"format", "verbosity"} or req.text.get("verbosity") not in
                                 (None, "medium")):
        raise KvosError(EINVAL, "text: only format is supported by kvosd")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise KvosError(EINVAL, "text.format must be an object")
        spec = {k: v for k, v in fmt.items() if k != "type"}
        schema = json_schema({"type": fmt.get("type"), **({"json_schema": spec} if spec else {})})
        if schema is not None:
            params["json_schema"] = schema
    unknown = sorted(set(req.include or ()) - {LOGPROBS})
    if unknown:
        raise KvosError(EINVAL, f"include {unknown[0]!r} is not supported by kvosd (only {LOGPROBS!r})")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
        raise KvosError(EINVAL, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs}")
    if wants_logprobs(req):
        params["logprobs"] = req.top_logprobs or 0
    return params


def wants_logprobs(req: ResponsesRequest) -> bool:
    """Whether the text's logprobs go in the response: asked by include, or by a top_logprobs above 0."""
    return LOGPROBS in (req.include or ()) or bool(req.top_logprobs)


class ResponsesAPI:
    def __init__(self, daemon, resolve):
        self.daemon = daemon
        self.resolve = resolve
        self.stored: OrderedDict = OrderedDict()      # response id -> Stored, oldest first

    # -- the store -------------------------------------------------------------------------------
    def _find(self, who, rid: str) -> Stored:
        entry = self.stored.get(rid)
        if entry is None or (who.tid is not None and entry.tenant != who.name):
            raise KvosError(ENOENT, f"no stored response {rid!r} (it was not stored, was deleted, or was the "
                                    f"oldest of more than {STORED_PER_TENANT})")
        return entry

    def _keep(self, rid: str, entry: Stored, max_procs: int) -> list:
        """Store a response; -> the pids of the tenant's responses that no longer fit (to end): at most
        STORED_PER_TENANT, and at most half the tenant's processes, so stored ones never take them all."""
        self.stored[rid] = entry
        mine = [r for r, e in self.stored.items() if e.tenant == entry.tenant]
        keep = min(STORED_PER_TENANT, max(1, max_procs // 2))
        return [self.stored.pop(r).pid for r in mine[:max(0, len(mine) - keep)]]

    # -- routes -------------------------------------------------------------------------------------
    async def get(self, request: Request, response_id: str):
        who = self.daemon.authenticate(request)
        return JSONResponse(self._find(who, response_id).response)

    async def delete(self, request: Request, response_id: str):
        who = self.daemon.authenticate(request)
        entry = self._find(who, response_id)
        del self.stored[response_id]
        handle = who.handle if who.tid is not None else self.daemon.root
        await anyio.to_thread.run_sync(release, handle, [entry.pid])
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    async def create(self, request: Request):
        who = self.daemon.authenticate(request)
        req = parse(ResponsesRequest, await json_object(request, "responses"), IGNORED, OFF_VALUES)
        openai_response_truncation.check(req.truncation)
        self.daemon.refuse_if_draining("spawn")
        messages = messages_of(req)
        params = spawn_params(req)
        chat_tools, choice = chat_shape(req.tools, req.tool_choice)
        mode = openai_tools.check(chat_tools, choice)
        tools = chat_tools if mode is not None else None     # the tools whose calls the reply may hold
        if tools is not None and "logprobs" in params:
            raise KvosError(EINVAL, f"include {LOGPROBS!r} with tools is not supported (a call's tokens are no "
                                    "message's)")
        asked = {**{k: getattr(req, k) for k in PARAMS}, "tool_choice": mode}
        handle, tid, tenant = await anyio.to_thread.run_sync(self.resolve, who, req.model)
        cached = 0

        def spawn(history):      # a new process for the conversation `history` (fitted, when asked)
            if tools is not None:
                params.update(openai_tools.spawn_keys(handle.tenantinfo(tid), chat_tools, choice, params))
            if req.truncation == "auto":
                history = openai_response_truncation.fit(handle, tid, history, params.get("tools"))
            return handle.spawn(tid, history, interactive=req.store, **params), history
        if req.previous_response_id is None:
            pid, history = await anyio.to_thread.run_sync(spawn, messages)
        else:
            entry = self._find(who, req.previous_response_id)
            if entry.tenant != tenant:
                raise KvosError(EINVAL, "previous_response_id belongs to another model")
            if req.instructions is not None:
                raise KvosError(EINVAL, "instructions with previous_response_id are not supported: the "
                                        "conversation's first turn holds them")
            changed = [k for k in PARAMS if asked[k] != entry.params[k]]
            if changed:
                raise KvosError(EINVAL, f"{changed[0]} differs from the conversation's ({entry.params[changed[0]]!r}): "
                                        f"a continuation keeps its first turn's parameters")
            history = entry.messages + messages
            try:
                pid, cached = await anyio.to_thread.run_sync(_branch, handle, entry.pid, messages)
            except KvosError as err:     # too long for the context: with truncation, rebuilt and fitted
                if req.truncation != "auto" or err.errno not in (E2BIG, ENOMEM):
                    raise
                pid, history = await anyio.to_thread.run_sync(spawn, history)
        rid = f"resp_{self.daemon.nonce}{pid}"
        run = Launch(handle, tenant, [pid], [0], time.monotonic())
        head = _response(rid, req, "in_progress", None, None, [])
        if req.stream:
            return ResponseStream(self.daemon, run, self._events(run, req, head, cached, asked, tools, history))
        reply = Reply()
        try:
            async for r in _turn(self.daemon, run, request):
                reply.add(r)
        except waiting.Disconnected:
            await anyio.to_thread.run_sync(release, handle, [pid])
            run.outcome = "disconnected"
            self.daemon.request_done(run, "responses")
            return JSONResponse({}, status_code=499)
        if reply.reason in ("error", "killed"):     # a failed forward, or someone killed the process
            status = await anyio.to_thread.run_sync(handle.wait, pid)
            run.statuses, run.outcome, run.finished = [status], reply.reason, True
            self.daemon.request_done(run, "responses")
            if reply.reason == "error":
                raise exit_error(status)
            return JSONResponse(_response(rid, req, "cancelled", None, reply.reason,
                                          [message_item(rid, "".join(reply.text), "incomplete")]))
        response = await self._finish(run, req, rid, reply, cached, asked, tools, history)
        return JSONResponse(response)

    async def _finish(self, run, req, rid, reply: Reply, cached, asked, tools, history) -> dict:
        """The finished response: counted, logged, stored (or its process reaped). history: the
        conversation's messages before the reply."""
        handle, pid = run.handle, run.pids[0]
        text, tokens, reason = "".join(reply.text), reply.tokens, reply.reason
        info = await anyio.to_thread.run_sync(lambda: next((p for p in handle.ps() if p.pid == pid), None))
        # what the turn read: every token before its reply (earlier turns' replies included)
        prompt = info.prompt_tokens + info.generated_tokens - len(tokens) if info is not None else 0
        response = _response(rid, req, "completed" if reason == "stop" else "incomplete",
                             {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                              "output_tokens": len(tokens), "output_tokens_details": {"reasoning_tokens": 0},
                              "total_tokens": prompt + len(tokens)}, reason,
                             _output(rid, text, tools, reason, reply.logprobs if wants_logprobs(req) else None))
        run.statuses = [ExitStatus(pid=pid, reason=reason, tokens=tokens, text=text, prompt_tokens=prompt,
                                   elapsed=time.monotonic() - run.started)]
        run.outcome, run.finished = "ok", True
        self.daemon.request_done(run, "responses")
        if req.store and info is not None:           # (None: killed since its turn ended; nothing to keep)
            max_procs = (await anyio.to_thread.run_sync(handle.tenantinfo, info.tid)).max_procs
            messages = history + openai_response_truncation.reply_messages(response["output"])
            evicted = self._keep(rid, Stored(run.tenant, pid, asked, response, messages), max_procs)
            if evicted:
                await anyio.to_thread.run_sync(release, handle, evicted)
        else:
            await anyio.to_thread.run_sync(handle.wait, pid)
        return response

    async def _events(self, run, req, head, cached, asked, tools, history):
        """The Responses API's server-sent events for one reply. Its text streams as it comes; a reply
        that may hold tool calls is sent whole at its end, as items (its text, then each call)."""
        seq = 0
        rid, pid = head["id"], run.pids[0]
        item_id = f"msg_{rid.removeprefix('resp_')}"

        def event(kind, **fields):
            nonlocal seq
            seq += 1
            return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq - 1, **fields})}\n\n"

        yield event("response.created", response=head)
        yield event("response.in_progress", response=head)
        streaming = tools is None
        if streaming:
            for e in message_opening(event, item_id):
                yield e
        reply, with_logprobs = Reply(), wants_logprobs(req)
        async for r in _turn(self.daemon, run, None):
            reply.add(r)
            if streaming and (r.text or (with_logprobs and r.logprobs)):
                yield event("response.output_text.delta", item_id=item_id, output_index=0, content_index=0,
                            delta=r.text, logprobs=logprobs_shapes.chat(r.logprobs)["content"] if with_logprobs
                            else [])
        if reply.reason in ("error", "killed"):
            status = await anyio.to_thread.run_sync(run.handle.wait, pid)
            run.statuses, run.outcome, run.finished = [status], reply.reason, True
            self.daemon.request_done(run, "responses")
            yield event("error", code=reply.reason, message=status.error or f"the process was {reply.reason}",
                        param=None)
            return
        response = await self._finish(run, req, rid, reply, cached, asked, tools, history)
        for index, item in enumerate(response["output"]):
            for e in item_events(event, index, item, opened=streaming):
                yield e
        yield event("response.completed" if reply.reason == "stop" else "response.incomplete", response=response)


class ResponseStream(StreamingResponse):
    """A streamed response whose process is ended however the stream ends before its turn did (a
    client that left, even before the first event), off the event loop (the daemon's reaper)."""

    def __init__(self, daemon, run, events):
        super().__init__(events, media_type="text/event-stream",
                         headers={"X-Kvos-Pids": str(run.pids[0]), "Cache-Control": "no-cache"})
        self.daemon, self.run = daemon, run

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.run.finished:
                self.run.outcome = "disconnected"
                self.daemon.release_later(self.run)
                self.daemon.request_done(self.run, "responses")


async def _turn(daemon, run, request):
    """The process's output until its turn ends (ReadResults); with a request, Disconnected once its
    client has gone."""
    pid = run.pids[0]
    last_token_at: dict = {}
    while True:
        (r,) = await waiting.next_output(run.handle, [pid], POLL_SECONDS)
        if r.tokens:
            daemon.observe_tokens(run, 0, len(r.tokens), time.monotonic(), last_token_at)
        yield r
        if r.turn_done:
            return
        if request is not None and await request.is_disconnected():
            raise waiting.Disconnected()


def _branch(handle, pid: int, messages: list) -> tuple:
    """A fork of a stored (sleeping) process, written the new messages. -> (its pid, tokens shared)"""
    info = next((p for p in handle.ps() if p.pid == pid), None)
    (child,) = handle.fork(pid, 1)
    try:
        handle.read(child)              # a fork's reader starts at its beginning: the earlier turns are read
        handle.write(child, messages)
    except KvosError:
        release(handle, [child])
        raise
    return child, (info.prompt_tokens + info.generated_tokens) if info is not None else 0


def _output(rid: str, text: str, tools, reason, logprobs: list | None = None) -> list:
    """A finished reply's output items: its text as one message (with its tokens' logprobs when
    asked) or, when it may call tools, what is left of its text (if anything) and each call parsed
    out of it."""
    status = "completed" if reason == "stop" else "incomplete"
    if tools is None:
        return [message_item(rid, text, status, [] if logprobs is None else logprobs_shapes.chat(logprobs)["content"])]
    content, calls = openai_tools.parse_calls(text, tools)
    return output_items(rid, content, calls, status)


def _response(rid: str, req: ResponsesRequest, status: str, usage, reason, output: list) -> dict:
    """The Response object, as OpenAI's reference describes it."""
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": status,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if reason == "length" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": req.model,
            "output": output, "parallel_tool_calls": True,
            "previous_response_id": req.previous_response_id, "store": req.store,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "text": req.text or {"format": {"type": "text"}},
            "tool_choice": "auto" if req.tool_choice is None else req.tool_choice, "tools": req.tools or [],
            "truncation": req.truncation, "usage": usage, "metadata": {}}
