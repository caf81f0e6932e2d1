"""Log-probabilities in OpenAI's two response shapes, from the kernel's TokenLogprob entries.

Chat: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal"}.
Completions (the legacy shape): parallel lists tokens, token_logprobs, top_logprobs (a dict per
token: the most likely tokens and, as vLLM does, the chosen one) and text_offset (each token's
character offset in the choice's text). A token's text is its own bytes decoded alone; in the
completions shape a token that is not whole UTF-8 (half a character) is spelled "bytes:\\xNN..",
as OpenAI does, so that its top_logprobs keys stay distinct.
vLLM's prompt_logprobs (either endpoint): a dict per prompt token keyed by token id.
"""
from __future__ import annotations

import math

FLOOR = -9999.0              # what OpenAI reports for a probability that underflows to zero


def _value(logprob: float | None) -> float | None:
    return logprob if logprob is None or math.isfinite(logprob) else FLOOR


def chat(entries: list) -> dict:
    return {"content": [{"token": e.text, "logprob": _value(e.logprob), "bytes": e.bytes,
                         "top_logprobs": [{"token": t.text, "logprob": _value(t.logprob), "bytes": t.bytes}
                                          for t in e.top]} for e in entries],
            "refusal": None}


def _spelled(e) -> str:
    try:
        return bytes(e.bytes).decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in e.bytes)


def completion(entries: list, offset: int = 0, num_prompt: int = 0, generated_at: int | None = None) -> dict:
    """offset: where the first entry's text begins in the choice's text (the chunks streamed before).
    With echo, the first num_prompt entries are the prompt's (the first has no logprob: null, as
    OpenAI's) and the generated ones begin at generated_at (after the echoed prompt's text)."""
    offsets = []
    for j, e in enumerate(entries):
        if j == num_prompt and generated_at is not None:
            offset = generated_at
        offsets.append(offset)
        offset += len(e.text)
    return {"tokens": [_spelled(e) for e in entries], "token_logprobs": [_value(e.logprob) for e in entries],
            "top_logprobs": [None if e.logprob is None and not e.top else
                             {**{_spelled(t): _value(t.logprob) for t in e.top}, _spelled(e): _value(e.logprob)}
                             for e in entries],
            "text_offset": offsets}


def prompt(entries: list, k: int) -> list:
    """vLLM's prompt_logprobs: per prompt token None (the first: nothing comes before it) or
    {token id: {logprob, rank, decoded_token}} holding the token itself and the k most likely there
    (ranked 1 to k; the prompt's token keeps its own rank when it is one of them)."""
    out = []
    for e in entries:
        if e.logprob is None:
            out.append(None)
            continue
        position = {str(e.token): {"logprob": _value(e.logprob), "rank": e.rank, "decoded_token": e.text}}
        for rank, t in enumerate(e.top[:k], start=1):
            position.setdefault(str(t.token), {"logprob": _value(t.logprob), "rank": rank, "decoded_token": t.text})
        out.append(position)
    return out
