"""Choosing each process's next token from its logits row, and stop strings.

SamplingParams is what spawn() accepts, validated once (EINVAL, nothing
changed). sample() turns a batch of logits rows into tokens: a row's grammar mask
and penalties first (kernel/grammar.py, kernel/penalties.py), then greedy rows by
argmax, the rest through temperature, min-p, top-k and top-p at one uniform each
(kernel/ops/draw.py), drawn from its own process's torch.Generator, so a process's
output is reproducible whatever else runs beside it. (Stop strings are matched on
output bytes: kernel/output.py.)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import TYPE_CHECKING

from kernel import bad_words
from kernel.argcheck import MAX_SCHEMA_BYTES
from kernel.errors import EINVAL, KvosError
from kernel.output import check_stop_strings

MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 1024            # entries of logit_bias: bounded work per draw (OpenAI documents none)
MAX_ALLOWED_TOKEN_IDS = 1 << 18  # entries of allowed_token_ids: at most a vocabulary
MAX_BIAS = 100.0                 # |bias|, as OpenAI: -100 bans a token, +100 all but forces it
MAX_LOGPROBS = 20                # as OpenAI's top_logprobs

if TYPE_CHECKING:           # torch is imported where tokens are drawn: a daemon client needs SamplingParams only
    import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0              # nucleus mass kept, in (0, 1]
    top_k: int = 0                  # keep the k most likely tokens; 0 = all
    seed: int | None = None         # None: the kernel draws one
    max_tokens: int = 256           # new tokens per turn (0 only for processes that wait for input)
    stop: tuple = ()                # strings that end the turn; the text is cut before them
    include_stop_str_in_output: bool = False   # ... or after them (vLLM's name)
    stop_token_ids: tuple = ()      # tokens that end the turn (besides the program's EOS)
    ignore_eos: bool = False
    logprobs: int | None = None     # None: none; k: each drawn token's log-probability and the k most likely
    prompt_logprobs: int | None = None  # the same for each prompt token after the first, scored by the prompt's rows
    min_p: float = 0.0              # drop tokens less likely than min_p x the most likely one, in [0, 1]
    repetition_penalty: float = 1.0  # > 0: logits of tokens in the prompt or output / by it (x it if negative)
    frequency_penalty: float = 0.0  # in [-2, 2]: minus this x how often the process generated the token
    presence_penalty: float = 0.0   # in [-2, 2]: minus this if the process generated the token at all
    logit_bias: tuple = ()          # (token id, bias in [-100, 100]) pairs added to its logits before each draw
    allowed_token_ids: tuple = ()   # if any: the only tokens it may draw (vLLM's name), sorted
    bad_words_ids: tuple = ()       # token sequences the output never completes (kernel/bad_words.py)
    min_tokens: int = 0             # no EOS, stop token or stop string ends a turn before this many new tokens
    json_schema: str | None = None  # the output is one JSON value valid under this JSON Schema (a dict, kept as text)
    grammar: str | None = None      # or: the output is a sentence of this grammar (Lark, as llguidance reads it)

    def __post_init__(self):
        # Normalise the sequence fields and the schema (to its JSON text) so params compare and hash.
        if isinstance(self.json_schema, dict):
            object.__setattr__(self, "json_schema", _schema_text(self.json_schema))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, (list, tuple)):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        if isinstance(self.allowed_token_ids, (list, tuple)) and all(
                isinstance(t, Integral) and not isinstance(t, bool) for t in self.allowed_token_ids):
            object.__setattr__(self, "allowed_token_ids", tuple(sorted(set(int(t) for t in self.allowed_token_ids))))
        object.__setattr__(self, "bad_words_ids", bad_words.normalise(self.bad_words_ids))
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def biased(self) -> bool:
        """Whether its draws see more than the model's logits shaped by grammar and penalties."""
        return bool(self.logit_bias) or self.min_tokens > 0 or bool(self.allowed_token_ids) or bool(self.bad_words_ids)

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def validate(self) -> None:
        """EINVAL on any value that sampling cannot honour."""
        _number("temperature", self.temperature, low=0.0)
        _number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _integer("top_k", self.top_k, low=0)
        if self.seed is not None:
            _integer("seed", self.seed, low=0, high=2**63 - 1)
        _integer("max_tokens", self.max_tokens, low=0)
        _integer("min_tokens", self.min_tokens, low=0)
        if self.min_tokens > self.max_tokens:
            raise KvosError(EINVAL, f"min_tokens {self.min_tokens} exceeds max_tokens {self.max_tokens}")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _integer("prompt_logprobs", self.prompt_logprobs, low=0, high=MAX_LOGPROBS)
        _number("min_p", self.min_p, low=0.0, high=1.0)
        _number("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        _number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        if self.json_schema is not None:
            _schema_object(self.json_schema)
        if self.grammar is not None:
            if not isinstance(self.grammar, str) or not self.grammar.strip():
                raise KvosError(EINVAL, f"grammar must be the text of a Lark grammar, got {self.grammar!r}")
            if len(self.grammar.encode("utf-8", errors="replace")) > MAX_SCHEMA_BYTES:
                raise KvosError(EINVAL, f"grammar may have at most {MAX_SCHEMA_BYTES} bytes")
            if self.json_schema is not None:
                raise KvosError(EINVAL, "json_schema and grammar are exclusive: a grammar can embed a schema "
                                        "(%json {...})")
        if self.min_tokens and (self.json_schema is not None or self.grammar is not None):
            # the grammar decides where its sentence ends; banning the end could leave nothing to draw
            raise KvosError(EINVAL, "min_tokens cannot be combined with json_schema or grammar")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise KvosError(EINVAL, f"logit_bias may have at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        for token, bias in self.logit_bias:
            _integer("logit_bias token id", token, low=0)
            _number(f"logit_bias[{token}]", bias, low=-MAX_BIAS, high=MAX_BIAS)
        for flag in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, flag), bool):
                raise KvosError(EINVAL, f"{flag} must be True or False, got {getattr(self, flag)!r}")
        check_stop_strings(self.stop)
        if not isinstance(self.allowed_token_ids, tuple) or not all(
                isinstance(t, int) and t >= 0 for t in self.allowed_token_ids):
            raise KvosError(EINVAL, f"allowed_token_ids must be a list of token ids, got {self.allowed_token_ids!r}")
        if len(self.allowed_token_ids) > MAX_ALLOWED_TOKEN_IDS:
            raise KvosError(EINVAL, f"allowed_token_ids may have at most {MAX_ALLOWED_TOKEN_IDS} entries")
        if self.allowed_token_ids and (self.json_schema is not None or self.grammar is not None or self.min_tokens):
            # either could leave a draw nothing to take: the grammar's tokens or the banned ends outside the set
            raise KvosError(EINVAL, "allowed_token_ids cannot be combined with json_schema, grammar or min_tokens")
        if self.bad_words_ids and (self.json_schema is not None or self.grammar is not None
                                   or self.allowed_token_ids):
            # a grammar or the set might allow only the banned token: the draw would have nothing
            raise KvosError(EINVAL, "bad_words_ids cannot be combined with json_schema, grammar or allowed_token_ids")
        if not isinstance(self.stop_token_ids, tuple):
            raise KvosError(EINVAL, f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise KvosError(EINVAL, f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(self.stop_token_ids)}")
        for t in self.stop_token_ids:
            _integer("stop_token_ids entry", t, low=0)

    def check_vocab(self, vocab_size: int) -> None:
        """EINVAL when a stop token or the logprobs count does not fit the program's vocabulary."""
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise KvosError(EINVAL, f"stop token id {t} is outside the vocabulary (0..{vocab_size - 1})")
        for t, _ in self.logit_bias:
            if t >= vocab_size:
                raise KvosError(EINVAL, f"logit_bias token id {t} is outside the vocabulary (0..{vocab_size - 1})")
        if self.allowed_token_ids and self.allowed_token_ids[-1] >= vocab_size:
            raise KvosError(EINVAL, f"allowed_token_ids: token id {self.allowed_token_ids[-1]} is outside the "
                                    f"vocabulary (0..{vocab_size - 1})")
        bad_words.check_vocab(self.bad_words_ids, vocab_size)
        for key in ("logprobs", "prompt_logprobs"):
            k = getattr(self, key)
            if k is not None and k > vocab_size:
                raise KvosError(EINVAL, f"{key} {k} exceeds the vocabulary of {vocab_size}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> SamplingParams:
        unknown = sorted(set(kwargs) - KEYS)
        if unknown:
            raise KvosError(EINVAL, f"unknown sampling key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})")
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
            raise KvosError(EINVAL, f"sampling parameters must be a dict with string keys, got {d!r}")
        return cls.from_kwargs(**d)


KEYS = frozenset(f.name for f in fields(SamplingParams))


def _bias_pairs(bias) -> tuple:
    """logit_bias as sorted (token id, bias) pairs, from a dict (token ids as ints or, as in OpenAI's
    JSON, as their decimal strings) or a sequence of pairs (EINVAL on anything else or a repeated id).
    The values are checked by validate()."""
    if isinstance(bias, dict):
        items = list(bias.items())
    elif isinstance(bias, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in bias):
        items = [tuple(p) for p in bias]
    else:
        raise KvosError(EINVAL, f"logit_bias must map token ids to biases, got {bias!r}")
    pairs = []
    for token, value in items:
        if isinstance(token, str) and token.isdecimal() and token == str(int(token)):
            token = int(token)
        if not isinstance(token, Integral) or isinstance(token, bool):
            raise KvosError(EINVAL, f"logit_bias keys must be token ids, got {token!r}")
        pairs.append((int(token), value))
    pairs.sort(key=lambda p: p[0])
    if any(a[0] == b[0] for a, b in zip(pairs, pairs[1:])):
        raise KvosError(EINVAL, "logit_bias names a token id twice")
    return tuple(pairs)


def _schema_text(schema: dict) -> str:
    """A schema given as a dict, as compact JSON text (EINVAL if it is not JSON). Keys keep their
    order: a schema's properties come out in it."""
    try:
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise KvosError(EINVAL, f"json_schema must be JSON (a dict of JSON values): {err}") from None


def _schema_object(text) -> dict:
    """The schema text as a dict, within MAX_SCHEMA_BYTES (EINVAL otherwise)."""
    if not isinstance(text, str):
        raise KvosError(EINVAL, f"json_schema must be a JSON Schema (a dict), got {type(text).__name__}")
    if len(text.encode("utf-8", errors="replace")) > MAX_SCHEMA_BYTES:
        raise KvosError(EINVAL, f"json_schema may have at most {MAX_SCHEMA_BYTES} bytes of JSON")
    try:
        schema = json.loads(text)
    except ValueError as err:
        raise KvosError(EINVAL, f"json_schema is not JSON: {err}") from None
    if not isinstance(schema, dict):
        raise KvosError(EINVAL, f"json_schema must be a JSON Schema object, got {type(schema).__name__}")
    return schema


def _number(name, value, low=None, high=None, low_open=False):
    if not isinstance(value, Real) or isinstance(value, bool):
        raise KvosError(EINVAL, f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise KvosError(EINVAL, f"{name} must be finite, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise KvosError(EINVAL, f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise KvosError(EINVAL, f"{name} must be <= {high}, got {value!r}")


def _integer(name, value, low=None, high=None):
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise KvosError(EINVAL, f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise KvosError(EINVAL, f"{name} must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise KvosError(EINVAL, f"{name} must be <= {high}, got {value!r}")


def shapes(params: SamplingParams, constraint) -> bool:
    """Whether a process's draws need more than temperature, top-k and top-p (penalties, a grammar,
    logprobs, a logit bias, min_tokens): Process.shaped, so that the step looks further only at the
    processes that do."""
    return params.penalized or params.biased or params.logprobs is not None or constraint is not None


class Uniforms:
    """A process's stream of uniforms in [0, 1): its seeded torch.Generator's float64 draws, taken
    BATCH at a time and handed out one by one, since one torch call a draw cost ~1.7 us a row of a
    step (0.4 ms at 256 rows). The i-th uniform a process uses is the same however its draws are
    batched with other processes'."""
    BATCH = 64
    __slots__ = ("generator", "_left")

    def __init__(self, seed: int):
        import torch
        self.generator = torch.Generator().manual_seed(seed)
        self._left: list = []

    def next(self) -> float:
        if not self._left:
            import torch
            self._left = torch.rand(self.BATCH, dtype=torch.float64, generator=self.generator).tolist()[::-1]
        return self._left.pop()


def _uniform(source) -> float:
    """One uniform from a row's source: a process's Uniforms, or a bare torch.Generator (tests)."""
    if isinstance(source, Uniforms):
        return source.next()
    import torch
    return float(torch.rand(1, dtype=torch.float64, generator=source))


def make_generator(seed: int) -> torch.Generator:
    """A process's own generator: a host one, whatever device its logits are on (a draw takes one
    uniform from it, kernel/ops/draw.py)."""
    import torch
    return torch.Generator().manual_seed(seed)


def sample(logits: torch.Tensor, params_list: list, generators: list, histories: list | None = None,
           allowed: list | None = None, banned: list | None = None) -> torch.Tensor:
    """Next token of each row: int64 (rows,) on logits' device.

    Row i follows params_list[i] and draws only from generators[i] (a process's Uniforms, or a
    torch.Generator). Before temperature, in vLLM's
    order: allowed[i] (a bool (vocab,) mask of the tokens a grammar allows) and the row's
    allowed_token_ids, the row's logit_bias,
    banned[i] (token ids it may not draw now: its stop tokens under min_tokens, its bad words' ends),
    then the penalties
    from histories[i] (a TokenHistory, for penalized rows). Then greedy rows (temperature 0) take
    their argmax and draw nothing; the others take one uniform from generators[i] and
    kernel/ops/draw.py's draw_tokens picks their token at it. The arithmetic is row-wise, so a
    row's token does not depend on the other rows.
    """
    import torch
    num_rows, vocab = logits.shape
    if len(params_list) != num_rows or len(generators) != num_rows:
        raise KvosError(EINVAL, f"sample: {num_rows} rows, {len(params_list)} params, {len(generators)} generators")
    masked = allowed is not None and any(a is not None for a in allowed)
    restricted = any(p.allowed_token_ids for p in params_list)
    penalized = histories is not None and any(h is not None for h in histories)
    biased = any(p.logit_bias for p in params_list)
    banning = banned is not None and any(banned)
    if masked or restricted or penalized or biased or banning:
        logits = logits.float().clone()          # the caller's rows stay as the model gave them (logprobs)
        if masked:
            for i, a in enumerate(allowed):
                if a is not None:
                    logits[i].masked_fill_(~a.to(logits.device), -math.inf)
        if restricted:
            for i, p in enumerate(params_list):
                if p.allowed_token_ids:
                    keep = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
                    keep[torch.tensor(p.allowed_token_ids, device=logits.device)] = True
                    logits[i].masked_fill_(~keep, -math.inf)
        if biased:
            _add_bias(logits, params_list)
        if banning:
            for i, ids in enumerate(banned):
                if ids:
                    logits[i, torch.tensor(ids, device=logits.device)] = -math.inf
        if penalized:
            from kernel.penalties import apply_penalties
            apply_penalties(logits, params_list, histories)
    tokens = _argmax_rows(logits)
    rows = [i for i, p in enumerate(params_list) if p.temperature != 0]
    if not rows:
        return tokens
    from kernel.ops.draw import draw_tokens
    chosen = [params_list[i] for i in rows]
    # One uniform a draw, from the row's own generator (on the host, whatever the logits' device):
    # the inverse CDF needs no more, and a row's token depends on nothing else in the batch.
    u = [_uniform(generators[i]) for i in rows]
    x = logits if len(rows) == num_rows else logits[torch.tensor(rows, device=logits.device)]
    drawn = draw_tokens(x, [p.temperature for p in chosen], [p.top_k for p in chosen],
                        [p.top_p for p in chosen], [p.min_p for p in chosen], u)
    if len(rows) == num_rows:
        return drawn
    tokens[torch.tensor(rows, device=tokens.device)] = drawn.to(tokens.device)
    return tokens


def _add_bias(x: torch.Tensor, params_list: list) -> None:
    """Add each row's logit_bias to float32 logits x in place (one indexed add for all rows; a row
    names a token at most once)."""
    import torch
    rows, ids, values = [], [], []
    for i, p in enumerate(params_list):
        for token, bias in p.logit_bias:
            rows.append(i)
            ids.append(token)
            values.append(bias)
    at = (torch.tensor(rows, device=x.device), torch.tensor(ids, device=x.device))
    x[at] += torch.tensor(values, dtype=x.dtype, device=x.device)


def top_k_top_p_mask(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """bool (vocab,): the tokens one row may draw from under params' temperature, min-p, top-k and
    top-p (tests and introspection; the twin's weights, kernel/ops/reference.py draw_weights)."""
    import torch

    from kernel.ops.reference import draw_weights
    w = draw_weights(logits.float()[None], torch.tensor([params.temperature or 1.0]),
                     torch.tensor([params.top_k], dtype=torch.int32),
                     torch.tensor([params.top_p], dtype=torch.float64), torch.log(torch.tensor([params.min_p])))
    return w[0] > 0


def _argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """The greedy token of each row. On CPU float32 rows numpy's argmax (vectorised) takes ~5 us for
    SmolLM2's 49,152 logits where torch's takes ~40; both give the first maximum, or the first NaN."""
    import torch
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2:
        return torch.from_numpy(logits.contiguous().numpy().argmax(-1))
    return logits.argmax(dim=-1)
