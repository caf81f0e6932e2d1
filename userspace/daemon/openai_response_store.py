"""The store of the Responses API: which process holds which response, and the routes that read a
stored response back (GET, with stream=true a background one's kept events; input_items), end it
(DELETE) or cancel its background turn (a kill). openai_responses.py creates the responses and runs
their turns."""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Annotated, Literal

import anyio.to_thread
from fastapi import Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kernel.errors import EINVAL, ENOENT, KvosError
from userspace.daemon.openai_response_request import LOGPROBS
from userspace.daemon.runs import release

STORED_PER_TENANT = 16        # responses a tenant keeps for previous_response_id (each a sleeping process),
                              # and never more than half its max_procs


@dataclass
class Stored:
    """A stored response: what GET answers and the sleeping process that continues it."""
    tenant: str
    pid: int | None               # its sleeping process; None once that ended (cancelled, failed): no continuation
    params: dict                  # the request's PARAMS, which a continuation must repeat
    response: dict                # what GET answers
    messages: list                # the conversation as chat messages, its reply included (truncation)
    items: list = field(default_factory=list)   # the conversation's input items before the reply (input_items)
    task: asyncio.Task | None = None     # a background turn still running
    turn_over: bool = False       # its last read has come: a cancel no longer kills it
    events: list = field(default_factory=list)   # a background turn's server-sent events, kept for its streams
    ended: bool = False           # its last event is kept
    news: asyncio.Event = field(default_factory=asyncio.Event)   # set (and replaced) at each event kept

    def publish(self, event: str | None) -> None:
        """Keep a background turn's next event (None: the last one has been kept) and wake its readers."""
        if event is None:
            self.ended = True
        else:
            self.events.append(event)
        news, self.news = self.news, asyncio.Event()
        news.set()

    async def follow(self, after: int):
        """The kept events after sequence number `after`, then each one as it comes, to the last."""
        at = after + 1
        while True:
            while at < len(self.events):
                yield self.events[at]
                at += 1
            if self.ended:
                return
            await self.news.wait()


def entry_stream(entry: Stored, after: int) -> StreamingResponse:
    """A background response's events after sequence number `after` as server-sent events: a client
    that leaves ends its stream, not the turn."""
    return StreamingResponse(entry.follow(after), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


class ResponseStore:
    """kvosd's memory of the stored responses (a restart forgets it; their processes end with kvosd)."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.stored: OrderedDict = OrderedDict()      # response id -> Stored, oldest first

    def find(self, who, rid: str) -> Stored:
        entry = self.stored.get(rid)
        if entry is None or (who.tid is not None and entry.tenant != who.name):
            raise KvosError(ENOENT, f"no stored response {rid!r} (it was not stored, was deleted, or was the "
                                    f"oldest of more than {STORED_PER_TENANT})")
        return entry

    def keep(self, rid: str, entry: Stored, max_procs: int) -> list:
        """Store a response; -> the pids of the tenant's responses that no longer fit (to end): at most
        STORED_PER_TENANT, and at most half the tenant's processes, so stored ones never take them all."""
        self.stored[rid] = entry
        mine = [r for r, e in self.stored.items() if e.tenant == entry.tenant]
        keep = min(STORED_PER_TENANT, max(1, max_procs // 2))
        ended = [self.stored.pop(r).pid for r in mine[:max(0, len(mine) - keep)]]
        return [pid for pid in ended if pid is not None]

    def finish(self, rid: str, done: Stored) -> None:
        """A background response finished (done: what _finish would store): its entry takes done's
        process, response and conversation, unless it was deleted or evicted since (its readers and
        its task hold the entry itself)."""
        entry = self.stored.get(rid)
        if entry is not None:
            entry.pid, entry.params, entry.response, entry.messages, entry.items = (
                done.pid, done.params, done.response, done.messages, done.items)

    # -- routes -------------------------------------------------------------------------------------

    async def get(self, request: Request, response_id: str, stream: bool = False,
                  starting_after: Annotated[int | None, Query(ge=-1)] = None):
        """A stored response; with stream=true a background one's events (after starting_after), kept
        and then live, to its last."""
        who = self.daemon.authenticate(request)
        _known_query(request, {"stream", "starting_after", "include", "include[]", "include_obfuscation"}, "GET")
        entry = self.find(who, response_id)
        if not stream:
            if starting_after is not None:
                raise KvosError(EINVAL, "starting_after needs stream=true")
            return JSONResponse(entry.response)
        if not entry.response.get("background"):
            raise KvosError(EINVAL, f"stream: response {response_id!r} was not created with background: only a "
                                    "background response's events are kept")
        return entry_stream(entry, -1 if starting_after is None else starting_after)

    async def delete(self, request: Request, response_id: str):
        who = self.daemon.authenticate(request)
        entry = self.find(who, response_id)
        del self.stored[response_id]
        if entry.pid is not None:         # a background turn still running sees its process killed
            await anyio.to_thread.run_sync(release, self._handle(who), [entry.pid])
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    async def cancel(self, request: Request, response_id: str):
        """End a background response's turn (a kill): it stays stored, as cancelled, with the text it had.
        A finished one is answered as it is (so is a second cancel); its process keeps sleeping."""
        who = self.daemon.authenticate(request)
        entry = self.find(who, response_id)
        if not entry.response.get("background"):
            raise KvosError(EINVAL, f"response {response_id!r} was not created with background: only those "
                                    "can be cancelled")
        task, killed = entry.task, False
        if task is not None and not entry.turn_over:
            killed = True
            await anyio.to_thread.run_sync(_kill, self._handle(who), entry.pid)
        if task is not None:
            await asyncio.shield(task)       # the turn's own task records how it ended
        current = self.stored.get(response_id, entry)
        if killed and current.response["status"] != "cancelled" and current.pid is not None:
            # It finished as the kill came, and the kill ended its sleeping process: reaped here.
            await anyio.to_thread.run_sync(release, self._handle(who), [current.pid])
            current.pid = None
        return JSONResponse(current.response)

    async def input_items(self, request: Request, response_id: str, after: str | None = None,
                          limit: Annotated[int, Query(ge=1, le=100)] = 20, order: Literal["asc", "desc"] = "desc"):
        """The items of a stored response's conversation before its reply (earlier turns' inputs and
        outputs included), a page at a time as OpenAI lists them: newest first unless order=asc."""
        who = self.daemon.authenticate(request)
        _known_query(request, {"after", "limit", "order", "include", "include[]"}, "input_items")
        items = self.find(who, response_id).items
        items = items[::-1] if order == "desc" else list(items)
        if after is not None:
            at = next((i for i, item in enumerate(items) if item["id"] == after), None)
            if at is None:
                raise KvosError(EINVAL, f"after: no item {after!r} in the input of {response_id!r}")
            items = items[at + 1:]
        page = items[:limit]
        return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                             "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})

    def _handle(self, who):
        return who.handle if who.tid is not None else self.daemon.root


def _kill(handle, pid: int) -> None:
    """Kill a background turn's process (its task reaps it); one already gone is no error."""
    try:
        handle.kill(pid)
    except KvosError:
        pass


def _known_query(request: Request, known: set, route: str) -> None:
    """EINVAL for a query parameter the route does not take, or an include other than the text's logprobs
    (the openai client sends lists as include[])."""
    query = request.query_params
    unknown = sorted(set(query) - known)
    if unknown:
        raise KvosError(EINVAL, f"unknown query parameter {unknown[0]!r} ({route} takes {', '.join(sorted(known))})")
    unsupported = sorted(set(query.getlist("include") + query.getlist("include[]")) - {LOGPROBS})
    if unsupported:
        raise KvosError(EINVAL, f"include {unsupported[0]!r} is not supported by kvosd")
