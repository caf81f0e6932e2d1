"""OpenAI's Responses API on the syscalls: POST /v1/responses runs a response's turn (GET, DELETE,
cancel and input_items of a stored one are openai_response_store.py's).

A response is one turn of an interactive process. Stored (`store`, the default), the process sleeps
after its turn and keeps its pages (under pressure the kernel swaps or reclaims idle sleepers first),
so `previous_response_id` continues the conversation without computing it again: the stored process
is forked (its pages shared copy-on-write) and the fork is written the new input, which leaves the
stored one as it was: a response can be continued more than once (branches). A tenant keeps at most
STORED_PER_TENANT responses; the oldest is ended (its id then answers 404). Not stored, the process
exits after its turn. Served: text input (a string, or messages with text parts), instructions,
max_output_tokens, temperature, top_p, text.format (text, json_schema, json_object), stream, store,
previous_response_id, truncation ("auto": openai_response_truncation.py), logprobs (include
"message.output_text.logprobs", top_logprobs), function tools (tools, tool_choice; calls come
back as function_call items, results go in as function_call_output items: openai_response_tools.py)
and background (the turn runs as a task of kvosd's event loop, its events kept for its streams, read
back with GET, ended early with POST /v1/responses/{id}/cancel: a kill).
Other tools, reasoning and other kinds of input are a 400 naming them. A continuation keeps its conversation's
sampling parameters and tools (write() carries none, and the template gave the tools once): other
values are a 400.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import anyio.to_thread
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from kernel.errors import E2BIG, EBUSY, EINVAL, ENOMEM, KvosError
from kernel.results import ExitStatus
from userspace.daemon import logprobs_shapes, openai_response_truncation, openai_tools, waiting
from userspace.daemon.openai_requests import parse
from userspace.daemon.openai_response_events import item_events, message_opening
from userspace.daemon.openai_response_request import (
    IGNORED,
    LOGPROBS,
    OFF_VALUES,
    PARAMS,
    ResponsesRequest,
    input_items,
    messages_of,
    response_object,
    spawn_params,
    wants_logprobs,
)
from userspace.daemon.openai_response_store import ResponseStore, Stored, entry_stream
from userspace.daemon.openai_response_tools import chat_shape, message_item, output_items
from userspace.daemon.runs import POLL_SECONDS, Launch, exit_error, release
from userspace.daemon.sysapi import json_object


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
class Turn:
    """What a response's turn carries from its request to its end."""
    req: ResponsesRequest
    rid: str
    cached: int                   # tokens of the conversation not computed again (shared with its fork)
    asked: dict                   # the request's PARAMS, which a continuation must repeat
    tools: list | None            # the tools whose calls the reply may hold
    history: list                 # the conversation as chat messages before the reply
    items: list                   # the conversation as input items before the reply (input_items)


class ResponsesAPI:
    def __init__(self, daemon, resolve):
        self.daemon = daemon
        self.resolve = resolve
        self.store = ResponseStore(daemon)
        self.turns: set = set()       # background turns' tasks (the event loop holds tasks only weakly)


    async def create(self, request: Request):
        who = self.daemon.authenticate(request)
        req = parse(ResponsesRequest, await json_object(request, "responses"), IGNORED, OFF_VALUES)
        openai_response_truncation.check(req.truncation)
        if req.background and not req.store:
            raise KvosError(EINVAL, "background needs store: a background response is read back with GET")
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
            entry = self.store.find(who, req.previous_response_id)
            if entry.tenant != tenant:
                raise KvosError(EINVAL, "previous_response_id belongs to another model")
            if entry.task is not None:
                raise KvosError(EBUSY, f"response {req.previous_response_id!r} is still in progress (background): "
                                       "wait for it to complete, or cancel it")
            if entry.pid is None:
                raise KvosError(EINVAL, f"response {req.previous_response_id!r} was {entry.response['status']}: "
                                        "its process has ended, so it cannot be continued")
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
        before = [] if req.previous_response_id is None else entry.items + entry.response["output"]
        turn = Turn(req, rid, cached, asked, tools, history, before + input_items(req, rid))
        run = Launch(handle, tenant, [pid], [0], time.monotonic())
        if req.background:
            entry = await self._start_background(run, tid, turn)
            return entry_stream(entry, -1) if req.stream else JSONResponse(dict(entry.response))
        head = response_object(rid, req, "in_progress", None, None, [])
        if req.stream:
            return ResponseStream(self.daemon, run, self._events(run, turn, head))
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
            status = await self._ended(run, reply)
            if reply.reason == "error":
                raise exit_error(status)
            return JSONResponse(_cancelled(turn, reply))
        return JSONResponse(await self._finish(run, turn, reply))

    async def _ended(self, run, reply: Reply):
        """A turn that ended in error or killed: its process reaped and the request counted. -> its status"""
        status = await anyio.to_thread.run_sync(run.handle.wait, run.pids[0])
        run.statuses, run.outcome, run.finished = [status], reply.reason, True
        self.daemon.request_done(run, "responses")
        return status

    async def _finish(self, run, turn: Turn, reply: Reply) -> dict:
        """The finished response: counted, logged, stored (or its process reaped)."""
        handle, pid, req, rid = run.handle, run.pids[0], turn.req, turn.rid
        text, tokens, reason = "".join(reply.text), reply.tokens, reply.reason
        info = await anyio.to_thread.run_sync(lambda: next((p for p in handle.ps() if p.pid == pid), None))
        # what the turn read: every token before its reply (earlier turns' replies included)
        prompt = info.prompt_tokens + info.generated_tokens - len(tokens) if info is not None else 0
        usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": turn.cached},
                 "output_tokens": len(tokens), "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": prompt + len(tokens)}
        output = _output(rid, text, turn.tools, reason, reply.logprobs if wants_logprobs(req) else None)
        response = response_object(rid, req, "completed" if reason == "stop" else "incomplete", usage, reason, output)
        run.statuses = [ExitStatus(pid=pid, reason=reason, tokens=tokens, text=text, prompt_tokens=prompt,
                                   elapsed=time.monotonic() - run.started)]
        run.outcome, run.finished = "ok", True
        self.daemon.request_done(run, "responses")
        if req.store:     # (info None: its process was killed and reaped since its turn ended)
            stored = Stored(run.tenant, pid if info is not None else None, turn.asked, response,
                            turn.history + openai_response_truncation.reply_messages(output), turn.items)
        if req.background:                 # stored (and counted) since it began
            self.store.finish(rid, stored)
        elif req.store and info is not None:         # (None: killed since its turn ended; nothing to keep)
            max_procs = (await anyio.to_thread.run_sync(handle.tenantinfo, info.tid)).max_procs
            evicted = self.store.keep(rid, stored, max_procs)
            if evicted:
                await anyio.to_thread.run_sync(release, handle, evicted)
        else:
            await anyio.to_thread.run_sync(handle.wait, pid)
        return response

    async def _start_background(self, run, tid, turn: Turn) -> Stored:
        """Store a background response as queued and start its turn as a task: -> its entry."""
        head = response_object(turn.rid, turn.req, "queued", None, None, [])
        entry = Stored(run.tenant, run.pids[0], turn.asked, head, turn.history, turn.items)
        max_procs = (await anyio.to_thread.run_sync(run.handle.tenantinfo, tid)).max_procs
        evicted = self.store.keep(turn.rid, entry, max_procs)
        if evicted:
            await anyio.to_thread.run_sync(release, run.handle, evicted)
        entry.task = asyncio.get_running_loop().create_task(self._background(entry, run, turn, dict(head)))
        self.turns.add(entry.task)
        entry.task.add_done_callback(self.turns.discard)
        return entry

    async def _background(self, entry: Stored, run, turn: Turn, head: dict) -> None:
        """A background turn, read to its end with every event kept on its entry (for its streams: POST with
        stream, GET with stream=true). The stored response becomes in_progress at its first token, then
        completed or incomplete (_finish), cancelled (killed: with the text it had) or failed."""
        try:
            async for event in self._events(run, turn, head, entry):
                entry.publish(event)
        finally:
            entry.task = None
            entry.publish(None)

    async def _events(self, run, turn: Turn, head: dict, entry: Stored | None = None):
        """The Responses API's server-sent events for one reply. Its text streams as it comes; a reply
        that may hold tool calls is sent whole at its end, as items (its text, then each call). entry:
        the stored response of a background turn, kept up to date as the turn goes."""
        seq = 0
        item_id = f"msg_{turn.rid.removeprefix('resp_')}"

        def event(kind, **fields):
            nonlocal seq
            seq += 1
            return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq - 1, **fields})}\n\n"

        yield event("response.created", response=head)
        yield event("response.in_progress", response={**head, "status": "in_progress"})
        streaming = turn.tools is None
        if streaming:
            for e in message_opening(event, item_id):
                yield e
        reply, with_logprobs = Reply(), wants_logprobs(turn.req)
        async for r in _turn(self.daemon, run, None):
            reply.add(r)
            if entry is not None:
                entry.turn_over = r.turn_done
                if r.tokens and entry.response["status"] == "queued":
                    entry.response["status"] = "in_progress"
            if streaming and (r.text or (with_logprobs and r.logprobs)):
                yield event("response.output_text.delta", item_id=item_id, output_index=0, content_index=0,
                            delta=r.text, logprobs=logprobs_shapes.chat(r.logprobs)["content"] if with_logprobs
                            else [])
        if reply.reason in ("error", "killed"):
            status = await self._ended(run, reply)
            if entry is not None:
                entry.pid = None
                entry.response = _cancelled(turn, reply) if reply.reason == "killed" else {
                    **response_object(turn.rid, turn.req, "failed", None, None, []),
                    "error": {"code": "server_error", "message": str(exit_error(status))}}
            yield event("error", code=reply.reason, message=status.error or f"the process was {reply.reason}",
                        param=None)
            return
        response = await self._finish(run, turn, reply)
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


def _cancelled(turn: Turn, reply: Reply) -> dict:
    """The response of a turn whose process was killed: cancelled, with the text it had."""
    return response_object(turn.rid, turn.req, "cancelled", None, reply.reason,
                           [message_item(turn.rid, "".join(reply.text), "incomplete")])


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
