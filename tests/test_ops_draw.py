"""kernel/ops/draw.py: csrc/cpu/draw.c against its twin (reference.draw_tokens), the inverse CDF's
frequencies, the filters' thresholds and the argument checks."""
import math

import pytest
import torch

from kernel.errors import KvosError
from kernel.ops import cpu, reference
from kernel.ops.draw import draw_tokens


def twin(x, temperature, top_k, top_p, min_p, u):
    rows = x.shape[0]
    per_row = [torch.tensor(v if isinstance(v, list) else [v] * rows, dtype=d)
               for v, d in ((temperature, torch.float32), (top_k, torch.int32), (top_p, torch.float64),
                            (min_p, torch.float32))]
    per_row[1] = per_row[1].clamp(max=x.shape[1])
    per_row[3] = torch.log(per_row[3])
    return reference.draw_tokens(x, *per_row, u), reference.draw_weights(x, *per_row)


def rows_of(n, vocab, seed, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=g) * spread
    x[:, : max(1, vocab // 100)] += 6.0                 # a few likely tokens, as a model's rows have
    return x, torch.rand(n, dtype=torch.float64, generator=g)


def assert_as_twin(x, temperature, top_k, top_p, min_p, u):
    """C's token is the twin's, or (where float rounding differs: C's exp is kvos_exp2's polynomial)
    a token whose twin interval's edge lies within 1e-5 of the total mass of the uniform's target."""
    got = draw_tokens(x, *(v if isinstance(v, list) else [v] * x.shape[0] for v in (temperature, top_k, top_p, min_p)),
                      u)
    want, w = twin(x, temperature, top_k, top_p, min_p, u)
    cdf = w.double().cumsum(-1)
    for r in torch.nonzero(got != want).flatten().tolist():
        total = float(cdf[r, -1])
        target = float(u[r]) * total
        edges = [float(cdf[r, min(int(got[r]), int(want[r]))]), float(cdf[r, max(int(got[r]), int(want[r])) - 1])]
        assert min(abs(e - target) for e in edges) <= 1e-5 * total, (r, int(got[r]), int(want[r]))
    assert int((got != want).sum()) <= max(1, x.shape[0] // 100)
    return got


@pytest.mark.parametrize("vocab", [1, 15, 64, 65, 1000, 49152])
@pytest.mark.parametrize("params", [(0.8, 0, 1.0, 0.0), (1.0, 50, 1.0, 0.0), (0.7, 40, 0.95, 0.05),
                                    (1.5, 0, 0.99, 0.0), (0.3, 1000, 0.5, 0.1), (1.0, 0, 0.9, 1.0)])
def test_c_draws_the_twins_token(vocab, params):
    x, u = rows_of(64 if vocab < 49152 else 16, vocab, seed=vocab)
    assert_as_twin(x, *params, u)


def test_rows_mixing_parameters_and_odd_rows():
    x, u = rows_of(12, 300, seed=5)
    x[1, 10:] = -math.inf                               # a grammar's mask: 10 tokens left
    x[2] = -math.inf
    x[2, 7] = 1.0                                       # one token left
    x[3, 5] = math.nan                                  # a NaN row: its argmax (the NaN)
    x[4, 9] = math.inf                                  # an infinite max: its argmax
    x[5] = -math.inf                                    # nothing finite: argmax, token 0
    x[6] = x[6].bfloat16().float()                      # ties everywhere below the top
    x[7, :] = 2.0                                       # all tied: every token under each filter
    params = ([0.8, 1.0, 0.5, 1.0, 1.0, 1.0, 1.2, 1.0, 0.01, 100.0, 1.0, 0.7],
              [0, 5, 0, 0, 0, 0, 20, 3, 0, 0, 300, 299],
              [1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 0.7, 0.2, 1.0, 1.0, 1.0, 0.1],
              [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0])
    got = assert_as_twin(x, *params, u)
    assert int(got[1]) < 10 and int(got[2]) == 7 and int(got[3]) == 5 and int(got[4]) == 9 and int(got[5]) == 0


def test_ties_at_a_threshold_stay():
    x = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]])
    _, w = twin(x, 1.0, 2, 1.0, 0.0, torch.zeros(1))
    assert (w[0] > 0).tolist() == [True, True, True, True, False, False]      # top_k=2 keeps the tied 2nd
    seen = {int(draw_tokens(x, [1.0], [2], [1.0], [0.0], torch.tensor([v]))[0]) for v in (0.0, 0.5, 0.99, 0.999999)}
    assert seen <= {0, 1, 2, 3} and 3 in seen


def test_stratified_uniforms_give_the_twins_frequencies():
    """Inverse CDF on a grid of n uniforms: each token is drawn n x its probability times, within one."""
    x, _ = rows_of(1, 2000, seed=11, spread=2.0)
    n = 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for params in ((0.9, 0, 1.0, 0.0), (1.0, 100, 0.8, 0.01)):
        _, w = twin(x, *params, u[:1])
        p = w[0].double() / w[0].double().sum()
        got = draw_tokens(x.expand(n, -1), *([v] * n for v in params), u)
        counts = torch.bincount(got, minlength=2000).double()
        assert float((counts - n * p).abs().max()) <= 1.0 + 1e-6 * n
        assert bool((counts[p == 0] == 0).all())


def test_the_same_tokens_on_any_number_of_threads():
    x, u = rows_of(40, 5000, seed=3)
    before = cpu.num_threads()
    try:
        cpu.set_num_threads(1)
        one = draw_tokens(x, [0.9] * 40, [0] * 40, [0.9] * 40, [0.0] * 40, u)
        cpu.set_num_threads(2)
        two = draw_tokens(x, [0.9] * 40, [0] * 40, [0.9] * 40, [0.0] * 40, u)
    finally:
        cpu.set_num_threads(before)
    assert torch.equal(one, two)


def test_other_dtypes_and_strided_rows_take_the_same_contract():
    x, u = rows_of(8, 700, seed=9)
    xb = x.bfloat16()
    args = ([0.8] * 8, [0] * 8, [0.9] * 8, [0.0] * 8, u)
    assert torch.equal(draw_tokens(xb, *args), twin(xb.float(), 0.8, 0, 0.9, 0.0, u)[0])   # the twin runs
    wide = torch.zeros(8, 1400)
    wide[:, ::2] = x
    assert torch.equal(draw_tokens(wide[:, ::2], *args), draw_tokens(x, *args))


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=[0.0]), "temperature must be a finite number > 0"),
    (dict(temperature=[math.nan]), "temperature must be a finite number > 0"),
    (dict(top_k=[-1]), "top_k must be an integer >= 0"),
    (dict(top_k=[2.5]), "top_k must be an integer >= 0"),
    (dict(top_p=[0.0]), r"top_p must be in \(0, 1\]"),
    (dict(top_p=[1.5]), r"top_p must be in \(0, 1\]"),
    (dict(min_p=[-0.1]), r"min_p must be in \[0, 1\]"),
    (dict(u=[1.0]), r"u must be in \[0, 1\)"),
    (dict(u=[0.5, 0.5]), "u needs one value per row"),
    (dict(temperature=[True]), "temperature must be a finite number > 0"),
    (dict(temperature=["1"]), "temperature must be a finite number > 0"),
    (dict(top_k=[2**70]), "top_k must be an integer >= 0"),
    (dict(top_k=torch.tensor([1.0])), "top_k must be a 1-D integer tensor"),
    (dict(u=torch.tensor([[0.5]])), "u must be a 1-D real tensor"),
])
def test_bad_arguments_are_einval(bad, match):
    args = dict(temperature=[1.0], top_k=[0], top_p=[1.0], min_p=[0.0], u=[0.5])
    args.update(bad)
    with pytest.raises(KvosError, match=f"^EINVAL: draw_tokens: .*{match}"):
        draw_tokens(torch.zeros(1, 10), **args)
    with pytest.raises(KvosError, match="^EINVAL: "):
        draw_tokens(torch.zeros(10), [1.0], [0], [1.0], [0.0], [0.5])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rows_draw_the_cpu_token():
    """CUDA logits run the twin on the device: the token of C on the same rows, within the rounding
    rule above (the device's exp and sums are not the host's)."""
    x, u = rows_of(64, 49152, seed=21)
    args = ([0.8] * 64, [50] * 64, [0.95] * 64, [0.0] * 64, u)
    on_gpu = draw_tokens(x.cuda(), *args).cpu()
    assert int((on_gpu != draw_tokens(x, *args)).sum()) <= 1
