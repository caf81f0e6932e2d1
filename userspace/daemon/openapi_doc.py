"""kvosd's OpenAPI description, completed with what every route answers.

FastAPI describes the requests; describe() adds the responses, so that a client (or schemathesis)
can check them: each syscall's result schema (built from wire.RESULTS and the dataclasses' fields,
so a new syscall is described without code here), the two error bodies (errno, OpenAI's), the
statuses each kind of route can answer, and the bearer key as a security scheme.
"""
from __future__ import annotations

import dataclasses
import types
import typing

from kernel.errors import ERRNOS
from userspace.daemon import wire
from userspace.daemon.errors import is_openai

ERRNO = {
    "type": "object", "required": ["errno", "code", "message"],
    "description": "An error: the errno name, its POSIX number and a one-line reason. A kernel panic has "
                   "errno and code null and \"panic\": true.",
    "properties": {"errno": {"enum": [*ERRNOS, None]}, "code": {"type": ["integer", "null"]},
                   "message": {"type": "string"}, "panic": {"type": "boolean"}}}
OPENAI_ERROR = {
    "type": "object", "required": ["error"], "description": "An error in OpenAI's shape; code is the errno name.",
    "properties": {"error": {"type": "object", "required": ["message", "type", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"enum": [*ERRNOS, None]}, "errno": {"enum": [*ERRNOS, None]}, "panic": {"type": "boolean"}}}}}
HEALTH_STOPPED = {"type": "object", "required": ["status"], "properties": {
    "status": {"enum": ["stopped", "loading", "failed", "draining"]}, "error": {"type": ["string", "null"]}}}
UNKEYED = ("/health", "/healthz")
NAMES_A_MODEL = ("/tokenizer_info",)          # GET routes whose query names a model (404 when none is served)

# Why each error status can come back.
WHY = {400: "EINVAL: a bad argument, or a body that is not a JSON object (malformed HTTP too)",
       401: "no bearer key, an unknown one, or the key of a tenant that no longer exists",
       403: "EPERM: another tenant's process, or a root-only call",
       404: "ESRCH, ENOENT: no such pid, tenant, segment or model",
       409: "EBUSY: the object is in use",
       413: "ENOMEM, E2BIG: a request that can never fit, beyond a tenant's limit, or a body over "
            "--max-body-bytes",
       429: "EAGAIN: a tenant's process or queue limit",
       431: "E2BIG: a request head over --max-header-bytes",
       500: "EIO: a model or device failure, a kernel panic (\"panic\": true), or a bug in kvosd",
       503: "EAGAIN: kvosd is loading its models, shutting down, or has --max-connections open; ENODEV: "
            "no device"}
EVERY_ROUTE = (400, 413, 431, 500, 503)         # the HTTP layer's own refusals, whatever the route
KERNEL = (400, 403, 404, 409, 413, 429, 500, 503)   # what a syscall (and so an OpenAI request) can raise


# Example values of syscall arguments, by name (the examples of the request bodies: requests a
# client can copy, and the first ones a fuzzer sends). tid and model are the daemon's first tenant's.
ARGUMENT_EXAMPLES = {"pid": 1, "prompt": "Hello", "n": 2, "inc": 1, "timeout": 0.5, "since": 0, "limit": 20,
                     "max_tokens": 8, "temperature": 0, "text": True, "frames": False}


def request_body(*models) -> dict:
    """A route's openapi_extra naming its JSON body's model (or any of several): the schemas themselves
    go into components when the description is built (server.openapi)."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in models]
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": refs[0] if len(refs) == 1 else {"anyOf": refs}}}}}


def describe(schema: dict, tenant: tuple | None = None) -> dict:
    """Complete a get_openapi() schema in place (and return it). tenant: (name, tid) of a tenant the
    examples may name."""
    _examples(schema, *(tenant or ("tiny-llama", 1)))
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {}).update(Errno=ERRNO, OpenAIError=OPENAI_ERROR, HealthStopped=HEALTH_STOPPED)
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                "description": "a tenant key or the root key"}}
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            _describe(path, method, op)
    return schema


def _examples(schema: dict, model: str, tid: int) -> None:
    values = {**ARGUMENT_EXAMPLES, "tid": tid}
    for path, operations in schema.get("paths", {}).items():
        media = operations.get("post", {}).get("requestBody", {}).get("content", {}).get("application/json", {})
        if path.startswith("/sys/"):
            props = media.get("schema", {}).get("properties", {})
            example = {name: values[name] for name in props if name in values}
            if example:
                media["example"] = example
        elif path == "/v1/completions":
            media["example"] = {"model": model, "prompt": "Hello", "max_tokens": 8}
        elif path == "/v1/chat/completions":
            media["example"] = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
        elif path == "/v1/responses":
            media["example"] = {"model": model, "input": "Hello", "max_output_tokens": 8}
        elif path == "/tokenize":
            media["example"] = {"model": model, "prompt": "Hello"}
        elif path == "/detokenize":
            media["example"] = {"model": model, "tokens": [1, 2, 3]}


def _describe(path: str, method: str, op: dict) -> None:
    keyed = path not in UNKEYED
    statuses = set(EVERY_ROUTE) | ({401} if keyed else set())
    if method == "post":
        statuses |= set(KERNEL)
    if path == "/metrics":
        statuses.add(403)
    if path in NAMES_A_MODEL or path.startswith("/v1/responses/"):
        statuses.add(404)
    error = "OpenAIError" if is_openai(path) else "Errno"
    responses = {"200": {"description": "Success", "content": _success(path, method)}}
    for status in sorted(statuses):
        body = {"$ref": f"#/components/schemas/{error}"}
        if path in UNKEYED and status == 503:
            body = {"anyOf": [{"$ref": "#/components/schemas/HealthStopped"}, body]}
        responses[str(status)] = {"description": WHY[status], "content": {"application/json": {"schema": body}}}
        if status == 401:
            responses["401"]["headers"] = {"WWW-Authenticate": {"required": True, "schema": {"const": "Bearer"}}}
    op["responses"] = responses
    if keyed:
        op["security"] = [{"bearer": []}]


def _success(path: str, method: str = "get") -> dict:
    if path == "/v1/responses":
        return {**_json(RESPONSE), "text/event-stream": {"schema": RESPONSE_EVENT}}
    if path.startswith("/v1/responses/"):
        return _json(RESPONSE if method == "get" else {"type": "object", "required": ["id", "object", "deleted"]})
    if path.startswith("/sys/"):
        result = result_schema(wire.RESULTS.get(path.removeprefix("/sys/"), ...))
        return _json({"type": "object", "required": ["result"], "properties": {"result": result},
                      "additionalProperties": False})
    if path in ("/v1/completions", "/v1/chat/completions"):
        return {**_json(COMPLETION), "text/event-stream": {"schema": STREAM_EVENT}}
    return {"/sys": _json({"type": "object", "additionalProperties": {
                "type": "object", "required": ["params", "root_only", "blocking", "doc"]}}),
            "/whoami": _json({"type": "object", "required": ["name", "tid", "root", "model"], "properties": {
                "name": {"type": "string"}, "tid": {"type": ["integer", "null"]}, "root": {"type": "boolean"},
                "model": {"type": ["string", "null"]}}}),
            "/healthz": _json({"type": "object", "required": ["status", "pid"], "properties": {
                "status": {"enum": ["ok", "loading", "draining"]}, "pid": {"type": "integer"}}}),
            "/health": {"text/plain": {"schema": {"type": "string", "maxLength": 0}}},
            "/v1/load_lora_adapter": {"text/plain": {"schema": {"type": "string"}}},
            "/v1/unload_lora_adapter": {"text/plain": {"schema": {"type": "string"}}},
            "/tokenize": _json({"type": "object", "required": ["count", "max_model_len", "tokens"], "properties": {
                "count": {"type": "integer"}, "max_model_len": {"type": "integer"},
                "tokens": {"type": "array", "items": {"type": "integer"}}, "token_strs": {"type": "null"}}}),
            "/detokenize": _json({"type": "object", "required": ["prompt"], "properties": {
                "prompt": {"type": "string"}}}),
            "/tokenizer_info": _json({"type": "object", "required": [
                "tokenizer_class", "model", "model_max_length", "bos_token", "eos_token", "pad_token", "unk_token",
                "chat_template"], "properties": {
                "tokenizer_class": {"type": "string"}, "model": {"type": "string"},
                "model_max_length": {"type": "integer"}, "chat_template": {"type": ["string", "null"]},
                **{role: {"type": ["string", "null"]} for role in ("bos_token", "eos_token", "pad_token",
                                                                   "unk_token")}}}),
            "/metrics": {"text/plain": {"schema": {"type": "string"}}},
            "/v1/models": _json({"type": "object", "required": ["object", "data"], "properties": {
                "object": {"const": "list"}, "data": {"type": "array", "items": {
                    "type": "object", "required": ["id", "object", "created", "owned_by", "max_model_len"]}}}}),
            }.get(path, _json({}))


COMPLETION = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
    "id": {"type": "string"}, "object": {"enum": ["text_completion", "chat.completion"]},
    "created": {"type": "integer"}, "model": {"type": "string"},
    "choices": {"type": "array", "items": {"type": "object", "required": ["index", "finish_reason"], "properties": {
        "index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": {"type": "string"},
        "message": {"type": "object", "required": ["role", "content"]}}}},
    "usage": {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"]}}}


# One server-sent event of a streamed completion: a chunk, an error (a process that failed
# mid-stream), or the closing "[DONE]".
CHUNK = {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
    "id": {"type": "string"}, "object": {"enum": ["text_completion", "chat.completion.chunk"]},
    "choices": {"type": "array", "items": {"type": "object", "required": ["index", "finish_reason"]}},
    "usage": {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"]}}}
STREAM_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
    {"const": "[DONE]"},
    {"type": "string", "contentMediaType": "application/json",
     "contentSchema": {"anyOf": [CHUNK, {"$ref": "#/components/schemas/OpenAIError"}]}}]}}}


# A Responses API response, and one event of a streamed one.
RESPONSE = {"type": "object", "required": ["id", "object", "created_at", "status", "model", "output", "usage"],
            "properties": {"id": {"type": "string"}, "object": {"const": "response"},
                           "status": {"enum": ["completed", "incomplete", "in_progress", "cancelled"]},
                           "output": {"type": "array", "items": {"type": "object", "required": ["type", "content"]}}}}
RESPONSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "contentMediaType": "application/json",
    "contentSchema": {"type": "object", "required": ["type", "sequence_number"]}}}}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def result_schema(kind, within=()) -> dict:
    """The JSON schema of a result as wire.to_jsonable sends it: dataclasses as objects with every
    field, floats nullable (a non-finite float is sent as null). A dataclass nested in itself (a
    cluster's MemInfo holds each replica's MemInfo) is described once: inside, it is an object."""
    if kind is ...:
        return {}
    if kind is None:
        return {"type": "null"}
    if isinstance(kind, list):
        return {"type": "array", "items": result_schema(kind[0], within)}
    if isinstance(kind, dict):
        (value_kind,) = kind.values()
        return {"type": "object", "additionalProperties": result_schema(value_kind, within)}
    if dataclasses.is_dataclass(kind):
        if kind in within:
            return {"type": "object", "description": f"a {kind.__name__}, as above"}
        hints = typing.get_type_hints(kind)
        nested = wire.NESTED.get(kind, {})
        props = {f.name: _nullable(result_schema(nested[f.name], (*within, kind)), hints[f.name])
                 if f.name in nested else _field_schema(hints[f.name]) for f in dataclasses.fields(kind)}
        return {"type": "object", "required": list(props), "properties": props}
    return _field_schema(kind)


def _nullable(schema: dict, hint) -> dict:
    """A nested field's schema, null allowed where its hint says `| None` (a cluster's `replicas`)."""
    if isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint) and "type" in schema:
        return {**schema, "type": [schema["type"], "null"]}
    return schema


def _field_schema(hint) -> dict:
    nullable = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else None
    kinds = {int: ["integer"], float: ["number", "null"], str: ["string"], bool: ["boolean"], list: ["array"],
             dict: ["object"]}.get(hint)
    if kinds is None:
        return {}
    return {"type": kinds + ["null"] if nullable and "null" not in kinds else kinds}
