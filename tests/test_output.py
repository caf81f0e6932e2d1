"""The output stream (kernel/output.py): stop strings as an automaton over bytes, whole characters
to readers, and the token bytes tables that let the kernel build text without a tokenizer."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.errors import KvosError
from kernel.output import MAX_STOP_BYTES, MAX_STOP_STRINGS, StopSet, complete_utf8, decode
from kernel.sampling import SamplingParams


def feed_all(stops, chunks, end=False):
    """Feed chunks as tokens would come; -> (chunk index, where the first stop begins, or ends with
    end=True), or None."""
    state, offset = 0, 0
    for i, chunk in enumerate(chunks):
        state, found = stops.feed(state, chunk, offset)
        offset += len(chunk)
        if found is not None:
            return i, found[1] if end else found[0]
    return None


def test_stop_strings_across_tokens():
    s = StopSet(["</end>", "STOP"])
    state, found = s.feed(0, b"hello </e", 0)
    assert found is None and s.pending(state) == 3                    # "</e" may begin a stop string
    state, found = s.feed(state, b"nd> tail", 9)
    assert found == (6, 12)                                           # "</end>" is bytes 6..12
    assert feed_all(StopSet(["ab", "xyzab"]), [b"..xyza", b"b!"]) == (1, 2)   # the earliest start wins
    assert feed_all(StopSet(["\n\n"]), [b"a\n", b"\nb"]) == (1, 1)
    assert feed_all(StopSet(["x"]), [b"yy", b"yx"]) == (1, 3)
    assert feed_all(StopSet(["caf\u00e9"]), [b"a caf", "\u00e9!".encode()]) == (1, 2)   # bytes of a character
    assert feed_all(StopSet(["ab", "xyzab"]), [b"..xyza", b"b!"], end=True) == (1, 7)   # the earliest's end


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text("ab\n\u00e9", min_size=1, max_size=5), min_size=1, max_size=5),
       st.text("ab\n\u00e9", max_size=30), st.randoms(use_true_random=False))
def test_stop_set_matches_a_brute_force_search(strings, text, rnd):
    """Whatever the chunking, the first chunk that completes a stop string, and the earliest start
    among the stop strings ending in it, are what a search of the whole text says."""
    data = text.encode()
    cuts, i = [], 0
    while i < len(data):
        k = rnd.randint(1, 4)
        cuts.append(data[i:i + k])
        i += k
    got = feed_all(StopSet(strings), cuts)
    got_end = feed_all(StopSet(strings), cuts, end=True)
    patterns = [s.encode() for s in strings]
    end_of = [sum(map(len, cuts[:j + 1])) for j in range(len(cuts))]
    want = want_end = None
    for j, end in enumerate(end_of):
        begin = end - len(cuts[j])
        spans = [(e - len(p), e) for p in patterns for e in range(begin + 1, end + 1)
                 if e >= len(p) and data[e - len(p):e] == p]
        if spans:
            first = min(spans)                     # the earliest start; of those, the shortest match
            want, want_end = (j, first[0]), (j, first[1])
            break
    assert got == want and got_end == want_end


def test_stop_limits_are_refused_with_einval():
    SamplingParams(stop=["x"] * MAX_STOP_STRINGS)
    with pytest.raises(KvosError, match="^EINVAL: at most 32 stop strings"):
        SamplingParams(stop=["x"] * (MAX_STOP_STRINGS + 1))
    with pytest.raises(KvosError, match="^EINVAL: a stop string may have at most 256 bytes"):
        SamplingParams(stop=["\u00e9" * (MAX_STOP_BYTES // 2 + 1)])
    with pytest.raises(KvosError, match="^EINVAL: at most 256 stop token ids"):
        SamplingParams(stop_token_ids=list(range(257)))


def test_complete_utf8_holds_half_characters_only():
    smile = "\U0001f642".encode()
    assert complete_utf8(b"abc") == 3
    assert complete_utf8(b"a" + smile[:3]) == 1                    # three of four bytes: wait for the fourth
    assert complete_utf8(b"a" + smile) == 5
    assert complete_utf8("\u00e9".encode()[:1]) == 0
    assert complete_utf8(b"\x80\x80") == 2                          # invalid bytes are not waited on
    assert complete_utf8(b"ab" + smile[:2], 0, 2) == 2              # up to the end given, not the buffer's
    assert decode(b"a\xff") == "a\ufffd"


def test_token_bytes_join_to_what_the_tokenizer_decodes():
    """The tiny model's byte-level vocabulary: joining token bytes is its decode, for any ids."""
    from userspace.programs.tiny import tiny_tokenizer
    tok = tiny_tokenizer()
    table = tok.vocab_bytes
    rnd = random.Random(0)
    for _ in range(500):
        ids = [rnd.randrange(len(table)) for _ in range(rnd.randint(1, 12))]
        assert decode(b"".join(table[i] for i in ids)) == tok.decode(ids)
    assert tok.max_token_bytes >= max(map(len, table))


def test_a_stop_string_ends_the_text_before_it_or_after_it():
    """include_stop_str_in_output (vLLM's name): the text ends after the stop string that ended the
    turn, not before; both end with reason stop at the same token, speculating or not."""
    import kernel
    from tests.kernel_helpers import TINY, assert_all_memory_back, frames
    for speculate in (0, 4):
        k = kernel.boot(memory=frames(32), speculate=speculate)
        sys = k.syscalls()
        tid = sys.spawn_tenant(TINY)
        prompt = [7, 8, 9, 10, 11] * 4
        plain = sys.wait(sys.spawn(tid, prompt, max_tokens=40, temperature=0, ignore_eos=True))
        half = len(plain.text) // 2                            # three ASCII characters from its second half
        at = next(i for i in range(half, len(plain.text) - 3) if plain.text[i:i + 3].isascii())
        stop = plain.text[at:at + 3]
        at = plain.text.find(stop)
        cut, kept = (sys.wait(sys.spawn(tid, prompt, max_tokens=40, temperature=0, ignore_eos=True, stop=[stop],
                                        include_stop_str_in_output=include)) for include in (False, True))
        assert cut.reason == kept.reason == "stop" and cut.tokens == kept.tokens
        assert cut.text == plain.text[:at] and kept.text == plain.text[:at + len(stop)]
        with pytest.raises(KvosError, match="^EINVAL: include_stop_str_in_output must be True or False"):
            sys.spawn(tid, prompt, stop=[stop], include_stop_str_in_output=1)
        assert_all_memory_back(k)
