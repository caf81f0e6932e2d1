"""Log-probabilities a process asked for: of the tokens it draws (spawned with logprobs=k) and of
its spawn prompt's tokens (prompt_logprobs=k), from the model's own distribution (the raw logits:
before penalties, a grammar's mask and temperature).

An entry is (logprob of the token, [(token, logprob)] the k most likely, the token's rank): the
rank counts the tokens strictly more likely than it, plus one (1 for the argmax; ties share the
better rank). A drawn token's entry also carries the token in front: (token, logprob, top, rank).
read() spells them out (kernel/sysproc.py); step.forward() calls these on the step's logits.
"""
from __future__ import annotations

import torch

SCORE_BLOCK = 64             # rows normalised at once: logsumexp's temporary is a block, not the chunk


def prompt_rows(works) -> tuple:
    """The rows that score spawn prompts (processes spawned with prompt_logprobs): ([(process,
    position)], [row in the packed batch]). The row at prompt position p scores token p + 1; rows
    that already ran (before a reclaim) are not asked again."""
    scoring, rows, offset = [], [], 0
    for w in works:
        proc = w.proc
        if proc.prompt_logprobs is not None:
            for p in range(max(w.start, proc.prompt_scored), min(w.end, len(proc.prompt_logprobs) - 1)):
                scoring.append((proc, p))
                rows.append(offset + p - w.start)
        offset += w.count
    return scoring, rows


def score_prompts(scoring, logits) -> None:
    """Fill each scored prompt position's entry from the model's log-softmax at the position before
    it, a block of rows at a time: a 512-row chunk of a 49k vocabulary is 100 MB of logits, and a
    whole-chunk log_softmax would add as much again."""
    for b in range(0, len(scoring), SCORE_BLOCK):
        block = scoring[b:b + SCORE_BLOCK]
        entries = ranked(logits[b:b + SCORE_BLOCK], [proc.tokens[p + 1] for proc, p in block],
                         [proc.params.prompt_logprobs for proc, _ in block])
        for (proc, p), entry in zip(block, entries):
            proc.prompt_logprobs[p + 1] = entry


def drawn_logprobs(x, procs, tokens) -> dict:
    """row -> (token, logprob, top, rank) for the processes that ask. A row that drew nothing (token
    None) reports the k most likely alone (logprob and rank None)."""
    want = [j for j, p in enumerate(procs) if p.params.logprobs is not None]
    if not want:
        return {}
    entries = ranked(x[want], [tokens[j] for j in want], [procs[j].params.logprobs for j in want])
    return {j: (tokens[j], *entry) for j, entry in zip(want, entries)}


def ranked(logits, tokens, ks) -> list:
    """Per row of logits: (the log-probability of tokens[i], [(token, logprob)] the ks[i] most likely,
    most likely first, and tokens[i]'s rank; logprob and rank None where tokens[i] is None). One
    log-softmax, one comparison and one top-k for all rows."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    own = logp.gather(1, torch.tensor([t or 0 for t in tokens], device=logp.device).unsqueeze(1))
    ranks = ((logp > own).sum(dim=1) + 1).tolist()
    own = own[:, 0].tolist()
    top_values = top_ids = None
    if max(ks):
        top = logp.topk(max(ks), dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    out = []
    for i, (t, k) in enumerate(zip(tokens, ks)):
        pairs = list(zip(top_ids[i][:k], top_values[i][:k])) if k else []
        out.append((None, pairs, None) if t is None else (own[i], pairs, ranks[i]))
    return out
