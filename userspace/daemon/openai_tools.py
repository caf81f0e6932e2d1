"""Tool calls for /v1/chat/completions, in the one format kvosd parses: Hermes's, where the chat
template lists the tools and the model answers <tool_call>{"name": ..., "arguments": {...}}</tool_call>
(Qwen2 and 2.5, Hermes, SmolLM3 templates). tool_choice "auto" lets the model choose and parses
what it wrote; "required" and a named function force one call with a grammar (the kernel's
`grammar` key: the call's JSON is constrained by the tool's parameters schema).
"""
from __future__ import annotations

import json
import re
import secrets

from kernel.errors import EINVAL, KvosError

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
# The call's JSON as the grammar writes it (the kernel's json_schema uses the same spacing).
X_GUIDANCE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def check(tools, tool_choice) -> str | None:
    """The request's tool mode: None (no call may be made), "auto", "required", or the name of the
    function that must be called. EINVAL for malformed tools or a choice that names none of them."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise KvosError(EINVAL, "tool_choice needs tools")
        return None
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, dict):
            raise KvosError(EINVAL, f"tools.{i}: only {{'type': 'function', 'function': {{...}}}} tools are supported")
        if not isinstance(function.get("name"), str) or not NAME.match(function["name"]):
            raise KvosError(EINVAL, f"tools.{i}.function.name must be 1-64 of a-z, A-Z, 0-9, _ and -")
        if not isinstance(function.get("parameters", {}), dict):
            raise KvosError(EINVAL, f"tools.{i}.function.parameters must be a JSON Schema object")
        names.append(function["name"])
    if len(set(names)) != len(names):
        raise KvosError(EINVAL, "tools: two functions have the same name")
    if tool_choice in (None, "auto"):
        return "auto"
    if tool_choice in ("none", "required"):
        return None if tool_choice == "none" else "required"
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in names:
            raise KvosError(EINVAL, f"tool_choice names function {name!r}, which is not among the tools")
        return name
    raise KvosError(EINVAL, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                            f"'function': {{'name': ...}}}}, got {tool_choice!r}")


def spawn_keys(info, tools: list, tool_choice, params: dict) -> dict:
    """The spawn keys of a chat whose reply may call tools: the tools for the template and, when a call
    is forced, its grammar. info: the tenant's TenantInfo. EINVAL when its template cannot take part,
    or a forced call meets another constraint in params."""
    if info.chat_tools != "hermes":
        why = ("takes no tools (it never reads 'tools')" if info.chat_tools is None else
               "calls tools in a format of its own, which kvosd does not parse (it parses <tool_call> JSON)")
        raise KvosError(EINVAL, f"tool_choice {tool_choice or 'auto'!r}: the chat template of {info.model} {why}; "
                                "tool_choice 'none' is accepted")
    mode = check(tools, tool_choice)
    out = {"tools": tools}
    if mode != "auto":
        if "json_schema" in params or "grammar" in params:
            raise KvosError(EINVAL, "response_format or structured_outputs and a forced tool call (tool_choice "
                                    "'required' or a function) are exclusive")
        out["grammar"] = forced_call_grammar(tools, None if mode == "required" else mode)
    return out


def forced_call_grammar(tools: list, name: str | None) -> str:
    """A Lark grammar (llguidance's) for exactly one call: of `name`, or of any of the tools."""
    calls = [_call_schema(t["function"]) for t in tools if name is None or t["function"]["name"] == name]
    schema = {"anyOf": calls, "x-guidance": X_GUIDANCE}
    return 'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json ' + json.dumps(schema)


def _call_schema(function: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": function["name"]},
                                             "arguments": function.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def parse_calls(text: str, tools: list) -> tuple[str | None, list]:
    """(the content left, the tool calls in OpenAI's shape) of a reply: every <tool_call> block
    whose JSON names one of the tools with object arguments; anything else stays content."""
    names = {t["function"]["name"] for t in tools}
    calls, kept, at = [], [], 0
    for match in CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except ValueError:
            continue
        if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments"), dict):
            continue
        kept.append(text[at:match.start()])
        at = match.end()
        calls.append({"id": f"call_{secrets.token_hex(12)}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}})
    kept.append(text[at:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


def history(message: dict, index: int) -> dict:
    """A message of the request as the template reads it: an assistant's tool_calls with their
    arguments as objects (templates spell them with tojson), a tool result's tool_call_id."""
    out = {}
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise KvosError(EINVAL, f"messages.{index}.tool_calls must be a list")
        out["tool_calls"] = []
        for k, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise KvosError(EINVAL, f"messages.{index}.tool_calls.{k} needs a function with a name")
            arguments = function.get("arguments", "{}")
            try:
                arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            except ValueError:
                raise KvosError(EINVAL, f"messages.{index}.tool_calls.{k}.function.arguments is not JSON") from None
            out["tool_calls"].append({"id": call.get("id"), "type": "function",
                                      "function": {"name": function["name"], "arguments": arguments}})
    if message.get("tool_call_id") is not None:
        if not isinstance(message["tool_call_id"], str):
            raise KvosError(EINVAL, f"messages.{index}.tool_call_id must be a string")
        out["tool_call_id"] = message["tool_call_id"]
    return out
