"""Sampling: validation, greedy, reproducibility whatever the batch, top-k/top-p masks, stop strings."""
import math

import pytest
import torch

from kernel.errors import KvosError
from kernel.sampling import SamplingParams, Uniforms, make_generator, sample, top_k_top_p_mask


def logits_rows(n, vocab=1000, seed=0):
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"temperature": math.nan}, "temperature must be finite"),
    ({"temperature": math.inf}, "temperature must be finite"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_p": 0.0}, "top_p must be > 0"),
    ({"top_p": 1.5}, "top_p must be <= 1"),
    ({"top_p": math.nan}, "top_p must be finite"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"top_k": True}, "top_k must be an integer"),
    ({"max_tokens": -1}, "max_tokens must be >= 0"),
    ({"max_tokens": "10"}, "max_tokens must be an integer"),
    ({"seed": -5}, "seed must be >= 0"),
    ({"seed": 2**64}, "seed must be <="),
    ({"stop": [""]}, "stop must be a string or a list of non-empty strings"),
    ({"stop": [1]}, "stop must be"),
    ({"stop": 7}, "stop must be"),
    ({"stop_token_ids": [-1]}, "stop_token_ids entry must be >= 0"),
    ({"stop_token_ids": 5}, "stop_token_ids must be a list"),
    ({"ignore_eos": "yes"}, "ignore_eos must be True or False"),
    ({"logprobs": 21}, "logprobs must be <= 20"),
    ({"temprature": 0.5}, "unknown sampling key 'temprature'"),
])
def test_validation(kwargs, match):
    with pytest.raises(KvosError, match=f"^EINVAL: .*{match}"):
        SamplingParams.from_kwargs(**kwargs)


def test_construction_and_normalisation():
    p = SamplingParams.from_dict({"temperature": 0, "stop": "###", "stop_token_ids": [5, 6], "seed": 3})
    assert p.greedy and p.stop == ("###",) and p.stop_token_ids == (5, 6)
    assert p == SamplingParams(temperature=0.0, stop=["###"], stop_token_ids=(5, 6), seed=3)
    assert SamplingParams(max_tokens=0).max_tokens == 0                # processes that wait for input
    with pytest.raises(KvosError, match="^EINVAL: sampling parameters must be a dict"):
        SamplingParams.from_dict([("temperature", 1.0)])
    with pytest.raises(KvosError, match="^EINVAL: stop token id 600 is outside"):
        SamplingParams(stop_token_ids=[600]).check_vocab(512)
    with pytest.raises(KvosError, match="^EINVAL: logprobs 5 exceeds"):
        SamplingParams(logprobs=5).check_vocab(4)


def test_greedy_rows_are_argmax():
    x = logits_rows(5)
    params = [SamplingParams(temperature=0)] * 5
    gens = [make_generator(i) for i in range(5)]
    states = [g.get_state() for g in gens]
    assert torch.equal(sample(x, params, gens), x.argmax(-1))
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states))   # greedy draws nothing


@pytest.mark.parametrize("source", [make_generator, Uniforms])
def test_reproducible_whatever_the_batch(source):
    """A row's tokens depend only on its logits, its params and its own generator (a bare one, or a
    process's Uniforms, which draws its generator's numbers 64 at a time)."""
    vocab = 1000
    mine = SamplingParams(temperature=0.8, top_k=50, top_p=0.9)
    target = logits_rows(1, vocab, seed=42)[0]

    def run(build_batch):
        gen = source(1234)
        out = []
        for step in range(30):
            rows, params, gens, where = build_batch(step)
            rows.insert(where, target)
            params.insert(where, mine)
            gens.insert(where, gen)
            out.append(int(sample(torch.stack(rows), params, gens)[where]))
        return out

    alone = run(lambda step: ([], [], [], 0))
    others = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in
              [(0, 0, 1.0), (1.0, 0, 1.0), (1.3, 5, 1.0), (0.5, 0, 0.5), (2.0, 100, 0.99)]]

    def crowd(step):
        n = 1 + step % 5
        rows = list(logits_rows(n, vocab, seed=step))
        return rows, others[:n], [source(step * 10 + i) for i in range(n)], step % (n + 1)

    assert run(crowd) == alone
    assert len(set(alone)) > 1                                          # it did sample
    again = run(lambda step: ([], [], [], 0))
    assert again == alone                                               # same seed, same tokens


def test_different_seeds_differ():
    x = torch.zeros(1, 1000)                                            # uniform: every draw is fresh
    p = [SamplingParams(temperature=1.0)]
    ga, gb = make_generator(1), make_generator(2)
    a = [int(sample(x, p, [ga])[0]) for _ in range(20)]
    b = [int(sample(x, p, [gb])[0]) for _ in range(20)]
    assert a != b


def test_top_k_draws_only_from_top_k_with_the_right_frequencies():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    x = probs.log()[None]
    p = [SamplingParams(temperature=1.0, top_k=3)]
    g = make_generator(7)
    counts = torch.bincount(torch.tensor([int(sample(x, p, [g])[0]) for _ in range(3000)]), minlength=5)
    assert counts[3] == 0 and counts[4] == 0
    expected = torch.tensor([0.4, 0.3, 0.2]) / 0.9 * 3000
    assert torch.all((counts[:3] - expected).abs() < 5 * expected.sqrt())   # within 5 sigma


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    x = probs.log()
    # (0.5 + 0.3 is 0.8 only in real numbers: at top_p=0.8 rounding decides, so the test stays off it)
    assert top_k_top_p_mask(x, SamplingParams(top_p=0.79)).tolist() == [True, True, False, False]
    assert top_k_top_p_mask(x, SamplingParams(top_p=0.81)).tolist() == [True, True, True, False]
    assert top_k_top_p_mask(x, SamplingParams(top_p=0.3)).tolist() == [True, False, False, False]
    assert top_k_top_p_mask(x, SamplingParams(top_k=3, top_p=0.9)).tolist() == [True, True, True, False]
    g = make_generator(3)
    drawn = {int(sample(x[None], [SamplingParams(top_p=0.79)], [g])[0]) for _ in range(500)}
    assert drawn == {0, 1}


def test_temperature_sharpens_and_flattens():
    x = torch.tensor([[2.0, 1.0, 0.0]])
    g = make_generator(5)
    cold = [int(sample(x, [SamplingParams(temperature=0.05)], [g])[0]) for _ in range(200)]
    assert set(cold) == {0}
    hot = [int(sample(x, [SamplingParams(temperature=50.0)], [g])[0]) for _ in range(300)]
    assert set(hot) == {0, 1, 2}


def test_sample_argument_mismatch():
    with pytest.raises(KvosError, match="^EINVAL: sample: 2 rows, 1 params"):
        sample(torch.zeros(2, 4), [SamplingParams()], [make_generator(0)])


def test_greedy_rows_pick_torchs_argmax():
    """kernel/sampling.py takes numpy's argmax on CPU float32 rows (8x faster): the same token as
    torch's for ties (the first), -inf rows and NaN (the first NaN), and torch's on other rows."""
    from kernel.sampling import _argmax_rows
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(6, 1000, generator=g)
    rows[1, 10] = rows[1, 900] = 50.0                    # a tie: the first
    rows[2] = -math.inf
    rows[3, 7] = rows[3, 20] = float("nan")
    rows[4, 999] = math.inf
    for x in (rows, rows[:, ::2], rows.double(), rows.bfloat16()):
        assert torch.equal(_argmax_rows(x), x.argmax(dim=-1))


def test_uniforms_are_the_generators_draws_in_order():
    stream, g = Uniforms(77), make_generator(77)
    first = [stream.next() for _ in range(Uniforms.BATCH + 5)]
    expected = torch.rand(Uniforms.BATCH, dtype=torch.float64, generator=g).tolist()
    assert first[:Uniforms.BATCH] == expected
    assert first[Uniforms.BATCH:] == torch.rand(Uniforms.BATCH, dtype=torch.float64, generator=g).tolist()[:5]
