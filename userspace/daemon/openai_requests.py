"""OpenAI request bodies: their models (also the OpenAPI schema), validation, and the syscall
arguments they become.

parse() refuses, with EINVAL naming the field, a bad value (types are strict: no bool for a
number, no string for a bool), an unknown field, and a known field kvosd does not implement
unless it is set to its "off" value; it ignores pure hints (user, store).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kernel.errors import EINVAL, KvosError

UNSUPPORTED = "is not supported by kvosd (docs/daemon.md lists what is)"
# Fields a client may send that change nothing here (identifiers, storage and routing hints).
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                     "parallel_tool_calls", "prompt_cache_retention", "prompt_cache_options"})
# Fields accepted only at a value meaning "off".
OFF_VALUES = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},),
              "logprobs": (False, 0), "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none", "auto"),
              "response_format": ({"type": "text"},), "functions": ([],), "function_call": ("none", "auto"),
              "modalities": (["text"],), "suffix": ("",)}


# Strict types: a bool is not a number ("max_tokens": true) and a string is not a bool ("stream": "yes");
# an int is still a float (temperature: 1), as in JSON. Pydantic's default would coerce both.
STRICT = ConfigDict(strict=True, extra="allow")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class Sampling(BaseModel):
    """What both endpoints take. top_k, ignore_eos, stop_token_ids, priority and return_token_ids
    are extensions (as in vLLM)."""
    model_config = STRICT
    model: str
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    priority: int | None = None
    return_token_ids: bool = False          # as vLLM: each choice also carries its token ids


class ChatMessage(BaseModel):
    model_config = STRICT
    role: str
    content: str | list[dict] | None = None
    name: str | None = None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str | list[int]]
    echo: bool = False
    best_of: int | None = None


def parse(model_cls, body: dict):
    """Validate a body; EINVAL naming the first bad field, or a field kvosd does not support."""
    try:
        req = model_cls.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        # pydantic names the union member it tried ("str", "list[int]") in the location: not a field
        where = ".".join(str(x) for x in first["loc"] if not _is_type_tag(x)) or "body"
        raise KvosError(EINVAL, f"{where}: {first['msg']}") from None
    for key, value in (req.model_extra or {}).items():
        if key in IGNORED or value is None or _is_off(value, OFF_VALUES.get(key, ())):
            continue
        raise KvosError(EINVAL, f"{key} {UNSUPPORTED}" if key in OFF_VALUES else f"unknown field {key!r}")
    if model_cls is CompletionRequest and req.best_of not in (None, req.n):
        raise KvosError(EINVAL, f"best_of other than n {UNSUPPORTED}")
    return req


def _is_off(value, offs) -> bool:
    """Whether value is one of the "off" values, type included (strict: false is not 0)."""
    return any(type(value) is type(off) and value == off for off in offs)


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list") or "[" in part)


def sampling_params(req) -> dict:
    params = {}
    for key in ("temperature", "top_p", "seed", "top_k", "ignore_eos", "stop_token_ids"):
        if getattr(req, key) is not None:
            params[key] = getattr(req, key)
    if req.stop is not None:
        params["stop"] = req.stop
    limit = getattr(req, "max_completion_tokens", None)
    limit = req.max_tokens if limit is None else limit
    if limit is not None:
        params["max_tokens"] = limit
    if req.priority is not None:
        params["priority"] = req.priority
    return params


def chat_messages(req: ChatRequest) -> list:
    out = []
    for i, m in enumerate(req.messages):
        for key in ("tool_calls", "function_call", "audio"):
            if (m.model_extra or {}).get(key):
                raise KvosError(EINVAL, f"messages.{i}.{key} {UNSUPPORTED}")
        content = m.content
        if isinstance(content, list):
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                raise KvosError(EINVAL, f"messages.{i}.content: only text parts are supported")
            content = "".join(part["text"] for part in content)
        message = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out


def completion_prompts(req: CompletionRequest) -> list:
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise KvosError(EINVAL, "prompt is empty")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    if len(prompt) > 128:
        raise KvosError(EINVAL, f"at most 128 prompts per request, got {len(prompt)}")
    return list(prompt)
