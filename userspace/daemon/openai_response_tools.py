"""Function tools in the Responses API, on the chat completions' machinery (openai_tools.py).

The Responses API spells a tool flat ({"type": "function", "name", "parameters"}), names a forced
function as {"type": "function", "name"}, returns each call as an output item of its own
({"type": "function_call", "call_id", "name", "arguments"}) and takes results back as input items
({"type": "function_call_output", "call_id", "output"}). Here each is turned into the chat shape
the template and the parser already know, and back: the tools into chat tools, a history's calls
into an assistant message's tool_calls, a result into a "tool" message, a reply's parsed calls
into output items.
"""
from __future__ import annotations

from kernel.errors import EINVAL, KvosError
from userspace.daemon import openai_tools

TOOL_KEYS = frozenset({"type", "name", "description", "parameters", "strict"})


def chat_shape(tools, tool_choice) -> tuple:
    """(chat completions' tools or None, its tool_choice) for a request's tools and tool_choice."""
    if tools is None:
        return None, tool_choice
    chat_tools = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise KvosError(EINVAL, f"tools.{i}.type {kind!r} is not supported by kvosd (function tools only)")
        extra = sorted(set(tool) - TOOL_KEYS)
        if extra:
            raise KvosError(EINVAL, f"tools.{i}: unknown field {extra[0]!r}")
        if tool.get("strict") not in (None, True, False):
            raise KvosError(EINVAL, f"tools.{i}.strict must be true or false")
        name = tool.get("name")
        if not isinstance(name, str) or not openai_tools.NAME.match(name):
            raise KvosError(EINVAL, f"tools.{i}.name must be 1-64 of a-z, A-Z, 0-9, _ and -")
        if not isinstance(tool.get("parameters", {}), dict):
            raise KvosError(EINVAL, f"tools.{i}.parameters must be a JSON Schema object")
        function = {"name": name}
        for key in ("description", "parameters"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        chat_tools.append({"type": "function", "function": function})
    if isinstance(tool_choice, dict):
        if set(tool_choice) != {"type", "name"} or tool_choice["type"] != "function":
            raise KvosError(EINVAL, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                                    f"'name': ...}}, got {tool_choice!r}")
        tool_choice = {"type": "function", "function": {"name": tool_choice["name"]}}
    return chat_tools, tool_choice


def add_input_item(messages: list, item: dict, index: int) -> None:
    """Append a function_call or function_call_output input item to the chat messages: calls join
    the assistant message just before them (the reply they were part of), or open one; an output
    becomes a "tool" message answering its call_id."""
    kind = item["type"]
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise KvosError(EINVAL, f"input.{index}.call_id must be a non-empty string")
    if kind == "function_call_output":
        output = item.get("output")
        if not isinstance(output, str):
            raise KvosError(EINVAL, f"input.{index}.output must be a string")
        messages.append({"role": "tool", "content": output, "tool_call_id": call_id})
        return
    name, arguments = item.get("name"), item.get("arguments")
    if not isinstance(name, str) or not isinstance(arguments, str):
        raise KvosError(EINVAL, f"input.{index}: a function_call needs a name and its arguments as a JSON string")
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    if not messages or messages[-1]["role"] != "assistant":
        messages.append({"role": "assistant", "content": ""})
    parsed = openai_tools.history({"tool_calls": [call]}, index)["tool_calls"]    # arguments as objects
    messages[-1].setdefault("tool_calls", []).extend(parsed)


def output_items(rid: str, content: str | None, calls: list, message_status: str) -> list:
    """A reply's output items: its text as a message (when it has any), then one item per call."""
    items = []
    if content is not None:
        items.append(message_item(rid, content, message_status))
    for k, call in enumerate(calls):
        items.append({"type": "function_call", "id": f"fc_{rid.removeprefix('resp_')}_{k}", "call_id": call["id"],
                      "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                      "status": "completed"})
    return items


def message_item(rid: str, text: str, status: str, logprobs: list | None = None) -> dict:
    return {"type": "message", "id": f"msg_{rid.removeprefix('resp_')}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]}
