"""OpenAI request bodies: their models (also the OpenAPI schema), validation, and the syscall
arguments they become.

parse() refuses, with EINVAL naming the field, a bad value (types are strict: no bool for a
number, no string for a bool), an unknown field, and a known field kvosd does not implement
unless it is set to its "off" value; it ignores pure hints (user, store). Ranges (penalties,
min_p, logprobs) are the kernel's to check: its reasons name the field.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kernel.errors import EINVAL, KvosError
from userspace.daemon import openai_tools
from userspace.libc import structured

UNSUPPORTED = "is not supported by kvosd (docs/daemon.md lists what is)"
# Fields a client may send that change nothing here (identifiers, storage and routing hints).
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                     "parallel_tool_calls", "prompt_cache_retention", "prompt_cache_options"})
# Fields accepted only at a value meaning "off".
OFF_VALUES = {"functions": ([],), "function_call": ("none", "auto"), "modalities": (["text"],),
              "suffix": ("",), "audio": (), "web_search_options": (), "reasoning_effort": (),
              "verbosity": (),
              # vLLM's extensions that some clients send at vLLM's defaults, which are what kvosd does
              "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,),
              # chat's own fields (ChatRequest), which some clients also send to completions
              "add_generation_prompt": (True,), "continue_final_message": (False,)}
MAX_LOGPROBS = 20             # top_logprobs (chat) and logprobs (completions): as the kernel (OpenAI: 20 and 5)


# Strict types: a bool is not a number ("max_tokens": true) and a string is not a bool ("stream": "yes");
# an int is still a float (temperature: 1), as in JSON. Pydantic's default would coerce both.
STRICT = ConfigDict(strict=True, extra="allow")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class Sampling(BaseModel):
    """What both endpoints take. top_k, min_p, repetition_penalty, ignore_eos, min_tokens,
    stop_token_ids, priority, return_token_ids, structured_outputs, include_stop_str_in_output,
    allowed_token_ids, bad_words, use_beam_search, length_penalty, prompt_logprobs and truncate_prompt_tokens
    are extensions (as in vLLM), and so is response_format in completions."""
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
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None     # token id (as a string) -> bias in [-100, 100]
    response_format: dict | None = None     # {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}
    structured_outputs: dict | None = None  # as vLLM: one of json, regex, choice, grammar, json_object
    include_stop_str_in_output: bool | None = None   # as vLLM: the stop string stays in the text
    allowed_token_ids: list[int] | None = None        # as vLLM: the only tokens a choice may draw
    bad_words: list[str] | None = None                # as vLLM: words a choice never writes (libc/bad_words.py)
    use_beam_search: bool = False           # as vLLM: the n best beams (userspace/daemon/openai_beam.py)
    length_penalty: float = 1.0             # beams ranked by log-probability / length ** length_penalty
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    priority: int | None = None
    return_token_ids: bool = False          # as vLLM: each choice also carries its token ids
    prediction: dict | None = None          # OpenAI's predicted output: {"type": "content", "content": ...}
    prompt_logprobs: int | None = None      # as vLLM: each prompt token's logprob, rank and the k most likely
    truncate_prompt_tokens: int | None = None   # as vLLM: only the prompt's last k tokens (-1: the model's context)


class ChatMessage(BaseModel):
    model_config = STRICT
    role: str
    content: str | list[dict] | None = None
    name: str | None = None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    add_generation_prompt: bool = True      # as vLLM: the template opens the assistant's turn
    continue_final_message: bool = False    # as vLLM: the last message is left open, the model continues it
    echo: bool = False                      # as vLLM: the reply starts with the assistant message it continues

    def template_options(self) -> dict:
        """The tokenize syscall's chat options where they are not its defaults (then kvosd tokenizes)."""
        if self.add_generation_prompt and not self.continue_final_message:
            return {}
        return {"add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message}


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str | list[int]]
    echo: bool = False
    best_of: int | None = None
    logprobs: int | None = None             # the chosen token's and this many most likely


def parse(model_cls, body: dict, ignored=IGNORED, off_values=None):
    """Validate a body; EINVAL naming the first bad field, or a field kvosd does not support (ignored:
    fields that change nothing; off_values: fields accepted at an "off" value, OFF_VALUES by default)."""
    off_values = OFF_VALUES if off_values is None else off_values
    try:
        req = model_cls.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        # pydantic names the union member it tried ("str", "list[int]") in the location: not a field
        where = ".".join(str(x) for x in first["loc"] if not _is_type_tag(x)) or "body"
        raise KvosError(EINVAL, f"{where}: {first['msg']}") from None
    for key, value in (req.model_extra or {}).items():
        if key in ignored or value is None or _is_off(value, off_values.get(key, ())):
            continue
        raise KvosError(EINVAL, f"{key} {UNSUPPORTED}" if key in off_values else f"unknown field {key!r}")
    if getattr(req, "length_penalty", 1.0) != 1.0 and not req.use_beam_search:
        raise KvosError(EINVAL, "length_penalty with use_beam_search only (it ranks beams)")
    if getattr(req, "prompt_logprobs", None) is not None and req.stream:
        raise KvosError(EINVAL, "prompt_logprobs with stream is not supported (as vLLM: they come whole, "
                                "in the response)")
    keep = getattr(req, "truncate_prompt_tokens", None)
    if keep is not None and keep < 1 and keep != -1:
        raise KvosError(EINVAL, f"truncate_prompt_tokens must be at least 1, or -1 for the model's context, got {keep}")
    if model_cls is CompletionRequest and req.best_of not in (None, req.n):
        raise KvosError(EINVAL, f"best_of other than n {UNSUPPORTED}")
    if model_cls is ChatRequest:
        openai_tools.check(req.tools, req.tool_choice)
        if req.continue_final_message and req.add_generation_prompt:
            raise KvosError(EINVAL, "continue_final_message needs add_generation_prompt: false (as vLLM): "
                                    "the final message is either continued or followed by the model's turn")
        if req.top_logprobs is not None and not req.logprobs:
            raise KvosError(EINVAL, "top_logprobs needs logprobs: true")
    return req


def _is_off(value, offs) -> bool:
    """Whether value is one of the "off" values, type included (strict: false is not 0)."""
    return any(type(value) is type(off) and value == off for off in offs)


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list") or "[" in part)


def sampling_params(req) -> dict:
    params = {}
    for key in ("temperature", "top_p", "seed", "top_k", "min_p", "ignore_eos", "stop_token_ids", "frequency_penalty",
                "presence_penalty", "repetition_penalty", "logit_bias", "min_tokens", "include_stop_str_in_output",
                "allowed_token_ids", "prompt_logprobs"):
        if getattr(req, key) is not None:
            params[key] = getattr(req, key)
    logprobs = _logprobs(req)
    if logprobs is not None:
        params["logprobs"] = logprobs
    schema = json_schema(req.response_format)
    if schema is not None:
        params["json_schema"] = schema
    constraint = structured.spawn_keys(req.structured_outputs)
    if constraint and schema is not None:
        raise KvosError(EINVAL, "response_format and structured_outputs are exclusive: give one")
    params.update(constraint)
    if req.stop is not None:
        params["stop"] = req.stop
    limit = getattr(req, "max_completion_tokens", None)
    limit = req.max_tokens if limit is None else limit
    if limit is not None:
        params["max_tokens"] = limit
    if req.priority is not None:
        params["priority"] = req.priority
    if req.prediction is not None:
        params["prediction"] = prediction_text(req.prediction)
    return params


def prediction_text(prediction: dict) -> str:
    """The text of a predicted output: {"type": "content", "content": text or [text parts]}."""
    if prediction.get("type") != "content" or set(prediction) != {"type", "content"}:
        raise KvosError(EINVAL, "prediction must be {'type': 'content', 'content': text or a list of text parts}")
    content = prediction["content"]
    if isinstance(content, list):
        content = text_of_parts(content, "prediction.content")
    if not isinstance(content, str) or not content:
        raise KvosError(EINVAL, "prediction.content must be non-empty text or a list of text parts")
    return content


def _logprobs(req) -> int | None:
    """The kernel's logprobs: None (none), or how many most likely tokens beside the chosen one."""
    if isinstance(req, ChatRequest):
        if not req.logprobs:
            return None
        count = 0 if req.top_logprobs is None else req.top_logprobs
        name = "top_logprobs"
    else:
        count, name = req.logprobs, "logprobs"
        if count is None:
            return None
    if not 0 <= count <= MAX_LOGPROBS:
        raise KvosError(EINVAL, f"{name} must be in [0, {MAX_LOGPROBS}], got {count}")
    return count


def json_schema(response_format: dict | None) -> dict | None:
    """The kernel's json_schema for a response_format: none for text, any object for json_object."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    extra = sorted(set(response_format) - {"type", "json_schema"})
    if extra:
        raise KvosError(EINVAL, f"response_format: unknown field {extra[0]!r}")
    if kind == "text" or kind == "json_object":
        if "json_schema" in response_format:
            raise KvosError(EINVAL, f"response_format: json_schema goes with type 'json_schema', not {kind!r}")
        return None if kind == "text" else {"type": "object"}
    if kind != "json_schema":
        raise KvosError(EINVAL, f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise KvosError(EINVAL, "response_format.json_schema must be an object with a name and a schema")
    extra = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if extra:
        raise KvosError(EINVAL, f"response_format.json_schema: unknown field {extra[0]!r}")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise KvosError(EINVAL, "response_format.json_schema.name must be a non-empty string")
    if spec.get("strict") not in (None, True, False):
        raise KvosError(EINVAL, "response_format.json_schema.strict must be true or false")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise KvosError(EINVAL, "response_format.json_schema.schema must be a JSON Schema object")
    return schema            # strict or not, the grammar enforces it: every output is valid


def chat_messages(req: ChatRequest) -> list:
    out = []
    for i, m in enumerate(req.messages):
        extra = m.model_extra or {}
        for key in ("function_call", "audio"):
            if extra.get(key):
                raise KvosError(EINVAL, f"messages.{i}.{key} {UNSUPPORTED}")
        content = m.content
        if isinstance(content, list):
            content = text_of_parts(content, f"messages.{i}.content")
        message = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.name is not None:
            message["name"] = m.name
        message.update(openai_tools.history(extra, i))
        out.append(message)
    return out


def text_of_parts(parts: list, where: str, kinds=("text",)) -> str:
    """The text of a content given as parts ({"type": one of kinds, "text": ...}); EINVAL naming
    `where` if any part is something else (an image, audio)."""
    if not all(isinstance(p, dict) and p.get("type") in kinds and isinstance(p.get("text"), str) for p in parts):
        raise KvosError(EINVAL, f"{where}: only text parts ({', '.join(kinds)}) are supported")
    return "".join(p["text"] for p in parts)


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
