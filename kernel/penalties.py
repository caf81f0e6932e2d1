"""Repetition, frequency and presence penalties: what a process said before, against its next token.

Each penalized process keeps a TokenHistory (the distinct tokens of its token file when the
turn's sampling began, and every token it drew since, in an array that grows by one per step),
and apply_penalties() rewrites its logits row from it, row by row, as vLLM defines them:
repetition divides a positive logit (multiplies a negative one) of every token seen in the
prompt or the output; frequency subtracts penalty x count and presence penalty x (count > 0)
over the tokens the process generated.
"""
from __future__ import annotations

from array import array

import torch


class TokenHistory:
    """One process's tokens as the penalties see them. Built from its token file when first
    needed (O(tokens) once per turn); each drawn token is then one array append."""

    __slots__ = ("seen", "num_seen", "drawn")

    def __init__(self, tokens, generated):
        distinct = sorted(set(tokens))
        self.seen = torch.tensor(distinct, dtype=torch.int64)              # prompt and output so far
        self.num_seen = len(distinct)
        self.drawn = array("q", generated)                                  # tokens generated, in order

    def add(self, token: int) -> None:
        self.drawn.append(token)

    def counts(self, vocab: int) -> torch.Tensor:
        """int64 (vocab,): how often the process generated each token."""
        return torch.bincount(_ids(self.drawn), minlength=vocab)[:vocab]


def history_of(proc) -> TokenHistory:
    """The process's history, built on first use (a fork or a new turn starts without one)."""
    if proc.history is None:
        proc.history = TokenHistory(proc.tokens, [proc.tokens[i] for i in proc.output])
    return proc.history


def apply_penalties(x: torch.Tensor, params: list, histories: list) -> None:
    """Penalize the rows of float32 logits x (rows, vocab) in place; row i follows params[i] and
    histories[i] (None: the row is left alone). A few batched operations whatever the rows."""
    rows = [i for i, h in enumerate(histories) if h is not None]
    if not rows:
        return
    vocab, device = x.shape[1], x.device
    hs = [histories[i] for i in rows]
    where = torch.arange(len(rows))
    flat = torch.cat([_ids(h.drawn) for h in hs])
    flat += torch.repeat_interleave(where, torch.tensor([len(h.drawn) for h in hs])) * vocab
    counts = torch.bincount(flat, minlength=len(rows) * vocab).view(len(rows), vocab).to(device)
    seen = counts > 0
    seen_rows = torch.repeat_interleave(where, torch.tensor([h.num_seen for h in hs]))
    seen[seen_rows.to(device), torch.cat([h.seen for h in hs]).to(device)] = True
    sub = x[rows]
    rep = torch.tensor([params[i].repetition_penalty for i in rows], device=device).unsqueeze(1)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = torch.tensor([params[i].frequency_penalty for i in rows], device=device).unsqueeze(1)
    pres = torch.tensor([params[i].presence_penalty for i in rows], device=device).unsqueeze(1)
    sub -= freq * counts + pres * (counts > 0)
    x[rows] = sub


def _ids(drawn: array) -> torch.Tensor:
    return torch.frombuffer(drawn, dtype=torch.int64) if drawn else torch.empty(0, dtype=torch.int64)
