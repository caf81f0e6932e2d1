"""ops.qmm (csrc/cpu/qmm.c) against its plain-torch twin reference.qmm, on random shapes.

The twin quantizes x exactly as the kernel does (per 32-block d = amax / 127, codes rounded half to
even), so both multiply the same integers; what is left is the kernel's float32 arithmetic. Every
term d_w u x_q d_x (and m_w d_x sum(x_q)) passes through at most 2 K/32 + 2 float32 roundings (the
integer dot is exact; its product with d_x, the FMA with d_w, then two FMAs into the running sum per
later block), each at most 2^-24 relative. So |y - twin| <= (K/32 + 16) 2^-23 B = (2 K/32 + 32) 2^-24 B,
where B = (|d_w u| + |m_w|) @ |x_dequantized| bounds the sum of the terms' magnitudes (the worst case
and 30 roundings more, no fudge). A code off by one would
cost about d_x d_w, far outside it for these shapes.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel import ops
from kernel.errors import KvosError
from kernel.ops import cpu, reference
from kernel.ops import qblocks as Q

PATHS = (["portable"] + (["vnni"] if cpu.qmm_has_vnni() else []) + (["avx2"] if cpu.qmm_has_avx2() else [])
         + (["amx"] if cpu.qmm_has_amx() else []))


def weights(n, k, bits, g):
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    d = torch.rand(n, k // 32, generator=g) * 0.02 + 1e-4
    m = torch.randn(n, k // 32, generator=g) * 0.1
    return codes, d.half().float(), m.half().float()


def bound(x, codes, d, m):
    q, dx = reference.qmm_quantize_rows(x)
    xd = (q * dx.repeat_interleave(32, dim=1)).double().abs()
    w = (codes * d.repeat_interleave(32, dim=1)).double().abs() + m.repeat_interleave(32, dim=1).double().abs()
    k = x.shape[1]
    return ((k // 32 + 16) * 2.0 ** -23 * (xd @ w.t())).float() + 1e-30


def check(y, x, codes, d, m):
    want = reference.qmm(x, codes, d, m)
    err = (y - want).abs()
    tol = bound(x, codes, d, m)
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g}, worst ratio {(err / tol).max().item():.3g}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 64), n=st.integers(1, 41), blocks=st.integers(1, 24), bits=st.sampled_from([4, 8]),
       seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-3, 1.0, 30.0]))
def test_qmm_matches_its_twin(rows, n, blocks, bits, seed, scale):
    g = torch.Generator().manual_seed(seed)
    k = 32 * blocks
    codes, d, m = weights(n, k, bits, g)
    x = torch.randn(rows, k, generator=g) * scale
    x[:, :32] = 0 if blocks > 2 else x[:, :32]          # an all-zero block: d = 0, codes 0
    packed = Q.qmm_pack(codes, d, m, bits)
    assert tuple(packed.shape) == Q.packed_shape(n, k, bits)
    for path in PATHS:
        check(ops.qmm(x, packed, n, bits, path=path), x, codes, d, m)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes, d, m = weights(13, 96, bits, g)
    c2, d2, m2 = Q.qmm_unpack(Q.qmm_pack(codes, d, m, bits), 13, 96, bits)
    assert torch.equal(c2, codes.int()) and torch.equal(d2, d) and torch.equal(m2, m)


@pytest.mark.parametrize("bits", [4, 8])
def test_rows_read_from_the_records_are_the_unpacked_values(bits):
    """qmm_rows (a tied embedding's lookup on its head's blocks) gives d * u + m of the rows asked
    for, repeats and the last, partial tile's columns included; bad ids are refused."""
    g = torch.Generator().manual_seed(bits + 10)
    codes, d, m = weights(37, 96, bits, g)
    packed = Q.qmm_pack(codes, d, m, bits)
    c2, d2, m2 = Q.qmm_unpack(packed, 37, 96, bits)
    every = (c2.float().view(37, -1, 32) * d2.unsqueeze(-1) + m2.unsqueeze(-1)).view(37, 96)
    ids = torch.tensor([36, 0, 15, 16, 36, 5, 32])
    got = Q.qmm_rows(packed, ids, 37, 96, bits)
    assert torch.equal(got, reference.qmm_rows(packed, ids, 37, 96, bits))
    assert torch.allclose(got, every[ids], rtol=1e-6, atol=0)     # the twin rounds d * u and + m apart
    assert torch.equal(Q.qmm_rows(packed, ids.int(), 37, 96, bits), got)
    # Q8_0 blocks (u = q + 128, m = -128 d): every rounding is exact, so the rows are q * d to the bit
    q = torch.randint(-127, 128, (37, 96), generator=g)
    dq = (torch.rand(37, 3, generator=g) * 0.01).half().float()
    p8 = Q.qmm_pack(q + 128, dq, -128 * dq, 8)
    assert torch.equal(Q.qmm_rows(p8, ids, 37, 96, 8), (q.float().view(37, 3, 32) * dq.unsqueeze(-1)).view(37, 96)[ids])
    assert Q.qmm_rows(packed, torch.tensor([], dtype=torch.long), 37, 96, bits).shape == (0, 96)
    for bad, match in ((torch.tensor([37]), "0..36"), (torch.tensor([-1]), "0..36"),
                       (torch.tensor([1.0]), "dtype"), (torch.tensor([[1]]), "dimension")):
        with pytest.raises(KvosError, match=match):
            Q.qmm_rows(packed, bad, 37, 96, bits)


@pytest.mark.skipif(len(PATHS) < 2, reason="this CPU has neither AVX-512 VNNI nor AVX2")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 2, 5, 9, 16, 37, 64])
def test_the_vector_paths_give_the_portable_paths_bits(bits, rows):
    """The same integer dots (vpdpbusd, vpmaddubsw + vpmaddwd with 8-bit codes recentred, or AMX's
    tdpbsud on 16-row groups with the rest on VNNI) and the same float operations in the same order:
    every path's outputs are the portable path's, bit for bit."""
    g = torch.Generator().manual_seed(7)
    codes, d, m = weights(37, 576, bits, g)
    codes[:, :32] = (1 << bits) - 1                     # the largest codes against the largest activations:
    packed = Q.qmm_pack(codes, d, m, bits)              # 8-bit pairs would overflow int16 without the recentring
    x = torch.randn(rows, 576, generator=g)
    x[:, :32] = 5.0
    want = ops.qmm(x, packed, 37, bits, path="portable")
    for path in PATHS[1:]:
        got = ops.qmm(x, packed, 37, bits, path=path)
        assert torch.equal(got, want), f"{path}: {int((got != want).sum())} outputs differ"


@pytest.mark.parametrize("bits,rows", [(4, 6), (4, 45), (8, 64), (8, 19)])
def test_thread_counts_agree(bits, rows):
    g = torch.Generator().manual_seed(3)
    codes, d, m = weights(301, 1536, bits, g)
    packed = Q.qmm_pack(codes, d, m, bits)
    x = torch.randn(rows, 1536, generator=g)
    before, outs = cpu.num_threads(), []
    try:
        for threads in (1, 2, 3):
            ops.set_num_threads(threads)
            outs.append(ops.qmm(x, packed, 301, bits))
    finally:
        ops.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2]), "results depend on the thread count"


def test_strided_rows_and_out():
    g = torch.Generator().manual_seed(5)
    codes, d, m = weights(10, 64, 8, g)
    packed = Q.qmm_pack(codes, d, m, 8)
    big = torch.randn(3, 100, generator=g)
    x = big[:, 10:74]                                   # row stride 100
    out = torch.full((3, 16), 7.0)[:, 2:12]             # row stride 16
    ops.qmm(x, packed, 10, 8, out=out)
    check(out, x.contiguous(), codes, d, m)


def test_bad_arguments_are_refused_and_write_nothing():
    codes = torch.randint(0, 16, (8, 64))
    d, m = torch.rand(8, 2), torch.rand(8, 2)
    packed = Q.qmm_pack(codes, d, m, 4)
    out = torch.full((2, 8), 5.0)
    x = torch.randn(2, 64)
    bad_calls = {
        "float32": lambda: ops.qmm(x.double(), packed, 8, 4, out=out),
        "dimensions": lambda: ops.qmm(x[0], packed, 8, 4, out=out),
        "packed has shape": lambda: ops.qmm(torch.randn(2, 96), packed, 8, 4, out=out),
        "expected": lambda: ops.qmm(x, packed, 17, 4, out=out),
        "bit": lambda: ops.qmm(x, packed, 8, 5, out=out),
        "positive column": lambda: ops.qmm(x, packed, 0, 4, out=out),
        "out has shape": lambda: ops.qmm(x, packed, 8, 4, out=out[:, :7]),
        "path": lambda: ops.qmm(x, packed, 8, 4, path="fast", out=out),
        "uint8": lambda: ops.qmm(x, packed.int(), 8, 4, out=out),
        "contiguous last": lambda: ops.qmm(x, packed, 8, 4, out=torch.full((8, 2), 5.0).t()),
    }
    for match, call in bad_calls.items():
        with pytest.raises(KvosError, match=match):
            call()
    assert bool((out == 5.0).all())
    # the same refusals without out= (the call the layers make, which has a cheaper check)
    rb = packed.shape[2]
    for match, call in {"float32": lambda: ops.qmm(x.double(), packed, 8, 4),
                        "dimensions": lambda: ops.qmm(x[0], packed, 8, 4),
                        "packed has shape": lambda: ops.qmm(torch.randn(2, 96), packed, 8, 4),
                        "expected": lambda: ops.qmm(x, packed, 17, 4),
                        "bit": lambda: ops.qmm(x, packed, 8, 5),
                        "positive column": lambda: ops.qmm(x, packed, -4, 4),
                        "uint8": lambda: ops.qmm(x, packed.view(torch.int8), 8, 4),
                        "contiguous": lambda: ops.qmm(x, torch.cat([packed, packed], dim=2)[:, :, :rb], 8, 4),
                        "torch.Tensor": lambda: ops.qmm(x.numpy(), packed, 8, 4)}.items():
        with pytest.raises(KvosError, match=match):
            call()
    with pytest.raises(KvosError, match="0..15"):
        Q.qmm_pack(codes + 1, d, m, 4)
    with pytest.raises(KvosError, match="multiple of 32"):
        Q.qmm_pack(codes[:, :48], d, m, 4)
    with pytest.raises(KvosError, match="shape"):
        Q.qmm_pack(codes, d[:, :1], m, 4)
    with pytest.raises(KvosError, match="finite"):
        Q.qmm_pack(codes, d * 1e6, m, 4)
    with pytest.raises(KvosError, match="integer"):
        Q.qmm_pack(codes.float(), d, m, 4)


@pytest.mark.parametrize("bits", [4, 8])
def test_bound_weights_give_qmms_bits_and_refuse_what_it_refuses(bits):
    """QmmWeights (the layers' call, checked at load) against ops.qmm on every kind of x: dense rows
    take its own C call, the rest qmm's path, and each result is qmm's to the bit."""
    g = torch.Generator().manual_seed(11)
    codes, d, m = weights(40, 96, bits, g)
    packed = Q.qmm_pack(codes, d, m, bits)
    w = ops.QmmWeights(packed, 40, 96, bits)
    big = torch.randn(70, 200, generator=g)
    for x in (big[:1, :96].contiguous(), big[:9, :96].contiguous(), big[:64, :96].contiguous(),
              big[:5, 7:103], big[:3, :192:2], big[:0, :96]):
        assert torch.equal(w(x), ops.qmm(x, packed, 40, bits))
    for match, call in {"float32": lambda: w(big[:2, :96].double()), "dimensions": lambda: w(big[0, :96]),
                        "packed has shape": lambda: w(big[:2, :64])}.items():
        with pytest.raises(KvosError, match=match):
            call()
    with pytest.raises(KvosError, match="expected"):
        ops.QmmWeights(packed, 49, 96, bits)
    with pytest.raises(KvosError, match="contiguous"):
        ops.QmmWeights(torch.cat([packed, packed], dim=2)[:, :, :packed.shape[2]], 40, 96, bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_layout_is_the_documented_one(bits):
    """Record (tile, block): vector j byte 4c + i holds column c's element 4j + i (4-bit: j < 4 in
    the low nibble of vector j, j >= 4 in the high nibble of vector j - 4), then 16 fp16 d, 16 fp16 m."""
    n, k = 20, 64
    codes = (torch.arange(n * k).view(n, k) * 7 + 3) % (1 << bits)
    d = torch.arange(n * 2, dtype=torch.float32).view(n, 2) / 64 + 1
    m = -d / 2
    p = Q.qmm_pack(codes, d, m, bits)
    for col, e, blk in ((0, 0, 0), (5, 13, 1), (17, 31, 0), (19, 18, 1)):
        t, c, j, i = col // 16, col % 16, (e % 32) // 4, e % 4
        rec = p[t, blk]
        if bits == 8:
            got = int(rec[j * 64 + 4 * c + i])
        else:
            byte = int(rec[(j % 4) * 64 + 4 * c + i])
            got = byte & 15 if j < 4 else byte >> 4
        assert got == int(codes[col, blk * 32 + e])
        cb = Q.code_bytes(bits)
        scales = rec[cb:].view(torch.float16).float()
        assert scales[c] == d[col, blk] and scales[16 + c] == m[col, blk]
    assert bool((p[1, :, Q.code_bytes(bits) + 2 * 4:Q.code_bytes(bits) + 32] == 0).all()), "padding columns hold zeros"


@pytest.mark.parametrize("path", PATHS)
def test_activation_codes_are_the_twins_bit_for_bit(path):
    """Identity weights (8-bit, d = 1, m = 0) make y[r, c] = q[r, c] * d_x exactly, in the kernel
    (one rounding of an exact product) and in the twin: so each path's activation quantizer must
    give the twin's codes and scales bit for bit, ties (x / d = +-n.5, rounded to even) included."""
    g = torch.Generator().manual_seed(11)
    k = 64
    codes = torch.zeros(32, k, dtype=torch.int64)
    codes[:, :32] = torch.eye(32, dtype=torch.int64)    # column c reads element c of the first block
    d, m = torch.ones(32, 2), torch.zeros(32, 2)
    x = torch.randn(13, k, generator=g) * 3
    x[0, :32] = torch.arange(32) - 15.5                  # amax 15.5: d = 15.5 / 127, ties after division are rare
    x[1, :32] = torch.tensor([127.0] + [n + 0.5 for n in range(-15, 16)])   # d = 1: every x / d a tie
    x[2, :32] = 0.0                                      # d = 0: codes 0
    x[3, :32] = 1e-30                                    # subnormal scale
    packed = Q.qmm_pack(codes, d, m, 8)
    y = ops.qmm(x, packed, 32, 8, path=path)
    want = reference.qmm(x, codes, d, m)
    assert torch.equal(y, want), f"{int((y != want).sum())} outputs differ"


def test_vector_paths_say_what_the_cap_allows():
    """The benchmark's record of the code that ran (cpu.vector_paths) follows the ISA cap."""
    before = cpu.set_isa_cap("portable")
    try:
        assert set(cpu.vector_paths().values()) == {"portable"}
        if cpu.cpu_has_avx2():
            cpu.set_isa_cap("avx2")
            assert cpu.vector_paths() == {"qmm": "avx2", "panel_mm": "avx2", "panel_bf16": "portable",
                                          "attention": "avx2"}
        cpu.set_isa_cap("best")
        assert cpu.vector_paths()["qmm"].startswith("amx") == cpu.qmm_has_amx()
    finally:
        cpu.set_isa_cap(before)
