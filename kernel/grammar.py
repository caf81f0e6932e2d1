"""Structured output: a JSON Schema (or a Lark grammar) compiled in the caller's context, and a
matcher per process that the kernel asks, each step, which tokens it allows, and then advances.

The grammar engine is llguidance (imported only when a process asks for a schema: a daemon
client imports the kernel without it). Its vocabulary is built from the Program ABI alone,
each token's bytes (Program.token_bytes: exactly what the token adds to a process's output,
so the grammar checks the bytes the caller will read), the EOS ids and encode(); tokens
without bytes (special and padding ids) can only match as EOS. spawn's prepare half
compiles a grammar once per (program, grammar) (cached) and gives the new process a copy of
the compiled matcher; under the kernel lock a step costs a constrained process one mask
(~0.1 ms for a 49k vocabulary) and one advance (~15 us), each bounded by LIMITS.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

from kernel.errors import EINVAL, KvosError

GRAMMARS_PER_PROGRAM = 64     # compiled schemas kept per program (least recently used dropped)
# llguidance's per-step work limits (fuel is lexer work, items are Earley items): a step past them
# puts the matcher in error and ends its process, so no schema holds the kernel lock for long.
STEP_LEXER_FUEL = 100_000     # ~7 ms of lexing at llguidance's measured ~14k/ms
STEP_MAX_ITEMS = 20_000       # ~1 ms of parsing at ~20k/ms
# JSON as an object's text is written: ", " and ": " between items and keys, no other whitespace
# (a small model given free whitespace may emit newlines until max_tokens).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_lock = threading.Lock()
_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()    # program -> LLTokenizer
_grammars: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()        # program -> {(kind, text): Grammar}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise KvosError(EINVAL, "json_schema and grammar need the llguidance package (pip install llguidance)") \
            from None
    return llguidance


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: each token's bytes, the EOS and specials, encode."""

    def __init__(self, program):
        eos = sorted(program.eos_token_ids)
        self.tokens = []
        self.special_token_ids = []
        for i in range(program.vocab_size):
            piece = program.token_bytes(i)
            if not piece:              # a special or padding id: a name no grammar text can spell
                piece = b"\xff<|kvos_special_%d|>" % i
                self.special_token_ids.append(i)
            self.tokens.append(piece)
        self.eos_token_id = eos[0] if eos else None
        self.bos_token_id = getattr(program, "bos_token_id", None)
        self._program = program

    def __call__(self, text):
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._program.encode(text)


def vocabulary(program):
    """The program's llguidance tokenizer, built once (0.2 s for a 49k vocabulary)."""
    with _lock:
        found = _vocabularies.get(program)
    if found is None:
        llg = _llguidance()
        wrapped = _Vocabulary(program)
        found = llg.LLTokenizer(llg.TokenizerWrapper(wrapped), n_vocab=program.vocab_size,
                                eos_token=sorted(program.eos_token_ids) or None)
        with _lock:
            found = _vocabularies.setdefault(program, found)
    return found


KINDS = ("json_schema", "grammar")     # the SamplingParams fields a process's constraint comes from


class Grammar:
    """A compiled json_schema or Lark grammar for one program: a fresh matcher each new process copies."""

    def __init__(self, program, kind: str, text: str):
        llg = _llguidance()
        try:
            if kind == "json_schema":
                grammar = llg.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
            else:
                grammar = llg.LLMatcher.grammar_from_lark(text)
        except ValueError as err:
            raise KvosError(EINVAL, f"{kind}: {err}") from None
        limits = llg.LLParserLimits(step_lexer_fuel=STEP_LEXER_FUEL, step_max_items=STEP_MAX_ITEMS)
        matcher = llg.LLMatcher(vocabulary(program), grammar, log_level=0, limits=limits)
        if matcher.is_error():
            raise KvosError(EINVAL, f"{kind} cannot be compiled: {_first_line(matcher.get_error())}")
        self.kind = kind
        self.matcher = matcher
        self.vocab_size = program.vocab_size
        self.eos = tuple(sorted(program.eos_token_ids))

    def start(self) -> Constraint:
        return Constraint(self, self.matcher.deep_copy())


def compile_grammar(program, kind: str, text: str) -> Grammar:
    """The compiled json_schema or grammar (kind) for `program`, in the caller's context (no kernel
    lock), from the cache when this program has compiled it before. EINVAL for what llguidance
    cannot compile."""
    key = (kind, text)
    with _lock:
        cache = _grammars.setdefault(program, OrderedDict())
        grammar = cache.get(key)
        if grammar is not None:
            cache.move_to_end(key)
            return grammar
    grammar = Grammar(program, kind, text)
    with _lock:
        cache[key] = grammar
        while len(cache) > GRAMMARS_PER_PROGRAM:
            cache.popitem(last=False)
    return grammar


class Constraint:
    """One process's place in its grammar: the kernel masks its logits row with allowed() before
    each draw and advance()s it with the token drawn. A fork gets a copy (fork())."""

    __slots__ = ("grammar", "matcher", "error")

    def __init__(self, grammar: Grammar, matcher):
        self.grammar, self.matcher, self.error = grammar, matcher, None

    def allowed(self):
        """bool (vocab,) tensor: the tokens the grammar allows next (only EOS once it is done or broken)."""
        import torch
        vocab = self.grammar.vocab_size
        if self.matcher.is_stopped() or self.matcher.is_error():
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[list(self.grammar.eos)] = True
            return mask
        packed = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        bits = (packed.unsqueeze(1) >> _shifts()) & 1           # token 8b + k is bit k of byte b
        return bits.view(-1)[:vocab].bool()

    def advance(self, token: int) -> str | None:
        """Consume the drawn token. -> "stop" when the grammar is complete (the value is whole, or
        EOS was accepted), "error" when the matcher failed (self.error says why), else None."""
        if not self.matcher.consume_token(token) or self.matcher.is_error():
            self.error = _first_line(self.matcher.get_error()) or f"token {token} is outside the grammar"
            return "error"
        return "stop" if self.matcher.is_stopped() else None

    def fork(self) -> Constraint:
        return Constraint(self.grammar, self.matcher.deep_copy())

    def reset(self) -> None:
        """A new turn: the next output is a new value."""
        self.matcher.reset()
        self.error = None


_SHIFTS = None


def _shifts():
    global _SHIFTS
    if _SHIFTS is None:
        import torch
        _SHIFTS = torch.arange(8, dtype=torch.uint8)
    return _SHIFTS


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0][:300] if (text or "").strip() else ""
