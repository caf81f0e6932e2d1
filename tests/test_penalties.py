"""Penalties and min-p: validation, the arithmetic against a plain per-element reference, and
rows that stay reproducible whatever their batch neighbours."""
import math

import pytest
import torch

from kernel.errors import KvosError
from kernel.penalties import TokenHistory, apply_penalties
from kernel.sampling import SamplingParams, make_generator, sample


@pytest.mark.parametrize("kwargs, match", [
    ({"min_p": -0.1}, "min_p must be >= 0"),
    ({"min_p": 1.5}, "min_p must be <= 1"),
    ({"min_p": math.nan}, "min_p must be finite"),
    ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
    ({"repetition_penalty": -1.0}, "repetition_penalty must be > 0"),
    ({"repetition_penalty": math.inf}, "repetition_penalty must be finite"),
    ({"frequency_penalty": 2.5}, "frequency_penalty must be <= 2"),
    ({"frequency_penalty": -2.01}, "frequency_penalty must be >= -2"),
    ({"presence_penalty": 3}, "presence_penalty must be <= 2"),
    ({"presence_penalty": "high"}, "presence_penalty must be a number"),
    ({"presence_penalty": True}, "presence_penalty must be a number"),
    ({"logprobs": -1}, "logprobs must be >= 0"),
    ({"logprobs": True}, "logprobs must be an integer"),
])
def test_validation(kwargs, match):
    with pytest.raises(KvosError, match=f"^EINVAL: .*{match}"):
        SamplingParams.from_kwargs(**kwargs)


def test_penalized_and_its_neutral_values():
    assert not SamplingParams().penalized
    assert not SamplingParams(repetition_penalty=1, frequency_penalty=0, presence_penalty=0.0).penalized
    for key, value in (("repetition_penalty", 1.2), ("frequency_penalty", -0.5), ("presence_penalty", 2)):
        assert SamplingParams(**{key: value}).penalized


def reference_penalties(row: list, prompt: list, output: list, rep: float, freq: float, pres: float) -> list:
    """vLLM's definitions, element by element in plain Python."""
    out = []
    for token, logit in enumerate(row):
        if token in prompt or token in output:
            logit = logit / rep if logit > 0 else logit * rep
        count = output.count(token)
        logit -= freq * count + pres * (1 if count else 0)
        out.append(logit)
    return out


def test_penalties_equal_the_plain_reference():
    vocab = 50
    g = torch.Generator().manual_seed(0)
    cases = [  # prompt, output, repetition, frequency, presence
        ([1, 2, 3, 3], [4, 4, 4, 7], 1.3, 0.0, 0.0),
        ([1, 2, 3, 3], [4, 4, 4, 7], 1.0, 0.7, 0.0),
        ([1, 2, 3, 3], [4, 4, 4, 7], 1.0, 0.0, -1.5),
        ([5, 9], [9, 9, 10, 11, 11], 0.8, -0.4, 2.0),
        ([0], [], 1.7, 2.0, 2.0),
        (list(range(40)), list(range(10, 49)) * 2, 1.1, 0.3, 0.3),
    ]
    x = torch.randn(len(cases), vocab, generator=g) * 3
    params = [SamplingParams(repetition_penalty=r, frequency_penalty=f, presence_penalty=p)
              for _, _, r, f, p in cases]
    histories = [TokenHistory(prompt + output, output) for prompt, output, *_ in cases]
    got = x.clone()
    apply_penalties(got, params, histories)
    for i, (prompt, output, rep, freq, pres) in enumerate(cases):
        want = reference_penalties(x[i].tolist(), prompt, output, rep, freq, pres)
        assert torch.allclose(got[i], torch.tensor(want), atol=1e-5), i


def test_a_history_grows_by_the_tokens_drawn():
    h = TokenHistory([1, 2, 3], [])
    assert h.counts(6).tolist() == [0] * 6
    for t in (4, 4, 5):
        h.add(t)
    assert h.counts(6).tolist() == [0, 0, 0, 0, 2, 1]
    x = torch.zeros(1, 6) + 1.0
    apply_penalties(x, [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.25)], [h])
    assert x[0].tolist() == [1.0, 0.5, 0.5, 0.5, 0.5 - 0.5, 0.5 - 0.25]


def test_rows_without_a_history_are_left_alone():
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    got = x.clone()
    apply_penalties(got, [SamplingParams(frequency_penalty=1.0)] * 3, [None, TokenHistory([], [3, 3]), None])
    assert torch.equal(got[0], x[0]) and torch.equal(got[2], x[2])
    assert got[1, 3] == x[1, 3] - 2.0


def reference_min_p(row: torch.Tensor, temperature: float, min_p: float) -> list:
    probs = torch.softmax(row / temperature, dim=-1).tolist()
    top = max(probs)
    return [p >= min_p * top for p in probs]


@pytest.mark.parametrize("min_p, temperature", [(0.05, 1.0), (0.3, 0.7), (0.9, 2.0), (1.0, 1.0)])
def test_min_p_draws_only_what_the_reference_keeps(min_p, temperature):
    row = torch.randn(40, generator=torch.Generator().manual_seed(2)) * 2
    keep = reference_min_p(row, temperature, min_p)
    g = make_generator(11)
    drawn = {int(sample(row[None], [SamplingParams(temperature=temperature, min_p=min_p)], [g])[0])
             for _ in range(400)}
    assert drawn <= {i for i, k in enumerate(keep) if k}
    if min_p == 1.0:
        assert drawn == {int(row.argmax())}


def test_min_p_frequencies_are_the_renormalised_survivors():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    g = make_generator(4)
    p = [SamplingParams(min_p=0.25)]                  # keeps p >= 0.125: the first three
    counts = torch.bincount(torch.tensor([int(sample(probs.log()[None], p, [g])[0]) for _ in range(3000)]),
                            minlength=4)
    assert counts[3] == 0
    expected = probs[:3] / 0.95 * 3000
    assert torch.all((counts[:3] - expected).abs() < 5 * expected.sqrt())


def test_greedy_rows_take_the_argmax_after_penalties():
    x = torch.tensor([[3.0, 2.9, 0.0]])
    history = TokenHistory([0], [0])
    greedy = SamplingParams(temperature=0, repetition_penalty=1.2)
    assert int(sample(x, [greedy], [make_generator(0)], [history])[0]) == 1
    assert int(sample(x, [SamplingParams(temperature=0)], [make_generator(0)])[0]) == 0
    assert torch.equal(x, torch.tensor([[3.0, 2.9, 0.0]]))          # the caller's logits are untouched


def test_a_mask_forbids_and_comes_before_everything():
    x = torch.tensor([[5.0, 1.0, 0.5, 0.2]])
    allowed = torch.tensor([False, False, True, True])
    g = make_generator(1)
    assert int(sample(x, [SamplingParams(temperature=0)], [g], None, [allowed])[0]) == 2
    drawn = {int(sample(x, [SamplingParams(temperature=3.0)], [g], None, [allowed])[0]) for _ in range(200)}
    assert drawn == {2, 3}


def test_shaped_rows_are_reproducible_whatever_the_batch():
    """A penalized, min-p, masked row draws the same tokens alone and among other rows."""
    vocab = 300
    mine = SamplingParams(temperature=0.9, min_p=0.02, repetition_penalty=1.3, frequency_penalty=0.4,
                          presence_penalty=0.2, top_k=80)
    target = torch.randn(vocab, generator=torch.Generator().manual_seed(42)) * 3
    mask = torch.ones(vocab, dtype=torch.bool)
    mask[::3] = False

    def run(crowd):
        gen, history, out = make_generator(99), TokenHistory([1, 2, 3], []), []
        for step in range(25):
            rows, params, gens, histories, masks, where = crowd(step)
            rows.insert(where, target)
            params.insert(where, mine)
            gens.insert(where, gen)
            histories.insert(where, history)
            masks.insert(where, mask)
            token = int(sample(torch.stack(rows), params, gens, histories, masks)[where])
            history.add(token)
            out.append(token)
        return out

    alone = run(lambda step: ([], [], [], [], [], 0))
    others = [SamplingParams(temperature=t, min_p=m, frequency_penalty=f) for t, m, f in
              [(0, 0, 0), (1.0, 0.1, 1.0), (1.3, 0.0, -1.0), (0.5, 0.5, 0.0)]]

    def crowd(step):
        n = 1 + step % 4
        rows = list(torch.randn(n, vocab, generator=torch.Generator().manual_seed(step)))
        histories = [TokenHistory([step], [step + 1]) if i % 2 else None for i in range(n)]
        masks = [None if i % 2 else torch.rand(vocab, generator=torch.Generator().manual_seed(i)) > 0.5
                 for i in range(n)]
        return (rows, others[:n], [make_generator(step * 10 + i) for i in range(n)], histories, masks,
                step % (n + 1))

    assert run(crowd) == alone
    assert len(set(alone)) > 5 and all(t % 3 for t in alone)
