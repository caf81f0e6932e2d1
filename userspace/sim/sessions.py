"""The `sessions` workload: multi-turn chats whose context grows, sharing system prompts.

A session picks one of a few system prompts (popularity falls as 1/rank), then runs its turns:
each turn's prompt is the system prompt, every earlier user message and reply, and a new user
message; the next turn arrives a think time after the reply ends. Each turn is a new request
(as an OpenAI-style API sees a chat), so where it runs is the router's choice.

Lengths come from the Azure LLM inference trace 2023, conversation service (released with
the Splitwise paper, CC-BY): AZURE_CONV below is a quantile table of its 19,366 requests'
prompt (num_prefill_tokens) and output (num_decode_tokens) lengths, sampled by inverse CDF.
The trace has no session structure, so the mapping is ours: outputs and system prompts draw
from its columns as they are; a user message draws from the prompt column times user_scale
(the trace's prompts already hold a system prompt and history). $KVOS_TRACE_CSV, a CSV with
the same two columns, replaces the table with its own rows.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from kernel.errors import EINVAL, ENOENT, KvosError

# percentile -> (prompt tokens, output tokens) of the Azure 2023 conversation trace (see above)
AZURE_CONV = {
    0: (2, 7), 1: (29, 16), 2.5: (120, 28), 5: (181, 41), 10: (207, 54), 15: (372, 67), 20: (387, 77),
    25: (396, 85), 30: (403, 91), 35: (414, 96), 40: (703, 103), 45: (984, 113), 50: (1020, 129),
    55: (1045, 151), 60: (1071, 177), 65: (1097, 217), 70: (1130, 384), 75: (1189, 395), 80: (1315, 400),
    85: (1876, 411), 90: (2734, 424), 95: (4083, 451), 97.5: (4092, 522), 99: (4142, 601),
    99.9: (6179, 954), 100: (14050, 1000),
}


class LengthTable:
    """Inverse-CDF sampling of (prompt, output) lengths: from the quantile table, or from a CSV's rows."""

    def __init__(self, path: str | None = None):
        self.source = path or "Azure LLM inference trace 2023 (conversation), quantile table"
        if path is None:
            qs = sorted(AZURE_CONV)
            self.qs = np.array(qs) / 100
            self.prompt = np.array([AZURE_CONV[q][0] for q in qs], dtype=float)
            self.output = np.array([AZURE_CONV[q][1] for q in qs], dtype=float)
            return
        try:
            with open(path, newline="") as f:
                rows = [(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])) for r in csv.DictReader(f)]
        except FileNotFoundError:
            raise KvosError(ENOENT, f"no trace file {path!r}") from None
        except (KeyError, ValueError, TypeError) as exc:
            raise KvosError(EINVAL, f"{path}: needs integer columns num_prefill_tokens and num_decode_tokens "
                                    f"({type(exc).__name__}: {exc})") from None
        if not rows:
            raise KvosError(EINVAL, f"{path}: no rows")
        self.qs = np.linspace(0, 1, len(rows))
        self.prompt = np.sort([r[0] for r in rows]).astype(float)
        self.output = np.sort([r[1] for r in rows]).astype(float)

    def sample(self, rng, column: str, size: int) -> np.ndarray:
        return np.interp(rng.random(size), self.qs, getattr(self, column))


def lengths() -> LengthTable:
    return LengthTable(os.environ.get("KVOS_TRACE_CSV") or None)


@dataclass(frozen=True)
class Session:
    index: int
    arrival: float               # seconds after the start (virtual)
    system_id: int
    turns: tuple                 # ((user message tokens, reply tokens), ...)
    thinks: tuple                # seconds between a reply's end and the next turn, one per later turn


def generate(num: int, *, rate: float | None = None, seed: int = 0, systems: int = 8, turns: float = 4.0,
             max_turns: int = 8, user_scale: float = 0.25, think: float = 1.0, max_context: int = 4096,
             table: LengthTable | None = None, system_len: int | None = None, user_len: int | None = None,
             output_len: int | None = None, popularity: str = "zipf") -> tuple:
    """`num` sessions arriving as a Poisson process at `rate` sessions/s (None: all at 0). -> (sessions,
    {system_id: length}). Turns per session: geometric with mean `turns` (at least 1, at most max_turns),
    and cut where the context (system, history, reply) would pass max_context. think: mean
    seconds (exponential) between turns. system_len, user_len, output_len fix a length (every
    system prompt, user message, reply) instead of drawing it from the trace, to express a
    benchmark's shape (SGLang's generated-shared-prefix: 2,048 / 128 / 256); popularity "zipf"
    (1/rank) or "uniform" (every system prompt equally used, as that benchmark's groups are)."""
    for name, value, lo in (("num", num, 1), ("systems", systems, 1), ("max_turns", max_turns, 1),
                            ("max_context", max_context, 64)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise KvosError(EINVAL, f"{name} must be an integer >= {lo}, got {value!r}")
    for name, value in (("system_len", system_len), ("user_len", user_len), ("output_len", output_len)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise KvosError(EINVAL, f"{name} must be an integer >= 1 (or None: from the trace), got {value!r}")
    if system_len is not None and system_len + (user_len or 1) + (output_len or 1) >= max_context:
        raise KvosError(EINVAL, f"system_len {system_len} leaves no room for a turn in the model's context "
                                f"of {max_context} tokens")
    if popularity not in ("zipf", "uniform"):
        raise KvosError(EINVAL, f"popularity must be 'zipf' or 'uniform', got {popularity!r}")
    for name, value in (("turns", turns), ("user_scale", user_scale), ("think", think)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= (1 if name == "turns" else 0):
            raise KvosError(EINVAL, f"{name} must be a number >= {1 if name == 'turns' else 0}, got {value!r}")
    if rate is not None and not (isinstance(rate, (int, float)) and rate > 0):
        raise KvosError(EINVAL, f"rate must be > 0 sessions/s, got {rate!r}")
    table = table or lengths()
    rng = np.random.default_rng([seed, 16])
    budget = max_context // 2                   # a system prompt leaves room for a conversation
    system_lens = {i: int(np.clip(table.sample(rng, "prompt", 1)[0], 16, budget)) for i in range(systems)}
    if system_len is not None:
        system_lens = dict.fromkeys(system_lens, system_len)
    weights = 1 / np.arange(1, systems + 1) if popularity == "zipf" else np.ones(systems)
    weights /= weights.sum()
    times = np.cumsum(rng.exponential(1 / rate, num)) if rate else np.zeros(num)
    # uniform: each system prompt gets the same number of sessions (give or take one), in shuffled order
    balanced = rng.permutation(np.arange(num) % systems) if popularity == "uniform" else None
    out = []
    for s in range(num):
        system = int(balanced[s]) if balanced is not None else int(rng.choice(systems, p=weights))
        n = min(max_turns, int(rng.geometric(1 / turns)))
        users = np.maximum(1, np.rint(table.sample(rng, "prompt", n) * user_scale)).astype(int)
        replies = np.maximum(1, np.rint(table.sample(rng, "output", n))).astype(int)
        if user_len is not None:
            users[:] = user_len
        if output_len is not None:
            replies[:] = output_len
        context, kept = system_lens[system], []
        for u, o in zip(users.tolist(), replies.tolist()):
            if context + u + o >= max_context:
                break
            kept.append((u, o))
            context += u + o
        if not kept:                              # at least one turn, cut to fit
            u = max(1, min(int(users[0]), (max_context - context) // 2))
            kept = [(u, max(1, min(int(replies[0]), max_context - context - u - 1)))]
        thinks = tuple(rng.exponential(think, len(kept) - 1).tolist()) if think else (0.0,) * (len(kept) - 1)
        out.append(Session(s, float(times[s]), system, tuple(kept), thinks))
    return out, system_lens


def system_tokens(system_id: int, length: int, vocab: int, seed: int = 0) -> list:
    """The system prompt's token ids (ids 3 .. vocab - 2: no special tokens, not the sim's filler)."""
    return np.random.default_rng([seed, 17, system_id]).integers(3, vocab - 1, length).tolist()


def user_tokens(session: int, turn: int, length: int, vocab: int, seed: int = 0) -> list:
    return np.random.default_rng([seed, 18, session, turn]).integers(3, vocab - 1, length).tolist()


def stats(sessions: list, system_lens: dict) -> dict:
    turns = [len(s.turns) for s in sessions]
    outs = [o for s in sessions for _, o in s.turns]
    prompts = []
    for s in sessions:
        context = system_lens[s.system_id]
        for u, o in s.turns:
            prompts.append(context + u)
            context += u + o
    return {"sessions": len(sessions), "turns": sum(turns), "turns_mean": float(np.mean(turns)),
            "prompt_mean": float(np.mean(prompts)), "output_mean": float(np.mean(outs)),
            "systems": len(system_lens), "system_len_mean": float(np.mean(list(system_lens.values())))}
