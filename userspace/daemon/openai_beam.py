"""vLLM's `use_beam_search` over the OpenAI API: userspace/libc/beam.py's search, in the request's thread.

Each prompt's n best beams become its n choices, best first. The search is process management: every
beam is a process, a beam chosen twice is forked (its pages shared copy-on-write), a beam not chosen
is killed; scores are the model's own log-probabilities, normalized by length ** length_penalty at
the end. What a beam search cannot honour is a 400 naming the field: sampling (top_p, seed,
penalties, a temperature other than 0 or 1), constraints, stop strings, logprobs, tools and stream.
"""
from __future__ import annotations

from kernel.errors import EINVAL, KvosError
from kernel.results import ExitStatus
from userspace.libc.beam import beam_search

DEFAULT_MAX_TOKENS = 256      # the kernel's default max_tokens
MAX_WIDTH = 20                # a beam's candidates are its top logprobs, at most the kernel's 20
# Fields a beam search takes besides the prompt: the rest must stay at their defaults.
TAKES = frozenset({"model", "messages", "prompt", "n", "max_tokens", "max_completion_tokens", "ignore_eos",
                   "stop_token_ids", "length_penalty", "use_beam_search", "return_token_ids", "best_of",
                   "temperature", "stream", "stream_options"})


def check(req) -> None:
    """EINVAL naming the first field a beam search cannot honour."""
    if req.stream:
        raise KvosError(EINVAL, "stream with use_beam_search is not supported: the beams are ranked at the end")
    if req.n > MAX_WIDTH:
        raise KvosError(EINVAL, f"n with use_beam_search is at most {MAX_WIDTH} (each beam's candidates are its "
                                f"{MAX_WIDTH} most likely tokens at most), got {req.n}")
    if req.temperature not in (None, 0, 1):
        raise KvosError(EINVAL, "temperature with use_beam_search must be 0 or 1 (beams are scored by the "
                                "model's own log-probabilities)")
    if not isinstance(req.length_penalty, (int, float)) or isinstance(req.length_penalty, bool):
        raise KvosError(EINVAL, "length_penalty must be a number")
    for name, info in type(req).model_fields.items():
        if name not in TAKES and getattr(req, name) != info.get_default(call_default_factory=True):
            raise KvosError(EINVAL, f"{name} with use_beam_search is not supported")


def search(handle, tid, prompts: list, req, eos_token_ids, on_round=None) -> list:
    """Each prompt's beams, best first. -> [[Beam]] (a prompt's n, or fewer if fewer survived)"""
    limit = getattr(req, "max_completion_tokens", None)
    limit = req.max_tokens if limit is None else limit
    limit = DEFAULT_MAX_TOKENS if limit is None else limit
    if limit < 1:
        raise KvosError(EINVAL, f"max_tokens with use_beam_search must be at least 1, got {limit}")
    eos = () if req.ignore_eos else tuple(eos_token_ids) + tuple(req.stop_token_ids or ())
    return [beam_search(handle, tid, prompt, width=req.n, max_tokens=limit, eos_token_ids=eos,
                        length_penalty=float(req.length_penalty), on_round=on_round) for prompt in prompts]


def statuses(handle, tid, prompts: list, results: list, elapsed: float) -> tuple:
    """Per choice, an ExitStatus as a process's would read (text without the EOS that ended it), and
    which prompt it answers. -> (statuses, prompt_of)"""
    out, prompt_of = [], []
    for i, (prompt, beams) in enumerate(zip(prompts, results)):
        prompt_tokens = len(handle.tokenize(tid, prompt))
        for b in beams:
            text = handle.detokenize(tid, b.tokens[:-1] if b.finished else b.tokens)
            out.append(ExitStatus(pid=b.pid, reason="stop" if b.finished else "length", tokens=list(b.tokens),
                                  text=text, prompt_tokens=prompt_tokens, elapsed=elapsed))
            prompt_of.append(i)
    return out, prompt_of
