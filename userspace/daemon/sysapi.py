"""The syscall table over HTTP, generated from kernel.syscalls.SYSCALLS.

Each syscall is POST /sys/{name} with a JSON object of its named arguments and
answers {"result": ...}; its OpenAPI entry (summary, description, argument
schema) is built from the handler's signature and docstring. GET /sys lists the
table (names, parameters in order) so a client can pass arguments by position.
Every call runs in a worker thread, so the kernel lock never holds the event loop;
read and wait wait without a thread (userspace/daemon/waiting.py).
"""
from __future__ import annotations

import json

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from kernel.errors import EAGAIN, EINVAL, KvosError
from kernel.syscalls import SYSCALLS
from userspace.daemon import json_body, waiting, wire

INLINE_PARSE_BYTES = 64 * 1024          # bodies up to this size are parsed on the event loop (microseconds)


def parameters(sc) -> list:
    """The syscall's arguments after (kernel, caller), as JSON-ready descriptions, in order."""
    out = []
    for p in list(sc.signature.parameters.values())[2:]:
        entry = {"name": p.name, "kind": {p.POSITIONAL_OR_KEYWORD: "positional", p.KEYWORD_ONLY: "keyword",
                                          p.VAR_KEYWORD: "extra", p.VAR_POSITIONAL: "varargs"}[p.kind]}
        if p.default is not p.empty and _jsonable(p.default):
            entry["default"] = p.default
        entry["required"] = p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        out.append(entry)
    return out


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def doc_parts(doc: str) -> tuple[str, str]:
    """(summary, the rest): the docstring's first paragraph on one line, then what follows it."""
    head, _, rest = doc.partition("\n\n")
    return " ".join(head.split()), rest.strip()


def table() -> dict:
    return {sc.name: {"params": parameters(sc), "root_only": sc.root_only, "blocking": sc.blocking,
                      "doc": sc.doc} for sc in SYSCALLS.values()}


def _body_schema(sc) -> dict:
    props, required, extra = {}, [], False
    for p in parameters(sc):
        if p["kind"] == "extra":
            extra = True
            continue
        props[p["name"]] = {"description": ("required" if p["required"] else "optional") +
                            (f" ({p['kind']} in Python)" if p["kind"] == "keyword" else "")}
        if "default" in p:
            props[p["name"]]["default"] = p["default"]
        if p["required"]:
            required.append(p["name"])
    schema = {"type": "object", "properties": props, "additionalProperties": extra}
    if required:
        schema["required"] = required
    return schema


async def json_object(request: Request, what: str) -> dict:
    """The request body as a JSON object (json_body.loads: strict, at most MAX_DEPTH deep); EINVAL
    with a clear reason otherwise. Empty means {}. A large body is parsed in a worker thread, so
    parsing it does not hold up the event loop (other requests' streams)."""
    raw = await request.body()
    if not raw.strip():
        return {}
    if len(raw) > INLINE_PARSE_BYTES:
        body = await anyio.to_thread.run_sync(json_body.loads, raw, what)
    else:
        body = json_body.loads(raw, what)
    if not isinstance(body, dict):
        raise KvosError(EINVAL, f"{what}: the body must be a JSON object of named arguments, "
                                f"got {type(body).__name__}")
    return body


async def _waiting(handle, sc, args: dict, request):
    """read or wait, arguments bound as the handle binds them, awaited without a thread."""
    try:
        bound = sc.signature.bind(None, None, **args)
    except TypeError as err:
        raise KvosError(EINVAL, f"{sc.name}: {err}") from None
    bound.apply_defaults()
    call = waiting.read if sc.name == "read" else waiting.wait
    return await call(handle, bound.arguments["pid"], bound.arguments["timeout"], request)


def _endpoint(daemon, sc):
    async def call(request: Request):
        who = daemon.authenticate(request)
        args = await json_object(request, sc.name)
        if daemon.draining and sc.new_work:      # the kernel refuses them after shutdown too
            raise KvosError(EAGAIN, f"{sc.name}: kvosd is shutting down")
        if sc.name in ("read", "wait"):          # awaited, not a thread each (a wait left early reaps nothing)
            try:
                result = await _waiting(who.handle, sc, args, request)
            except waiting.Disconnected:
                return JSONResponse({}, status_code=499)
        else:
            method = getattr(who.handle, sc.name)
            result = await anyio.to_thread.run_sync(lambda: method(**args))
        return JSONResponse({"result": wire.to_jsonable(result)})
    call.__name__ = f"sys_{sc.name}"
    return call


def add_routes(app: FastAPI, daemon) -> None:
    for sc in SYSCALLS.values():
        notes = []
        if sc.root_only:
            notes.append("Root only: a tenant key gets 403 EPERM.")
        if sc.blocking:
            notes.append("May wait (its timeout argument); runs in a worker thread.")
        summary, rest = doc_parts(sc.doc)
        app.add_api_route(
            f"/sys/{sc.name}", _endpoint(daemon, sc), methods=["POST"], tags=["syscalls"],
            summary=summary, operation_id=sc.name,
            description="\n\n".join(x for x in (rest.strip(), " ".join(notes),
                                                "Answers {\"result\": ...}: the value the Python handle returns, "
                                                "dataclasses as objects.") if x),
            openapi_extra={"requestBody": {"required": False, "content": {
                "application/json": {"schema": _body_schema(sc)}}}})

    async def listing(request: Request):
        daemon.authenticate(request)
        return JSONResponse(table())
    app.add_api_route("/sys", listing, methods=["GET"], tags=["syscalls"],
                      summary="The syscall table: names, parameters in order, root_only, blocking, docs")
