"""The fused layer ops (kernel/ops/fused.py, csrc/cuda/fused.cu): the CUDA kernels in the CPU emulation
against their twins in fp32, fp16 and bf16; the twins against the forward's own torch code (RMSNorm,
userspace's RoPE tables, SiLU); bad arguments refused before anything is written. (nvcc -arch=sm_90
compiles fused.cu in test_ops_cuda.py, with every other source.)"""
import types

import pytest
import torch
import torch.nn.functional as F

from kernel.errors import KvosError
from kernel.kvcache import KVView
from kernel.ops import cuda_fused, fused, reference
from tests import test_ops_cuda as base
from tests.test_ops_helpers import fresh_seed, make_batch, relative_error
from userspace.programs.rope import RopeTables

emulator, emulated = base.emulator, base.emulated   # the fixtures: g++ build of csrc/emu, CuPy stand-in
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rows(gen, tokens, width, dtype, pad=7):
    """(tokens, width) with a token stride wider than the row: a view, as the forward's slices are."""
    return torch.randn(tokens, width + pad, generator=gen)[:, :width].to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [576, 40])
def test_emulated_add_rms_norm_matches_twin(emulated, dtype, hidden):
    gen = torch.Generator().manual_seed(fresh_seed())
    residual, delta = rows(gen, 5, hidden, dtype), rows(gen, 5, hidden, dtype)
    weight = torch.randn(hidden, generator=gen).to(dtype)
    want_res, out = residual.clone(), torch.full((5, hidden), float("nan"), dtype=dtype)
    want = reference.add_rms_norm(want_res, delta, weight, 1e-5)
    cuda_fused.add_rms_norm(residual, delta, weight, 1e-5, out)
    assert torch.equal(residual, want_res)   # the same rounding of the same float sum
    assert relative_error(out, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_rope_write_kv_matches_twin(emulated, dtype):
    heads, kv_heads, head_dim, tokens = 9, 3, 64, 6
    batch = make_batch([1], [60], heads, kv_heads, head_dim, 16, dtype=dtype)
    gen = torch.Generator().manual_seed(batch.seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    freqs = torch.rand(100, head_dim // 2, generator=gen) * 50
    cos, sin = torch.cat((freqs, freqs), -1).cos().to(dtype), freqs.sin().to(dtype)
    positions = torch.randint(0, 100, (tokens,), generator=gen, dtype=torch.int32)
    slots = (batch.ours[:, None] * 16 + torch.arange(16)).flatten()
    slots = slots[torch.randperm(len(slots), generator=gen)[:tokens]].to(torch.int32)
    twin_pool, twin_q, k_before = batch.pool.clone(), q.clone(), k.clone()
    reference.rope_write_kv(twin_q, k, v, cos, sin, positions, *KVView(twin_pool, batch.view.shape).layer(1), slots)
    before = batch.pool.clone()
    cuda_fused.rope_write_kv(q, k, v, cos, sin, positions, *batch.caches, slots)
    assert torch.equal(k, k_before)
    assert relative_error(q, twin_q) < TOLERANCE[dtype]
    got, want = batch.caches, KVView(twin_pool, batch.view.shape).layer(1)
    for g, w in zip(got, want):
        assert relative_error(g[batch.ours], w[batch.ours]) < TOLERANCE[dtype]
    assert batch.untouched_outside_layer(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_silu_mul_matches_twin(emulated, dtype):
    gen = torch.Generator().manual_seed(fresh_seed())
    gate_up = rows(gen, 7, 2 * 300, dtype) * 4
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -30.0]).to(dtype)   # saturating SiLU stays finite
    out = torch.full((7, 300), float("nan"), dtype=dtype)
    cuda_fused.silu_mul(gate_up, out)
    assert relative_error(out, reference.silu_mul(gate_up)) < TOLERANCE[dtype]


def test_twins_compute_what_the_forward_computes():
    gen = torch.Generator().manual_seed(fresh_seed())
    x, d, w = torch.randn(4, 64, generator=gen), torch.randn(4, 64, generator=gen), torch.randn(64, generator=gen)
    r = x.clone()
    out = reference.add_rms_norm(r, d, w, 1e-6)
    assert torch.equal(r, x + d)
    assert torch.allclose(out, F.rms_norm(x + d, (64,), w, 1e-6), atol=1e-5)
    config = types.SimpleNamespace(head_dim=64, rope_theta=10000.0, rope_scaling={}, max_position_embeddings=512)
    tables = RopeTables(config, torch.float32, torch.device("cpu"))
    qk, positions = torch.randn(5, 4, 64, generator=gen), torch.tensor([0, 3, 511, 7, 100])
    want = tables.apply(qk, *tables.lookup(positions))
    assert torch.allclose(reference.rope(qk, tables.cos, tables.sin, positions), want, atol=1e-5)
    gu = torch.randn(3, 20, generator=gen)
    assert torch.allclose(reference.silu_mul(gu), F.silu(gu[:, :10]) * gu[:, 10:], atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 5, 300], ids=lambda t: f"{t}tok")   # 300: past the threads' threshold
@pytest.mark.parametrize("hidden", [576, 44])     # 44: SiLU's 8-lane loop and its scalar tail
def test_cpu_add_rms_norm_and_silu_match_twins(tokens, hidden):
    """csrc/cpu/fused.c against the twins: the residual to the bit (one float add), the norm and
    SiLU to float rounding (another summation order, a polynomial exp2); out may be the residual."""
    gen = torch.Generator().manual_seed(fresh_seed())
    residual, delta = rows(gen, tokens, hidden, torch.float32), rows(gen, tokens, hidden, torch.float32)
    weight = torch.randn(hidden, generator=gen)
    want_res = residual.clone()
    want = reference.add_rms_norm(want_res, delta, weight, 1e-5)
    out = torch.full((tokens, hidden), float("nan"))
    assert fused.add_rms_norm(residual, delta, weight, 1e-5, out) is out
    assert torch.equal(residual, want_res)
    assert relative_error(out, want) < 1e-6
    again = want_res.clone()
    fused.add_rms_norm(again, torch.zeros_like(delta), weight, 1e-5, out=again)    # in place
    assert relative_error(again, reference.add_rms_norm(want_res.clone(), torch.zeros_like(delta), weight, 1e-5)) < 1e-6
    gu = rows(gen, tokens, 2 * hidden, torch.float32) * 6
    got = fused.silu_mul(gu)
    assert relative_error(got, reference.silu_mul(gu)) < 1e-6
    assert relative_error(got, F.silu(gu[:, :hidden]) * gu[:, hidden:]) < 1e-6


def test_cpu_silu_saturates_without_nan():
    """Large |gate| in the 8-lane loop (the first 8) and in the scalar tail (the last 5)."""
    gate = torch.tensor([-1e4, -100.0, 0.0, 100.0, 1e4, -1e30, 1e30, 3.0, -1e4, -100.0, 0.0, 100.0, 1e4])
    gu = torch.cat([gate, torch.ones_like(gate)]).view(1, -1)
    got = fused.silu_mul(gu)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, F.silu(gate).view(1, -1), atol=1e-6)


def test_bf16_cpu_activations_run_the_twins():
    gen = torch.Generator().manual_seed(fresh_seed())
    gu = torch.randn(3, 20, generator=gen).bfloat16()
    assert torch.equal(fused.silu_mul(gu), reference.silu_mul(gu))
    r, d, w = (torch.randn(2, 8, generator=gen).bfloat16(), torch.randn(2, 8, generator=gen).bfloat16(),
               torch.randn(8, generator=gen).bfloat16())
    r2 = r.clone()
    assert torch.equal(fused.add_rms_norm(r, d, w, 1e-5), reference.add_rms_norm(r2, d, w, 1e-5))
    assert torch.equal(r, r2)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 6, 200], ids=lambda t: f"{t}tok")
def test_cpu_rope_write_kv_matches_twin(cache_dtype, tokens):
    """The C kernel against the twin: q rotated in place, k's rotation and v in their slots (a bf16
    cache rounded as the twin rounds), k itself untouched, every other slot of the pool unchanged."""
    heads, kv_heads, head_dim = 9, 3, 64
    batch = make_batch([1], [4000], heads, kv_heads, head_dim, 16, cache_dtype=cache_dtype)
    gen = torch.Generator().manual_seed(batch.seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    config = types.SimpleNamespace(head_dim=head_dim, rope_theta=10000.0, rope_scaling={}, max_position_embeddings=512)
    tables = RopeTables(config, torch.float32, torch.device("cpu"))
    positions = torch.randint(0, 512, (tokens,), generator=gen, dtype=torch.int32)
    slots = (batch.ours[:, None] * 16 + torch.arange(16)).flatten()
    slots = slots[torch.randperm(len(slots), generator=gen)[:tokens]].to(torch.int32)
    twin_pool, twin_q, k_before = batch.pool.clone(), q.clone(), k.clone()
    reference.rope_write_kv(twin_q, k, v, tables.cos, tables.sin, positions,
                            *KVView(twin_pool, batch.view.shape).layer(1), slots)
    fused.rope_write_kv(q, k, v, tables.cos, tables.sin, positions, *batch.caches, slots)
    assert torch.equal(k, k_before)
    assert relative_error(q, twin_q) < 1e-6
    got, want = KVView(batch.pool, batch.view.shape).layer(1), KVView(twin_pool, batch.view.shape).layer(1)
    flat = [c.reshape(-1, kv_heads, head_dim) for c in (*got, *want)]
    assert torch.equal(flat[1], flat[3])      # v: a copy (or the same rounding to bf16)
    assert relative_error(flat[0][slots.long()].float(), flat[2][slots.long()].float()) < (
        1e-6 if cache_dtype == torch.float32 else 8e-3)
    others = torch.ones(flat[0].shape[0], dtype=torch.bool)
    others[slots.long()] = False
    assert torch.equal(flat[0][others], flat[2][others])


def _rope_args(batch, tokens=2):
    q = torch.randn(tokens, 9, 64)
    k, v = torch.randn(tokens, 3, 64), torch.randn(tokens, 3, 64)
    cos, sin = torch.randn(10, 64), torch.randn(10, 32)
    slots = (batch.ours[:tokens] * 16).to(torch.int32)
    return dict(q=q, k=k, v=v, cos=cos, sin=sin, positions=torch.tensor([1, 9][:tokens], dtype=torch.int32),
                k_cache=batch.caches[0], v_cache=batch.caches[1], slot_mapping=slots)


ROPE_ERRORS = [
    ("position past the tables", dict(positions=torch.tensor([1, 10], dtype=torch.int32))),
    ("slot outside the cache", dict(slot_mapping=torch.tensor([0, 10**6], dtype=torch.int32))),
    ("q head_dim", dict(q=torch.randn(2, 9, 32))),
    ("k heads", dict(k=torch.randn(2, 2, 64))),
    ("v dtype", dict(v=torch.randn(2, 3, 64, dtype=torch.float64))),
    ("sin width", dict(sin=torch.randn(10, 64))),
    ("cos rows differ from sin", dict(cos=torch.randn(11, 64))),
    ("positions length", dict(positions=torch.tensor([1], dtype=torch.int32))),
    ("q strided last dim", dict(q=torch.randn(2, 9, 128)[:, :, ::2])),
]


@pytest.mark.parametrize("case", ROPE_ERRORS, ids=[c[0] for c in ROPE_ERRORS])
def test_rope_write_kv_refuses_bad_arguments_before_writing(case):
    batch = make_batch([1], [40], 9, 3, 64, 16)
    args = _rope_args(batch)
    args.update(case[1])
    q_before, pool_before = args["q"].clone(), batch.pool.clone()
    with pytest.raises(KvosError) as e:
        fused.rope_write_kv(**args)
    assert e.value.errno == "EINVAL"
    assert torch.equal(batch.pool, pool_before)
    if args["q"].shape == q_before.shape:
        assert torch.equal(args["q"], q_before)


def test_norm_and_silu_refuse_bad_arguments_before_writing():
    r, d, w = torch.randn(2, 8), torch.randn(2, 8), torch.randn(8)
    before = r.clone()
    for bad in (dict(d=torch.randn(2, 7)), dict(w=torch.randn(7)), dict(eps=0.0), dict(eps=float("nan")),
                dict(out=torch.empty(2, 8, dtype=torch.float64)), dict(d=torch.randn(2, 8, dtype=torch.float64)),
                dict(r=torch.randn(2, 16)[:, ::2])):
        a = dict(r=r, d=d, w=w, eps=1e-5, out=None) | bad
        with pytest.raises(KvosError) as e:
            fused.add_rms_norm(a["r"], a["d"], a["w"], a["eps"], a["out"])
        assert e.value.errno == "EINVAL"
        assert torch.equal(r, before)
    out = torch.full((2, 4), 7.0)
    for gate_up, o in ((torch.randn(2, 7), None), (torch.randn(2, 8), torch.empty(2, 5)),
                       (torch.randn(2, 8), torch.empty(2, 4, dtype=torch.float64)), (torch.randn(8), None)):
        with pytest.raises(KvosError):
            fused.silu_mul(gate_up, o)
    assert (out == 7.0).all()
