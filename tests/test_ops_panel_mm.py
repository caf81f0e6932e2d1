"""kernel.ops.panel_mm (csrc/cpu/panel_mm.c) against its plain-torch twin reference.panel_mm.

Random shapes (hypothesis): M 1..64 (every register-tile remainder, the AVX2 path's row blocks),
odd K and N (a padded last panel), strided rows of x and out, bias, accumulate; results must not
depend on the thread count (each output is one FMA chain over k, whoever computes it), nor a row's
on the other rows; bad arguments are refused before any write; packing round-trips exactly, and a
tied embedding's rows come back bit for bit. Narrow panels (16 columns, a LoRA adapter's A) give the
wide panels' bits.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel import ops
from kernel.errors import EINVAL, KvosError
from kernel.ops import reference
from kernel.ops.panel import NARROW, PANEL
from userspace.programs import qlinear

pytestmark = pytest.mark.usefixtures("each_isa_cap")   # every vector path this CPU has (conftest.py)


def close(ours, want, k):
    """FMA chains in another order than torch's: a few ulps of the sum of |terms| per output."""
    tol = 1e-5 * (k ** 0.5 + 1)
    assert torch.allclose(ours, want, rtol=tol, atol=tol), (ours - want).abs().max()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 64), k=st.integers(1, 300), n=st.integers(1, 200), seed=st.integers(0, 2**31 - 1),
       bias=st.booleans(), accumulate=st.booleans(), x_pad=st.integers(0, 5), out_pad=st.integers(0, 5),
       width=st.sampled_from([PANEL, NARROW]))
def test_matches_the_twin(m, k, n, seed, bias, accumulate, x_pad, out_pad, width):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k + x_pad, generator=g)[:, :k]                   # rows at a stride > k
    b = torch.randn(n, generator=g) if bias else None
    base = torch.randn(m, n + out_pad, generator=g)
    out = base[:, :n]
    packed = ops.panel_pack(w, width=width)
    want = reference.panel_mm(x, packed, n, b, out.clone(), accumulate)
    beside = base[:, n:].clone()
    got = ops.panel_mm(x, packed, n, b, out, accumulate)
    assert got is out
    close(out, want, k)
    assert torch.equal(base[:, n:], beside)                  # the columns past n are never written


def test_new_output_and_the_twin_agree_without_out():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(131, 77, generator=g), torch.randn(9, 77, generator=g)
    close(ops.panel_mm(x, ops.panel_pack(w), 131), x @ w.t(), 77)


@pytest.mark.parametrize("m", [1, 7, 64])
def test_thread_count_changes_nothing(m):
    g = torch.Generator().manual_seed(m)
    w, x = torch.randn(700, 321, generator=g), torch.randn(m, 321, generator=g)
    packed = ops.panel_pack(w)
    from kernel.ops import cpu
    before = cpu.num_threads()
    try:
        cpu.set_num_threads(1)
        one = ops.panel_mm(x, packed, 700)
        cpu.set_num_threads(2)
        two = ops.panel_mm(x, packed, 700)
    finally:
        cpu.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("m", [2, 5, 8, 63, 64, 65, 130])
def test_a_row_does_not_depend_on_the_other_rows(m):
    """Each output is one FMA chain over k in order, whatever path the rows take (one row, the AVX2
    row blocks up to 64 rows, the tiles beyond): a row computed with others equals it computed alone,
    to the bit. So a process's logits do not depend on who shares its step."""
    g = torch.Generator().manual_seed(m)
    w, x = torch.randn(200, 333, generator=g), torch.randn(m, 333, generator=g)
    b = torch.randn(200, generator=g)
    packed = ops.panel_pack(w)
    together = ops.panel_mm(x, packed, 200, b)
    for i in range(m):
        assert torch.equal(together[i:i + 1], ops.panel_mm(x[i:i + 1], packed, 200, b)), i


def test_pack_round_trips_and_pads_with_zeros():
    w = torch.randn(PANEL + 3, 5)
    packed = ops.panel_pack(w)
    assert packed.shape == (2, 5, PANEL)
    assert torch.equal(ops.panel_unpack(packed, PANEL + 3), w)
    assert torch.count_nonzero(packed[1, :, 3:]) == 0


def test_panel_linear_rows_are_the_embedding():
    w = torch.randn(200, 24)
    layer = qlinear.PanelLinear.from_float(w)
    ids = torch.tensor([0, 63, 64, 199, 5, 5], dtype=torch.int32)
    assert torch.equal(qlinear.embedding(ids, layer), w[ids.long()])
    assert torch.equal(layer.dequantize(), w)
    x = torch.randn(3, 200)
    h = torch.randn(3, 24)
    y = x.clone()
    qlinear.add_mm(y, h, layer)
    close(y, x + h @ w.t(), 24)


@pytest.mark.parametrize("n", [1, 8, 17, 24, 40])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 20])
def test_narrow_panels_give_the_wide_panels_bits(m, n):
    """The same FMA chain over k in order for every output, 16 columns a panel instead of 64."""
    g = torch.Generator().manual_seed(10 * m + n)
    w, x, b = torch.randn(n, 1536, generator=g), torch.randn(m, 1536, generator=g), torch.randn(n, generator=g)
    narrow = ops.panel_pack(w, width=NARROW)
    assert tuple(narrow.shape) == (-(-n // NARROW), 1536, NARROW)
    assert torch.equal(ops.panel_unpack(narrow, n), w)
    assert torch.equal(ops.panel_mm(x, narrow, n, b), ops.panel_mm(x, ops.panel_pack(w), n, b))


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("m", [1, 3, 8, 20, 70])
def test_k_ranges_skip_zero_rows_with_the_whole_panels_bits(m, accumulate):
    """kvos_panel_mm_kranges (a LoRA delta's B in the C layer loop): a block-diagonal B of three pieces
    (q, k, v of 8 rank rows each over 576, 192 and 192 columns, as SmolLM2's qkv slot, plus a piece
    straddling two panels and columns no piece writes) reads only each panel's nonzero k rows
    (kernel/ops/step_ops._nonzero_k) and gives kvos_panel_mm's bits over the whole panels."""
    from kernel.ops import cpu
    from kernel.ops.step_ops import _nonzero_k
    lib, ffi = cpu._load().lib, cpu._ext.ffi
    g = torch.Generator().manual_seed(m)
    pieces = [(0, 576), (576, 768), (768, 960), (1000, 1100)]     # then 1100..1300: no piece
    r, n = 8 * len(pieces), 1300
    w = torch.zeros(n, r)
    for i, (start, end) in enumerate(pieces):
        w[start:end, 8 * i:8 * i + 8] = torch.randn(end - start, 8, generator=g)
    packed = ops.panel_pack(w)
    kr = _nonzero_k(packed)
    assert kr[0].tolist() == [0, 8] and kr[9].tolist() == [8, 16] and kr[15].tolist() == [24, 32]
    assert kr[-1].tolist() == [0, 0]                             # columns 1280..1299: all zero
    x = torch.randn(m, r, generator=g)
    start = torch.randn(m, n, generator=g)
    want, got = start.clone(), start.clone()
    lib.kvos_panel_mm(cpu._ptr(want), n, cpu._ptr(x), r, cpu._ptr(packed), ffi.NULL, m, r, n, int(accumulate))
    lib.kvos_panel_mm_kranges(cpu._ptr(got), n, cpu._ptr(x), r, cpu._ptr(packed),
                              ffi.cast("int32_t *", kr.data_ptr()), m, r, n, int(accumulate))
    assert torch.equal(got, want)


def bad_calls():
    w = torch.randn(100, 16)
    p = ops.panel_pack(w)
    x = torch.randn(3, 16)
    out = torch.zeros(3, 100)
    yield "k", lambda: ops.panel_mm(torch.randn(3, 15), p, 100, out=out)
    yield "n", lambda: ops.panel_mm(x, p, 129, out=out)
    yield "n", lambda: ops.panel_mm(x, p, 64, out=out)
    yield "dtype", lambda: ops.panel_mm(x.double(), p, 100, out=out)
    yield "contiguous last", lambda: ops.panel_mm(torch.randn(16, 3).t(), p, 100, out=out)
    yield "out has shape", lambda: ops.panel_mm(x, p, 100, out=torch.zeros(3, 99))
    yield "overlap each other", lambda: ops.panel_mm(x, p, 100, out=torch.zeros(200).as_strided((3, 100), (50, 1)))
    yield "shares memory with x", lambda: ops.panel_mm(out[:, :16], p, 100, out=out)
    yield "bias", lambda: ops.panel_mm(x, p, 100, bias=torch.zeros(99), out=out)
    yield "accumulate", lambda: ops.panel_mm(x, p, 100, accumulate=True)
    yield "packed", lambda: ops.panel_mm(x, p.transpose(0, 1), 100, out=out)
    yield "packed", lambda: ops.panel_mm(x, p[..., :32], 100, out=out)
    yield "2 dimensions", lambda: ops.panel_mm(x[0], p, 100, out=out)
    yield "cpu", lambda: ops.panel_mm(x.to("meta"), p, 100, out=out)
    narrow = ops.panel_pack(w, width=NARROW)         # 7 panels of 16: n in 97..112
    yield "panels of 16 columns", lambda: ops.panel_mm(x, narrow, 113, out=torch.zeros(3, 113))
    yield "panels of 16 columns", lambda: ops.panel_mm(x, narrow, 96, out=torch.zeros(3, 96))
    yield "wide", lambda: ops.panel_pack(w, width=32)
    yield "wide", lambda: ops.panel_pack(w, torch.bfloat16, width=NARROW)


@pytest.mark.parametrize("i", range(len(list(bad_calls()))), ids=[r for r, _ in bad_calls()])
def test_bad_arguments_are_refused_before_any_write(i):
    reason, call = list(bad_calls())[i]
    with pytest.raises(KvosError, match=reason) as e:
        call()
    assert e.value.errno == EINVAL


def test_refusal_leaves_out_untouched():
    p = ops.panel_pack(torch.randn(100, 16))
    out = torch.full((3, 100), 7.0)
    with pytest.raises(KvosError):
        ops.panel_mm(torch.randn(3, 16), p, 100, bias=torch.zeros(100, dtype=torch.float64), out=out)
    assert bool((out == 7.0).all())


def test_empty_shapes():
    p = ops.panel_pack(torch.randn(10, 4))
    assert ops.panel_mm(torch.randn(0, 4), p, 10).shape == (0, 10)
    empty = ops.panel_pack(torch.randn(10, 0))
    b = torch.randn(10)
    assert torch.equal(ops.panel_mm(torch.randn(2, 0), empty, 10, b), b.expand(2, 10))
