"""The Responses API's request: its fields, the chat messages of its input, its spawn parameters,
and the Response object it is answered with (openai_responses.py runs the turn)."""
from __future__ import annotations

import time

from pydantic import BaseModel

from kernel.errors import EINVAL, KvosError
from userspace.daemon.openai_requests import STRICT, json_schema, text_of_parts
from userspace.daemon.openai_response_tools import add_input_item

IGNORED = frozenset({"user", "metadata", "safety_identifier", "prompt_cache_key", "service_tier",
                     "parallel_tool_calls", "prompt_cache_retention"})
OFF_VALUES = {"reasoning": (), "conversation": (), "prompt": (),
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
    background: bool = False                 # answer at once; the turn runs on, GET reads it, cancel kills it



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


def input_items(req: ResponsesRequest, rid: str) -> list:
    """The request's input as the Response items GET .../input_items lists (after messages_of checked
    it): a message keeps its parts (a string is one input_text part, output_text for the assistant),
    function calls and their outputs stay as given; an item without an id gets one from the response's."""
    base = rid.removeprefix("resp_")
    given = [{"type": "message", "role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    items = []
    for i, item in enumerate(given):
        kind = item.get("type", "message")
        if kind != "message":
            items.append({"id": f"{'fc' if kind == 'function_call' else 'fco'}_{base}_in{i}", **item})
            continue
        content = item["content"]
        part = "output_text" if item["role"] == "assistant" else "input_text"
        parts = [{"type": part, "text": content}] if isinstance(content, str) else [dict(p) for p in content]
        items.append({"id": item.get("id") or f"msg_{base}_in{i}", "type": "message", "role": item["role"],
                      "status": "completed", "content": parts})
    return items


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



def response_object(rid: str, req: ResponsesRequest, status: str, usage, reason, output: list) -> dict:
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
            "truncation": req.truncation, "background": req.background, "usage": usage, "metadata": {}}
