"""Words a reply must not contain, as the kernel's bad_words_ids: the token sequences that spell them.

The kernel bans token sequences (kernel/bad_words.py); which sequences spell a word is the
tokenizer's business, so it is settled here, in the caller's thread, through the tokenize syscall.
A word is banned as the model would write it at the start of the reply and after a space: a BPE
tokenizer spells " Paris" and "Paris" with different tokens, and mid-sentence the model writes the
first. Other spellings (another case, a word split differently after punctuation) are not covered,
as in vLLM, whose `bad_words` kvosd serves with this.
"""
from __future__ import annotations

from kernel.argcheck import MAX_BAD_WORDS
from kernel.errors import EINVAL, KvosError

MAX_WORDS = MAX_BAD_WORDS // 2       # two spellings each


def bad_words_ids(sys, tid: int, words, name: str = "bad_words") -> list:
    """The token sequences of each word alone and after a space, without repeats; EINVAL naming
    `name` for anything but a list of non-empty strings."""
    if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in words):
        raise KvosError(EINVAL, f"{name} must be a list of non-empty words")
    if len(words) > MAX_WORDS:
        raise KvosError(EINVAL, f"{name} may have at most {MAX_WORDS} words, got {len(words)}")
    sequences = {}
    for word in words:
        bare = word.lstrip()
        for spelling in (bare, " " + bare):
            sequences.setdefault(tuple(sys.tokenize(tid, spelling)), None)
    return [list(s) for s in sequences]
