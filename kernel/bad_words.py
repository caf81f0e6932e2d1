"""Bad words: token sequences a process may never complete (spawn's bad_words_ids).

A sequence of one token bans that token from every draw. A longer one bans its last token
whenever the turn's output so far ends with the rest of it, so the sequence can begin but never
be finished. Matching is on token ids: the caller turns words into the ways its tokenizer spells
them (userspace/libc/bad_words.py, kvosd's `bad_words`); the kernel compares ids and never text.
Only the turn's own output is matched (a prefix that ends the prompt does not count), as vLLM
does. The banned tokens join the draw's other bans (sample()'s `banned`), so greedy and sampled
draws, speculative drafts (drawn row by row after the tokens before them are taken) and forks
all obey them; logprobs still report the model's own distribution.
"""
from __future__ import annotations

from numbers import Integral

from kernel.argcheck import MAX_BAD_WORD_TOKENS, MAX_BAD_WORDS
from kernel.errors import EINVAL, KvosError


def normalise(sequences) -> tuple:
    """bad_words_ids as a sorted tuple of distinct tuples of token ids (EINVAL on any other shape, an
    empty or overlong sequence, too many); check_vocab() checks the ids against a vocabulary."""
    if not isinstance(sequences, (list, tuple)) or not all(isinstance(s, (list, tuple)) for s in sequences):
        raise KvosError(EINVAL, f"bad_words_ids must be a list of token id lists, got {str(sequences)[:80]}")
    if len(sequences) > MAX_BAD_WORDS:
        raise KvosError(EINVAL, f"bad_words_ids may have at most {MAX_BAD_WORDS} sequences, got {len(sequences)}")
    out = set()
    for s in sequences:
        if not s or len(s) > MAX_BAD_WORD_TOKENS:
            raise KvosError(EINVAL, f"a bad_words_ids sequence has 1 to {MAX_BAD_WORD_TOKENS} token ids, "
                                    f"got {len(s)}")
        if not all(isinstance(t, Integral) and not isinstance(t, bool) and t >= 0 for t in s):
            raise KvosError(EINVAL, f"bad_words_ids: {str(list(s))[:80]} is not a list of token ids")
        out.add(tuple(int(t) for t in s))
    return tuple(sorted(out))


def check_vocab(sequences: tuple, vocab_size: int) -> None:
    for s in sequences:
        if max(s) >= vocab_size:
            raise KvosError(EINVAL, f"bad_words_ids: token id {max(s)} is outside the vocabulary "
                                    f"(0..{vocab_size - 1})")


def banned_next(sequences: tuple, tokens, generated: int) -> tuple:
    """The tokens the next draw may not be: the last token of each sequence whose other tokens end
    the turn's output (the last `generated` of `tokens`); a one-token sequence's always."""
    banned = []
    n = len(tokens)
    for s in sequences:
        head = len(s) - 1
        if head <= generated and all(tokens[n - head + i] == s[i] for i in range(head)):
            banned.append(s[-1])
    return tuple(banned)
