"""kernel.ops.panel_mm on bfloat16 panels (csrc/cpu/panel_bf16.c) against its twin reference.panel_mm.

Random shapes (hypothesis): M 1..64 (every register-tile remainder), odd K (a zero-padded last
k-pair) and odd N (a padded last panel), strided rows of x and out, bias, accumulate, x given in
float32 (rounded inside) or bfloat16; the vdpbf16ps code and the plain-C code give the same bits
(both add each pair's odd product, then its even one, in float32); results do not depend on the
thread count nor on the other rows (k-blocks across row tiles keep each sum's order); bad
arguments are refused before any write; packing round-trips W rounded to bf16.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel import ops
from kernel.errors import EINVAL, KvosError
from kernel.ops import cpu, reference
from kernel.ops.panel import PANEL
from userspace.programs import qlinear

pytestmark = pytest.mark.usefixtures("each_isa_cap")   # every vector path this CPU has (conftest.py)

BF16 = torch.bfloat16
PATHS = ["auto", "portable"] + (["dp"] if cpu.panel_bf16_has_dp() else [])   # uncapped; each_isa_cap may cap


def dp_runs_here(path) -> bool:
    """Whether path can run under the ISA cap now in force ("dp" needs AVX512_BF16, uncapped)."""
    return path != "dp" or cpu.panel_bf16_has_dp()


def close(ours, want, x, w):
    """float32 sums of exact bf16 products against float64 ones: a few float32 ulps of the sum of
    |terms| per output (the twin rounds x and W to bf16 exactly as the kernel does)."""
    scale = x.to(BF16).double().abs() @ w.double().abs().t()
    bound = 4e-7 * (x.shape[1] ** 0.5 + 1) * scale + 1e-6
    err = (ours.double() - want.double()).abs()
    assert bool((err <= bound + 1e-6 * want.double().abs()).all()), err.max()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 64), k=st.integers(1, 300), n=st.integers(1, 200), seed=st.integers(0, 2**31 - 1),
       bias=st.booleans(), accumulate=st.booleans(), x_pad=st.integers(0, 5), out_pad=st.integers(0, 5),
       x_bf16=st.booleans(), path=st.sampled_from(PATHS))
def test_matches_the_twin(m, k, n, seed, bias, accumulate, x_pad, out_pad, x_bf16, path):
    if not dp_runs_here(path):
        path = "auto"
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k + x_pad, generator=g)[:, :k]                   # rows at a stride > k
    if x_bf16:
        x = x.to(BF16)
    b = torch.randn(n, generator=g) if bias else None
    base = torch.randn(m, n + out_pad, generator=g)
    out = base[:, :n]
    packed = ops.panel_pack(w, BF16)
    want = reference.panel_mm(x, packed, n, b, out.clone(), accumulate)
    beside = base[:, n:].clone()
    got = ops.panel_mm(x, packed, n, b, out, accumulate, path=path)
    assert got is out
    close(out, want, x, ops.panel_unpack(packed, n, k).float())
    assert torch.equal(base[:, n:], beside)                  # the columns past n are never written


@pytest.mark.skipif(not cpu.panel_bf16_has_dp(), reason="this CPU has no AVX512_BF16")
@pytest.mark.parametrize("m, k, n", [(1, 576, 960), (7, 577, 130), (64, 1536, 576), (13, 3, 65)])
def test_dp_and_portable_give_the_same_bits(m, k, n):
    if not dp_runs_here("dp"):
        pytest.skip("AVX512_BF16 is capped off in this run")
    g = torch.Generator().manual_seed(k)
    w, x, b = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    packed = ops.panel_pack(w, BF16)
    assert torch.equal(ops.panel_mm(x, packed, n, b, path="dp"), ops.panel_mm(x, packed, n, b, path="portable"))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m, k", [(2, 129), (7, 129), (12, 300), (64, 300), (65, 300), (70, 1)])
def test_a_row_does_not_depend_on_the_others(path, m, k):
    """From 7 to 12 rows the kernel runs k in blocks across row tiles and parks the sums between blocks
    (the AVX2 path: up to 64 rows, row after row over blocks); each output is still one sum in k
    order, so every row equals the same row computed alone."""
    if not dp_runs_here(path):
        pytest.skip("AVX512_BF16 is capped off in this run")
    g = torch.Generator().manual_seed(m)
    w, x, b = torch.randn(150, k, generator=g), torch.randn(m, k, generator=g), torch.randn(150, generator=g)
    packed = ops.panel_pack(w, BF16)
    whole = ops.panel_mm(x, packed, 150, b, path=path)
    for r in range(m):
        assert torch.equal(whole[r:r + 1], ops.panel_mm(x[r:r + 1], packed, 150, b, path=path)), r


def test_float32_x_is_rounded_as_torch_rounds_it():
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(100, 51, generator=g), torch.randn(5, 51, generator=g)
    packed = ops.panel_pack(w, BF16)
    assert torch.equal(ops.panel_mm(x, packed, 100), ops.panel_mm(x.to(BF16), packed, 100))
    x[0, 0] = float("nan")                                   # a NaN stays a NaN through the rounding
    assert bool(ops.panel_mm(x, packed, 100)[0].isnan().all())


@pytest.mark.parametrize("m", [1, 7, 64])
def test_thread_count_changes_nothing(m):
    g = torch.Generator().manual_seed(m)
    w, x = torch.randn(700, 321, generator=g), torch.randn(m, 321, generator=g)
    packed = ops.panel_pack(w, BF16)
    before = cpu.num_threads()
    try:
        cpu.set_num_threads(1)
        one = ops.panel_mm(x, packed, 700)
        cpu.set_num_threads(2)
        two = ops.panel_mm(x, packed, 700)
    finally:
        cpu.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("k", [5, 6])
def test_pack_round_trips_and_pads_with_zeros(k):
    w = torch.randn(PANEL + 3, k)
    packed = ops.panel_pack(w, BF16)
    assert packed.shape == (2, 3, 2 * PANEL) and packed.dtype == BF16
    assert torch.equal(ops.panel_unpack(packed, PANEL + 3, k), w.to(BF16))
    assert torch.equal(ops.panel_pack(w.to(BF16), BF16), packed)         # bf16 in: the same bits
    full = ops.panel_unpack(packed, 2 * PANEL)
    assert torch.count_nonzero(full[PANEL + 3:]) == 0 and torch.count_nonzero(full[:, k:]) == 0


def test_panel_linear_in_bf16():
    w = torch.randn(200, 25)
    layer = qlinear.PanelLinear.from_float(w, BF16)
    assert layer.dtype == BF16 and layer.shape == (200, 25)
    ids = torch.tensor([0, 63, 64, 199, 5, 5], dtype=torch.int32)
    rows = qlinear.embedding(ids, layer)
    assert rows.dtype == torch.float32 and torch.equal(rows, w.to(BF16).float()[ids.long()])
    assert torch.equal(layer.dequantize(), w.to(BF16).float())
    x, h = torch.randn(3, 200), torch.randn(3, 25)
    y = x.clone()
    qlinear.add_mm(y, h, layer)
    close(y - x, h.to(BF16).float() @ w.to(BF16).float().t(), h, w.to(BF16).float())
    logits = qlinear.head(h, layer, BF16)
    assert logits.dtype == torch.float32
    close(logits, reference.panel_mm(h, layer.packed, 200), h, w.to(BF16).float())


def bad_calls():
    w = torch.randn(100, 16)
    p = ops.panel_pack(w, BF16)
    x = torch.randn(3, 16)
    out = torch.zeros(3, 100)
    yield "k", lambda: ops.panel_mm(torch.randn(3, 14), p, 100, out=out)
    yield "k", lambda: ops.panel_mm(torch.randn(3, 17), p, 100, out=out)
    yield "n", lambda: ops.panel_mm(x, p, 129, out=out)
    yield "dtype", lambda: ops.panel_mm(x.half(), p, 100, out=out)
    yield "dtype", lambda: ops.panel_mm(x, p, 100, out=out.to(BF16))
    yield "dtype", lambda: ops.panel_mm(x.to(BF16), ops.panel_pack(w), 100, out=out)   # bf16 x: bf16 panels only
    yield "contiguous last", lambda: ops.panel_mm(torch.randn(16, 3).t(), p, 100, out=out)
    yield "out has shape", lambda: ops.panel_mm(x, p, 100, out=torch.zeros(3, 99))
    yield "shares memory with x", lambda: ops.panel_mm(out[:, :16], p, 100, out=out)
    yield "bias", lambda: ops.panel_mm(x, p, 100, bias=torch.zeros(99), out=out)
    yield "dtype", lambda: ops.panel_mm(x, p, 100, bias=torch.zeros(100, dtype=BF16), out=out)
    yield "packed", lambda: ops.panel_mm(x, p[..., :64], 100, out=out)
    yield "packed", lambda: ops.panel_mm(x, p.transpose(0, 1), 100, out=out)
    yield "path", lambda: ops.panel_mm(x, p, 100, out=out, path="fast")
    yield "float32 or bfloat16", lambda: ops.panel_pack(w, torch.float16)
    yield "pairs", lambda: ops.panel_unpack(p, 100, 14)


@pytest.mark.parametrize("i", range(len(list(bad_calls()))), ids=[r for r, _ in bad_calls()])
def test_bad_arguments_are_refused_before_any_write(i):
    reason, call = list(bad_calls())[i]
    with pytest.raises(KvosError, match=reason) as e:
        call()
    assert e.value.errno == EINVAL


def test_refusal_leaves_out_untouched():
    p = ops.panel_pack(torch.randn(100, 16), BF16)
    out = torch.full((3, 100), 7.0)
    for bad in (dict(bias=torch.zeros(100, dtype=torch.float64)), dict(path="fast")):
        with pytest.raises(KvosError):
            ops.panel_mm(torch.randn(3, 16), p, 100, out=out, **bad)
    assert bool((out == 7.0).all())


def test_empty_shapes():
    p = ops.panel_pack(torch.randn(10, 4), BF16)
    assert ops.panel_mm(torch.randn(0, 4), p, 10).shape == (0, 10)
    empty = ops.panel_pack(torch.randn(10, 0), BF16)
    assert empty.shape == (1, 0, 2 * PANEL)
    b = torch.randn(10)
    assert torch.equal(ops.panel_mm(torch.randn(2, 0), empty, 10, b), b.expand(2, 10))
