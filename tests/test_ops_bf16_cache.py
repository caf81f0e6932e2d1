"""bfloat16 K/V caches on the CPU: write_kv narrows float32 keys and values (rounding to nearest
even, bit for bit as torch does), paged_attention widens each tile back to float32 as it reads it.
Queries, outputs and all arithmetic stay float32, so the kernels agree with their twins, run
on the same bf16 cache, as closely as with float32 caches."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel import ops
from kernel.errors import KvosError
from kernel.kvcache import KVView
from kernel.ops import reference
from tests.test_ops_helpers import attention_error_against_float32, attention_matches_twin, cache_batches, make_batch

pytestmark = pytest.mark.usefixtures("each_isa_cap")   # every vector path this CPU has (conftest.py)

BF16 = torch.bfloat16


def twin_pool(batch):
    pool = batch.pool.clone()
    return pool, KVView(pool, batch.view.shape).layer(batch.layer)


def special_values(n, gen):
    """Rounding ties, values that round up into the next binade, infinities, subnormals. (NaN has
    no one bf16 pattern: torch's scalar path gives 0x7fc0, its vector path 0xffff.)"""
    base = torch.randn(n, generator=gen)
    ties = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 2 ** -130, -(2 ** -140),
                         1.9999999, 3.3895e38, float("inf"), float("-inf"), 0.0, -0.0])
    base[:len(ties)] = ties[:n]
    return base


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([(3, 64), (1, 128), (2, 40)]), st.sampled_from([1, 16, 256]), st.integers(1, 60),
       st.integers(0, 2**31 - 1))
def test_write_kv_stores_the_bits_torch_rounds_to(heads, page_size, tokens, seed):
    kv_heads, head_dim = heads
    batch = make_batch([1], [tokens + 5], kv_heads, kv_heads, head_dim, page_size, seed=seed, cache_dtype=BF16)
    gen = torch.Generator().manual_seed(seed)
    our_slots = (batch.ours[:, None] * page_size + torch.arange(page_size)).flatten()
    slots = our_slots[torch.randperm(len(our_slots), generator=gen)[:tokens]].to(torch.int32)
    k = special_values(tokens * kv_heads * head_dim, gen).view(tokens, kv_heads, head_dim)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen) * 1e3
    pool, (k_twin, v_twin) = twin_pool(batch)
    ops.write_kv(*batch.caches, k, v, slots)
    reference.write_kv(k_twin, v_twin, k, v, slots)
    assert torch.equal(batch.pool, pool), f"seed {seed}"


def test_nan_stays_nan():
    batch = make_batch([1], [4], 1, 1, 64, 16, cache_dtype=BF16)
    k_cache, v_cache = batch.caches
    k = torch.full((1, 1, 64), float("nan"))
    slot = (batch.ours[:1] * 16).to(torch.int32)
    ops.write_kv(k_cache, v_cache, k, k, slot)
    frame = int(batch.ours[0])
    assert torch.isnan(k_cache[frame, 0].float()).all() and torch.isnan(v_cache[frame, 0].float()).all()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cache_batches(BF16))
def test_attention_over_a_bf16_cache_matches_its_twin(batch):
    attention_matches_twin(batch)


def test_bf16_cache_stays_close_to_a_float32_one():
    """The same K/V written to a float32 and to a bf16 cache: attention differs by bf16's rounding only."""
    err = attention_error_against_float32(BF16)
    assert 1e-5 < err < 2e-2, err


def test_activations_must_be_float32_and_fp16_caches_are_refused():
    batch = make_batch([1], [20], 4, 4, 64, 16, cache_dtype=BF16)
    k_cache, v_cache = batch.caches
    args = (batch.page_table, batch.query_start, batch.context_lens, 0.125)
    before = batch.snapshot()
    with pytest.raises(KvosError, match="q"):
        ops.paged_attention(batch.q.to(BF16), k_cache, v_cache, *args)
    with pytest.raises(KvosError):
        ops.write_kv(k_cache, v_cache, torch.randn(1, 4, 64).to(BF16), torch.randn(1, 4, 64).to(BF16),
                     torch.tensor([0], dtype=torch.int32))
    half = make_batch([1], [20], 4, 4, 64, 16, cache_dtype=torch.float16)
    with pytest.raises(KvosError, match="float16"):
        ops.paged_attention(half.q, *half.caches, half.page_table, half.query_start, half.context_lens, 0.125)
    assert torch.equal(batch.pool, before)
