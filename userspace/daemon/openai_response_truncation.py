"""The Responses API's `truncation: "auto"`: a conversation longer than the tenant's prompt limit drops
items from its beginning until the rest fits, instead of failing with E2BIG.

What is dropped: whole messages after the leading system ones (the request's instructions), oldest
first, so that the conversation still starts at a user message; the last item is never dropped (if it
does not fit alone, the request fails as without truncation). What fits is measured, not guessed: the
tokenize syscall renders each candidate in the tenant's chat template with the turn's tools, in the
request's thread (tokenizing is the caller's work), and the fewest dropped items that fit is found by
bisection over the user messages where the rest may start (fewer items never take more tokens).

A continuation (previous_response_id) is written into a fork of the stored process; when the write is
refused for length (E2BIG, or ENOMEM past the context), the conversation is rebuilt from the messages
kvosd stored with the response (its input items and its reply, reply_messages) plus the new input,
fitted, and spawned as a new process: its tokens are computed again (cached_tokens 0).
"""
from __future__ import annotations

from kernel.errors import E2BIG, EINVAL, KvosError
from userspace.daemon.openai_response_tools import add_input_item

MODES = ("disabled", "auto")


def check(mode: str) -> None:
    if mode not in MODES:
        raise KvosError(EINVAL, f"truncation must be 'disabled' or 'auto', got {mode!r}")


def fit(handle, tid: int, messages: list, tools) -> list:
    """messages, or its latest part that fits the tenant's prompt limit (the module's header)."""
    limit = handle.tenantinfo(tid).max_prompt_tokens

    def fits(candidate):
        return len(handle.tokenize(tid, candidate, tools=tools)) <= limit

    if fits(messages):
        return messages
    head = 0
    while head < len(messages) - 1 and messages[head]["role"] == "system":
        head += 1
    # where the rest may start: a user message after the head, or the last item alone
    starts = [i for i in range(head + 1, len(messages)) if messages[i]["role"] == "user"]
    if not starts or starts[-1] != len(messages) - 1:
        starts.append(len(messages) - 1)
    lo, hi = 0, len(starts) - 1          # bisect for the first start whose rest fits
    if not fits(messages[:head] + messages[starts[hi]:]):
        raise KvosError(E2BIG, f"truncation 'auto': the input's last item does not fit the tenant's prompt "
                               f"limit of {limit} tokens even alone")
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(messages[:head] + messages[starts[mid]:]):
            hi = mid
        else:
            lo = mid + 1
    return messages[:head] + messages[starts[lo]:]


def reply_messages(output: list) -> list:
    """A finished response's output items as chat messages (its text as the assistant's message,
    its function calls as that message's tool_calls): what a rebuilt conversation holds of it."""
    out: list = []
    for i, item in enumerate(output):
        if item.get("type") == "message":
            text = "".join(part.get("text", "") for part in item.get("content", []))
            out.append({"role": "assistant", "content": text})
        elif item.get("type") == "function_call":
            add_input_item(out, item, i)
    return out
