"""Scoring text instead of generating it: each token's log-probability under the model, and the
log-likelihood of a continuation given a context (what evaluation harnesses ask a model for).

Built on spawn's prompt_logprobs: the process computes its whole prompt itself, each row scoring
the next token, and its first read returns the entries. It draws one token (greedy) and is waited
for; nothing else is left behind.
"""
from kernel.errors import EINVAL, KvosError


def score(sys, tid, prompt, top: int = 0) -> list:
    """Each prompt token's TokenLogprob given the tokens before it, with the `top` most likely there
    (the first token's logprob is None: nothing comes before it). -> [TokenLogprob]"""
    pid = sys.spawn(tid, prompt, max_tokens=1, temperature=0, prompt_logprobs=top)
    try:
        while True:
            r = sys.read(pid, timeout=1.0)
            if r.prompt_logprobs is not None:
                return r.prompt_logprobs
            if r.turn_done:
                raise KvosError(EINVAL, f"process {pid} ended ({r.finish_reason}) before its prompt was scored")
    finally:
        sys.kill(pid)
        sys.wait(pid)


def loglikelihood(sys, tid, context: str, continuation: str) -> tuple:
    """(log P(continuation | context), whether greedy decoding from the context would give it), over
    the tokens of context + continuation that follow the context's own tokens (where the two
    tokenizations part, the continuation begins at the first token they disagree on)."""
    if not context:
        raise KvosError(EINVAL, "loglikelihood needs a context: the first token has no log-probability")
    whole = sys.tokenize(tid, context + continuation)
    alone = sys.tokenize(tid, context)
    split = next((i for i, (a, b) in enumerate(zip(whole, alone)) if a != b), min(len(whole), len(alone)))
    if split == 0 or split == len(whole):
        raise KvosError(EINVAL, "the continuation adds no token to the context's")
    entries = score(sys, tid, whole, top=1)[split:]
    total = sum(e.logprob for e in entries)
    greedy = all(e.top and e.top[0].token == e.token for e in entries)
    return total, greedy
