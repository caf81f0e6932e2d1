"""int8 K/V caches on the CPU: each (token, kv head) row is head_dim int8 codes followed by its
float32 scale (kernel/kvcache.py). write_kv and rope_write_kv quantize float32 rows (scale = amax /
127, round half to even) to the twin's bytes exactly; paged_attention widens each tile back to
float32 (code * scale) and then runs the float32 arithmetic, so it agrees with its twin on the
same cache as closely as with float32 caches, and with a float32 cache of the same K/V within
int8's rounding."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel import ops
from kernel.errors import KvosError
from kernel.kvcache import KVShape, KVView, q8_dequantize, q8_quantize, q8_scales
from kernel.ops import fused, reference
from tests.test_ops_helpers import (
    attention_error_against_float32,
    attention_matches_twin,
    cache_batches,
    make_batch,
    relative_error,
)

pytestmark = pytest.mark.usefixtures("each_isa_cap")   # every vector path this CPU has (conftest.py)

Q8 = torch.int8


def twin_pool(batch):
    pool = batch.pool.clone()
    return pool, KVView(pool, batch.view.shape).layer(batch.layer)


def rows(n, kv_heads, head_dim, gen):
    """Rows of every kind a model gives: ordinary, tiny, huge, all zero (scale 0), one outlier."""
    x = torch.randn(n, kv_heads, head_dim, generator=gen)
    x[0] *= 1e-30
    if n > 1:
        x[1] *= 1e20
    if n > 2:
        x[2] = 0.0
    if n > 3:
        x[3, :, 0] = 500.0
    return x


def test_the_layout_codes_then_scale_in_each_row():
    shape = KVShape(2, 3, 64, Q8)
    assert shape.row_bytes == 68 and shape.bytes_per_token == 2 * 2 * 3 * 68
    pool = torch.zeros(4, shape.bytes_per_token * 16, dtype=torch.uint8)
    k_cache, v_cache = KVView(pool, shape).layer(1)
    assert k_cache.shape == (4, 16, 3, 64) and k_cache.stride()[1:] == (3 * 68, 68, 1)
    q8_scales(k_cache)[2, 5, 1] = 0.5
    row_start = k_cache.storage_offset() + 2 * k_cache.stride(0) + 5 * 3 * 68 + 68
    assert pool.view(-1)[row_start + 64:row_start + 68].view(torch.float32).item() == 0.5
    with pytest.raises(KvosError, match="multiple of 4"):
        KVShape(2, 3, 62, Q8)
    with pytest.raises(KvosError, match="not an int8 cache"):
        q8_scales(torch.zeros(4, 16, 3, 64, dtype=Q8))       # dense: no room for the scales
    with pytest.raises(KvosError, match="misalign"):         # a pool cut for another tenant's odd frames
        KVView(torch.zeros(4, shape.bytes_per_token * 16 + 2, dtype=torch.uint8), shape)


def test_quantize_and_dequantize():
    x = torch.tensor([[0.0, 1.0, -2.54, 127.0], [0.0, 0.0, 0.0, 0.0], [1e-3, -1e-3, 5e-4, 2.5e-4]])
    codes, scale = q8_quantize(x)
    assert codes.dtype == Q8 and codes[0].tolist() == [0, 1, -3, 127] and scale[0].item() == 1.0
    assert codes[1].tolist() == [0, 0, 0, 0] and scale[1].item() == 0.0
    assert codes[2].tolist() == [127, -127, 64, 32]       # 63.5 and 31.75 round half to even / nearest
    back = q8_dequantize(codes, scale)
    assert ((back - x).abs() <= scale[:, None] / 2 + 1e-12).all()


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([(3, 64), (1, 128), (2, 40)]), st.sampled_from([1, 16, 256]), st.integers(1, 60),
       st.integers(0, 2**31 - 1))
def test_write_kv_stores_the_twins_bytes(heads, page_size, tokens, seed):
    kv_heads, head_dim = heads
    batch = make_batch([1], [tokens + 5], kv_heads, kv_heads, head_dim, page_size, seed=seed, cache_dtype=Q8)
    gen = torch.Generator().manual_seed(seed)
    our_slots = (batch.ours[:, None] * page_size + torch.arange(page_size)).flatten()
    slots = our_slots[torch.randperm(len(our_slots), generator=gen)[:tokens]].to(torch.int32)
    k, v = rows(tokens, kv_heads, head_dim, gen), torch.randn(tokens, kv_heads, head_dim, generator=gen) * 1e3
    before = batch.snapshot()
    pool, (k_twin, v_twin) = twin_pool(batch)
    ops.write_kv(*batch.caches, k, v, slots)
    reference.write_kv(k_twin, v_twin, k, v, slots)
    assert torch.equal(batch.pool, pool), f"seed {seed}"
    assert batch.untouched_outside_layer(before)


def test_rope_write_kv_matches_its_twin():
    """q rotated in place and v stored as the twin stores them; k's rotation differs from the twin's by
    FMA contraction (an ulp), so its codes may round one step apart, never more; nothing else moves."""
    gen = torch.Generator().manual_seed(3)
    batch = make_batch([1], [40], 3, 3, 64, 16, seed=3, cache_dtype=Q8)
    n = 20
    q, k, v = (rows(n, 3, 64, gen) for _ in range(3))
    cos, sin = torch.randn(64, 64, generator=gen), torch.randn(64, 32, generator=gen)
    positions = torch.randint(0, 64, (n,), generator=gen, dtype=torch.int32)
    slots = (batch.ours[:2, None] * 16 + torch.arange(16)).flatten()[:n].to(torch.int32)
    before = batch.snapshot()
    pool, (k_twin, v_twin) = twin_pool(batch)
    q_twin = q.clone()
    fused.rope_write_kv(q, k, v, cos, sin, positions, *batch.caches, slots)
    reference.rope_write_kv(q_twin, k, v, cos, sin, positions, k_twin, v_twin, slots)
    assert relative_error(q, q_twin) < 1e-6
    k_cache, v_cache = batch.caches
    assert torch.equal(v_cache, v_twin) and torch.equal(q8_scales(v_cache), q8_scales(v_twin))
    assert (k_cache.int() - k_twin.int()).abs().max() <= 1
    assert torch.allclose(q8_scales(k_cache), q8_scales(k_twin), rtol=1e-5, atol=0)
    assert batch.untouched_outside_layer(before)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cache_batches(Q8))
def test_attention_over_an_int8_cache_matches_its_twin(batch):
    attention_matches_twin(batch)


def test_int8_cache_stays_close_to_a_float32_one():
    """The same K/V written to a float32 and to an int8 cache: attention differs by int8's rounding only."""
    err = attention_error_against_float32(Q8)
    assert 1e-5 < err < 2e-2, err


def test_bad_int8_caches_are_refused_before_any_write():
    batch = make_batch([1], [20], 4, 4, 64, 16, cache_dtype=Q8)
    args = (batch.page_table, batch.query_start, batch.context_lens, 0.125)
    before = batch.snapshot()
    dense = torch.zeros(8, 16, 4, 64, dtype=Q8)               # int8 without room for the scales
    with pytest.raises(KvosError, match="not an int8 cache"):
        ops.paged_attention(batch.q, dense, dense, *args)
    with pytest.raises(KvosError, match="not an int8 cache"):
        ops.write_kv(dense, dense, torch.randn(1, 4, 64), torch.randn(1, 4, 64), torch.tensor([0], dtype=torch.int32))
    with pytest.raises(KvosError, match="q"):
        ops.paged_attention(batch.q.to(torch.bfloat16), *batch.caches, *args)
    with pytest.raises(KvosError, match="slot"):
        ops.write_kv(*batch.caches, torch.randn(1, 4, 64), torch.randn(1, 4, 64),
                     torch.tensor([10 ** 6], dtype=torch.int32))
    assert torch.equal(batch.pool, before)
