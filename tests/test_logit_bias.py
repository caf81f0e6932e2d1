"""logit_bias, min_tokens, allowed_token_ids and bad_words_ids: validation, the arithmetic of one draw against a
plain reference, and
whole processes on tiny-llama (banned and forced tokens, turns that may not end early), in process
and through kvosd's OpenAI API alike."""
import math

import pytest
import torch

import kernel
from kernel.errors import KvosError
from kernel.sampling import MAX_LOGIT_BIAS, SamplingParams, make_generator, sample
from tests.kernel_helpers import TINY, frames, run_to_end

PROMPT = [5, 17, 99, 230, 41, 8]


@pytest.mark.parametrize("kwargs, match", [
    ({"logit_bias": {5: 100.5}}, r"logit_bias\[5\] must be <= 100"),
    ({"logit_bias": {5: -101}}, r"logit_bias\[5\] must be >= -100"),
    ({"logit_bias": {5: math.nan}}, r"logit_bias\[5\] must be finite"),
    ({"logit_bias": {5: True}}, r"logit_bias\[5\] must be a number"),
    ({"logit_bias": {"5": "1"}}, r"logit_bias\[5\] must be a number"),
    ({"logit_bias": {-1: 1}}, "logit_bias token id must be >= 0"),
    ({"logit_bias": {"x": 1}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {"05": 1}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {True: 1}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {5: 1, "5": 2}}, "logit_bias names a token id twice"),
    ({"logit_bias": [5, 6]}, "logit_bias must map token ids to biases"),
    ({"logit_bias": "5"}, "logit_bias must map token ids to biases"),
    ({"logit_bias": {i: 1 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias may have at most 1024 entries"),
    ({"min_tokens": -1}, "min_tokens must be >= 0"),
    ({"min_tokens": 2.0}, "min_tokens must be an integer"),
    ({"min_tokens": 9, "max_tokens": 8}, "min_tokens 9 exceeds max_tokens 8"),
    ({"min_tokens": 1, "json_schema": {"type": "object"}}, "min_tokens cannot be combined"),
    ({"bad_words_ids": [5]}, "bad_words_ids must be a list of token id lists"),
    ({"bad_words_ids": "5"}, "bad_words_ids must be a list of token id lists"),
    ({"bad_words_ids": [[]]}, "a bad_words_ids sequence has 1 to 32 token ids, got 0"),
    ({"bad_words_ids": [list(range(33))]}, "a bad_words_ids sequence has 1 to 32 token ids, got 33"),
    ({"bad_words_ids": [[1, -2]]}, r"bad_words_ids: \[1, -2\] is not a list of token ids"),
    ({"bad_words_ids": [[1, True]]}, "is not a list of token ids"),
    ({"bad_words_ids": [[i] for i in range(257)]}, "bad_words_ids may have at most 256 sequences"),
    ({"bad_words_ids": [[1]], "grammar": "start: \"a\""}, "bad_words_ids cannot be combined"),
    ({"bad_words_ids": [[1]], "allowed_token_ids": [1, 2]}, "bad_words_ids cannot be combined"),
])
def test_validation(kwargs, match):
    with pytest.raises(KvosError, match=f"^EINVAL: .*{match}"):
        SamplingParams.from_kwargs(**kwargs)


def test_the_forms_of_a_bias_are_one_value():
    want = SamplingParams(logit_bias=((3, -1.0), (7, 2.5)))
    for form in ({7: 2.5, 3: -1.0}, {"7": 2.5, "3": -1}, [[7, 2.5], [3, -1.0]], ((3, -1.0), (7, 2.5))):
        p = SamplingParams(logit_bias=form)
        assert p == want and hash(p) == hash(want) and p.biased
    assert not SamplingParams().biased and SamplingParams(min_tokens=1).biased
    with pytest.raises(KvosError, match="^EINVAL: logit_bias token id 600 is outside"):
        SamplingParams(logit_bias={600: 1}).check_vocab(512)


def test_one_draw_follows_the_biased_distribution_and_leaves_other_rows_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, generator=g) * 2
    best = int(x[0].argmax())
    greedy = [SamplingParams(temperature=0, logit_bias={best: -100, 11: 3.0}), SamplingParams(temperature=0),
              SamplingParams(temperature=0, logit_bias={2: 100})]
    biased = x.clone()
    biased[0, best] -= 100
    biased[0, 11] += 3
    out = sample(x, greedy, [make_generator(i) for i in range(3)])
    assert out.tolist() == [int(biased[0].argmax()), int(x[1].argmax()), 2]
    # Sampled rows: the frequencies of softmax(logits + bias); a neighbour's bias changes no other row.
    p = SamplingParams(temperature=1.0, logit_bias={0: 4.0, 1: -100})
    counts = torch.zeros(40)
    for s in range(3000):
        counts[int(sample(x[1:2], [p], [make_generator(s)])[0])] += 1
    shifted = x[1].clone()
    shifted[0] += 4
    shifted[1] -= 100
    want = torch.softmax(shifted, -1)
    assert counts[1] == 0 and (counts / 3000 - want).abs().max() < 0.03
    plain = SamplingParams(temperature=1.0)
    for s in range(20):
        alone = sample(x[1:2], [plain], [make_generator(s)])[0]
        beside = sample(x, [greedy[0], plain, greedy[2]], [make_generator(9), make_generator(s), make_generator(8)])[1]
        assert alone == beside


def test_banned_tokens_are_never_drawn():
    x = torch.zeros(2, 6)
    x[:, 4] = 50.0                                         # the model insists on token 4
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0)]
    for s in range(50):
        out = sample(x, params, [make_generator(s), make_generator(s + 1)], banned=[(4,), (4, 0)])
        assert out[0] != 4 and out[1] not in (4, 0)
    assert sample(x, params, [make_generator(0)] * 2, banned=[(), None]).tolist() == [4, 4]


@pytest.fixture
def tiny():
    k = kernel.boot(memory=frames(64), threads=1)
    root = k.syscalls()
    return k, root, root.spawn_tenant(TINY)


def finish(k, root, pids):
    run_to_end(k)
    results = [root.wait(pid) for pid in pids]
    assert k.mm.frames.num_free == k.mm.frames.num_frames - k.mm.meminfo().cached
    return results


def test_banned_and_forced_tokens_in_a_whole_process(tiny):
    k, root, tid = tiny
    greedy = dict(max_tokens=12, temperature=0, ignore_eos=True)
    plain = root.wait(root.spawn(tid, PROMPT, **greedy)).tokens
    banned = {t: -100 for t in set(plain)}
    pids = [root.spawn(tid, PROMPT, logit_bias=banned, **greedy),
            root.spawn(tid, PROMPT, logit_bias={77: 100}, **greedy),
            root.spawn(tid, PROMPT, **greedy)]
    without, forced, again = finish(k, root, pids)
    assert not set(without.tokens) & set(plain)
    assert forced.tokens == [77] * 12
    assert again.tokens == plain                           # a neighbour's bias changed nothing here


def test_min_tokens_holds_back_stop_tokens_and_stop_strings(tiny):
    k, root, tid = tiny
    greedy = dict(max_tokens=16, temperature=0, ignore_eos=True)
    plain = root.wait(root.spawn(tid, PROMPT, **greedy))
    stop_token = plain.tokens[1]
    early = root.wait(root.spawn(tid, PROMPT, stop_token_ids=[stop_token], **greedy))
    assert early.reason == "stop" and early.tokens == plain.tokens[:2]
    held = root.wait(root.spawn(tid, PROMPT, stop_token_ids=[stop_token], min_tokens=6, **greedy))
    assert len(held.tokens) >= 6 and stop_token not in held.tokens[:6]
    assert held.reason == "length" or held.tokens[-1] == stop_token
    # A stop string seen before min_tokens is text; one completed after it ends the turn.
    token_bytes = k.tenants[tid].program.token_bytes
    word = next(text for text in map(lambda t: root.detokenize(tid, [t]), plain.tokens[1:4])
                if text.isascii() and text.strip())
    reasons = set()
    for stop in dict.fromkeys((word, word[:1])):       # tiny-llama: "on" never again, "o" again later
        cut = root.wait(root.spawn(tid, PROMPT, stop=[stop], **greedy))
        assert cut.reason == "stop" and len(cut.text) < len(plain.text)
        kept = root.wait(root.spawn(tid, PROMPT, stop=[stop], min_tokens=5, **greedy))
        assert kept.tokens[:5] == plain.tokens[:5]
        data, pattern = b"".join(map(token_bytes, plain.tokens)), stop.encode()
        before = len(b"".join(map(token_bytes, plain.tokens[:4])))       # bytes drawn while the turn was short
        at = next((i for i in range(len(data)) if data.startswith(pattern, i) and i + len(pattern) > before), None)
        assert data.find(pattern) < before                                 # the test does what it says
        assert kept.text == (data if at is None else data[:at]).decode(errors="replace")
        assert kept.reason == ("length" if at is None else "stop")
        reasons.add(kept.reason)
    assert reasons == {"length", "stop"}
    k.fsck()


def test_allowed_token_ids_are_the_only_tokens_drawn():
    """vLLM's allowed_token_ids: greedy and sampled draws stay in the set, logprobs still report the
    model's own distribution, and what would leave a draw with nothing is refused."""
    from tests.kernel_helpers import assert_all_memory_back
    k = kernel.boot(memory=frames(32))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    ids = [17, 42, 99, 300]
    plain = sys.wait(sys.spawn(tid, [5, 6, 7], max_tokens=12, temperature=0, ignore_eos=True))
    assert not set(plain.tokens) <= set(ids)
    for params in ({"temperature": 0}, {"temperature": 1.3, "seed": 4}, {"temperature": 0.8, "top_k": 2, "seed": 1}):
        pid = sys.spawn(tid, [5, 6, 7], max_tokens=24, ignore_eos=True, allowed_token_ids=ids, logprobs=2, **params)
        entries = sys.read(pid, timeout=30).logprobs
        st = sys.wait(pid)
        assert len(st.tokens) == 24 and set(st.tokens) <= set(ids), (params, st.tokens)
        assert any(e.top[0].token not in ids for e in entries)       # logprobs: the model's, unmasked
    for bad, match in (({"allowed_token_ids": [600]}, "outside the vocabulary"),
                       ({"allowed_token_ids": [1], "min_tokens": 1}, "cannot be combined"),
                       ({"allowed_token_ids": "17"}, "must be a list of token ids")):
        with pytest.raises(KvosError, match=match):
            sys.spawn(tid, [5, 6, 7], max_tokens=4, **bad)
    assert_all_memory_back(k)


def test_bad_words_ids_are_begun_but_never_finished(tiny):
    """A sequence's last token is banned exactly where the turn's output ends with the rest of it
    (checked draw by draw against the model's own ranking, which logprobs report unmasked); a
    one-token sequence is never drawn; speculation (drafts holding the bad words) and a fork draw
    the same tokens."""
    from kernel.bad_words import banned_next
    k, root, tid = tiny
    greedy = dict(max_tokens=16, temperature=0, ignore_eos=True)
    plain = root.wait(root.spawn(tid, PROMPT, **greedy)).tokens
    words = [plain[3:5], [plain[8]], [plain[0], 9, 9]]
    pid = root.spawn(tid, PROMPT, bad_words_ids=words, logprobs=20, **greedy)
    entries = root.read(pid, timeout=30).logprobs
    got = root.wait(pid).tokens
    assert got[:4] == plain[:4] and got[4] != plain[4]                # begun, then turned away from
    for n, (token, entry) in enumerate(zip(got, entries)):
        ban = set(banned_next(tuple(map(tuple, words)), got[:n], n))
        assert token == next(t.token for t in entry.top if t.token not in ban), n      # the best allowed
    assert plain[8] not in got
    assert not any(got[i:i + len(w)] == w for w in words for i in range(len(got)))
    # Sampled, then the same with speculation (drafts drawn row by row) and in a fork.
    sampled = dict(max_tokens=24, temperature=1.2, seed=5, ignore_eos=True, bad_words_ids=words)
    want = root.wait(root.spawn(tid, PROMPT, **sampled)).tokens
    assert not any(want[i:i + len(w)] == w for w in words for i in range(len(want)))
    spec = kernel.boot(memory=frames(64), threads=1, speculate=4)
    sys2 = spec.syscalls()
    tid2 = sys2.spawn_tenant(TINY)
    assert sys2.wait(sys2.spawn(tid2, PROMPT, prediction=want, **sampled)).tokens == want
    # The unbanned output as the guess: its drafts hold the bad words, whose rows must turn them down.
    drafted = sys2.wait(sys2.spawn(tid2, PROMPT, prediction=plain, bad_words_ids=words, **greedy))
    assert drafted.tokens == got and drafted.accepted_prediction_tokens >= 3
    parent = root.spawn(tid, PROMPT, bad_words_ids=words, **greedy)
    child = root.fork(parent)[0]                      # before its first step: it keeps the parent's bans
    assert root.wait(child).tokens == root.wait(parent).tokens == got
    with pytest.raises(KvosError, match="bad_words_ids: token id 600 is outside"):
        root.spawn(tid, PROMPT, bad_words_ids=[[600]], max_tokens=2)
    k.fsck()


def test_libc_spells_a_word_alone_and_after_a_space(tiny):
    from userspace.libc.bad_words import bad_words_ids
    _, root, tid = tiny
    ids = bad_words_ids(root, tid, ["page", " table"])
    assert ids == [root.tokenize(tid, "page"), root.tokenize(tid, " page"), root.tokenize(tid, "table"),
                   root.tokenize(tid, " table")]
    for bad in ([""], ["  "], "page", [3], ["w"] * 129):
        with pytest.raises(KvosError, match="^EINVAL: bad_words"):
            bad_words_ids(root, tid, bad)
