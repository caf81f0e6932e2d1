"""Incremental detokenization: new text for new tokens, and where a stop string cuts it.

Decoding token by token breaks multi-byte characters and merges spaces wrongly,
so the text of new tokens is the difference between decoding a short window
that ends with them and the same window without them, held back while it ends
in an incomplete character (U+FFFD).
"""
from kernel.sampling import StopChecker

_WINDOW = 6                 # tokens of context before the new ones


class Detokenizer:
    def __init__(self, decode, stop_strings=()):
        self.decode = decode
        self.stop = StopChecker(stop_strings)
        self.text = ""              # text of the tokens read so far
        self.prefix = 0             # tokens[prefix:read] is the context window
        self.read = 0               # tokens already turned into text
        self.stopped_at = None      # index in text where a stop string begins

    def add(self, tokens: list, final: bool = False) -> str:
        """Feed the whole token list (generated so far); returns the text of the new tokens.

        While the text ends in an incomplete character it is held back, to be completed by
        the next tokens; final=True (the turn or the process ended) lets it out as it is.
        """
        if len(tokens) <= self.read:
            return ""
        before = self.decode(tokens[self.prefix:self.read])
        after = self.decode(tokens[self.prefix:])
        if (after.endswith("\ufffd") and not final) or len(after) <= len(before):
            return ""
        delta = after[len(before):]
        self.read = len(tokens)
        self.prefix = max(0, self.read - _WINDOW)
        self.text += delta
        cut = self.stop.feed(delta)
        if cut is not None and self.stopped_at is None:
            self.stopped_at = cut
        return delta

    @property
    def visible(self) -> str:
        """Text up to (not including) a stop string."""
        return self.text if self.stopped_at is None else self.text[:self.stopped_at]
