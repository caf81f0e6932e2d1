"""A process's output as bytes: token pieces appended, stop strings cut, whole characters to readers.

The kernel never runs a tokenizer. A program gives each token's bytes from a table
built at load (Program.token_bytes); a process's output is those bytes back to
back, and its text is their UTF-8 decoding (exactly the tokenizer's own decode
for byte-level BPE vocabularies). Stop strings are compiled once, in the caller's
context, into a StopSet: an Aho-Corasick automaton over bytes whose state each
process keeps, so a new token costs the kernel a few lookups per byte of it,
however many stop strings there are. The state is also the length of the
output's tail that may yet become a stop string: read() holds that tail back.
(Libraries such as pyahocorasick search whole strings and do not hand their
state from one call to the next, which streaming needs; hence this small one.)
"""
from __future__ import annotations

from kernel.errors import EINVAL, KvosError

# Documented limits (docs/reliability.md): OpenAI allows 4 stop strings, vLLM no limit.
MAX_STOP_STRINGS = 32
MAX_STOP_BYTES = 256          # per stop string, UTF-8 encoded


class StopSet:
    """Stop strings as one automaton. Immutable once built; every process using it keeps its own
    state (an int), so forks share one StopSet."""

    def __init__(self, strings):
        patterns = check_stop_strings(strings)
        self.strings = tuple(strings)
        self._goto: list[dict] = [{}]       # state -> {byte: next state} (the trie)
        self._fail: list[int] = [0]         # longest proper suffix of the state that is also a state
        self._match: list[int] = [0]        # longest stop string ending at this state (0: none)
        self._depth: list[int] = [0]        # bytes the state stands for
        for pattern in patterns:
            state = 0
            for byte in pattern:
                nxt = self._goto[state].get(byte)
                if nxt is None:
                    nxt = len(self._goto)
                    self._goto[state][byte] = nxt
                    self._goto.append({})
                    self._fail.append(0)
                    self._match.append(0)
                    self._depth.append(self._depth[state] + 1)
                state = nxt
            self._match[state] = len(pattern)
        queue = list(self._goto[0].values())             # breadth first: a state's fail link is shallower
        for state in queue:
            for byte, nxt in self._goto[state].items():
                f = self._fail[state]
                while f and byte not in self._goto[f]:
                    f = self._fail[f]
                self._fail[nxt] = self._goto[f].get(byte, 0)
                # the longest stop string ending here: this state's own, or one ending at its suffix
                self._match[nxt] = max(self._match[nxt], self._match[self._fail[nxt]])
                queue.append(nxt)

    @property
    def num_states(self) -> int:
        return len(self._goto)

    def feed(self, state: int, data: bytes, offset: int) -> tuple[int, tuple | None]:
        """Run `data` (which starts at `offset` in the output) from `state`. Returns (new state, (start,
        end) of the earliest-starting stop string that ends inside `data` in output indices, or None)."""
        goto, fail, match = self._goto, self._fail, self._match
        found = None
        for i, byte in enumerate(data):
            while state and byte not in goto[state]:
                state = fail[state]
            state = goto[state].get(byte, 0)
            if match[state]:
                start = offset + i + 1 - match[state]
                if found is None or start < found[0]:
                    found = (start, offset + i + 1)
        return state, found

    def pending(self, state: int) -> int:
        """Bytes at the end of the output that may be the start of a stop string (read holds them)."""
        return self._depth[state]


def check_stop_strings(strings) -> list[bytes]:
    """The stop strings as UTF-8 bytes, within the documented limits (EINVAL otherwise)."""
    if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) and s for s in strings):
        raise KvosError(EINVAL, f"stop must be a string or a list of non-empty strings, got {strings!r}")
    if len(strings) > MAX_STOP_STRINGS:
        raise KvosError(EINVAL, f"at most {MAX_STOP_STRINGS} stop strings, got {len(strings)}")
    out = []
    for s in strings:
        try:
            encoded = s.encode("utf-8")
        except UnicodeEncodeError as err:
            raise KvosError(EINVAL, f"a stop string is not valid text: {err.reason}") from None
        if len(encoded) > MAX_STOP_BYTES:
            raise KvosError(EINVAL, f"a stop string may have at most {MAX_STOP_BYTES} bytes, got {len(encoded)}")
        out.append(encoded)
    return out


def complete_utf8(data, start: int = 0, end: int | None = None) -> int:
    """The end of data[start:end]'s longest prefix that does not stop inside a UTF-8 sequence: a
    character split across two tokens waits for its second half. Invalid bytes are not waited on."""
    n = len(data) if end is None else end
    for back in range(1, min(4, n - start) + 1):
        byte = data[n - back]
        if byte & 0xC0 == 0x80:                          # a continuation byte: look further back
            continue
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return n - back if back < need else n
    return n


def decode(data) -> str:
    """Text of output bytes (invalid sequences become U+FFFD, as the tokenizers' own decode does)."""
    return bytes(data).decode("utf-8", errors="replace")
