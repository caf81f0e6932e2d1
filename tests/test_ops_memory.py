"""write_kv, copy_frames, swap_out and swap_in on the CPU against their plain-torch twins.

Every op runs on a pool shared with another tenant's frames; the tests compare whole
pools byte for byte with the twin's, so a write outside its slot or frame is caught.
"""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel import ops
from kernel.kvcache import KVView
from kernel.ops import reference
from tests.test_ops_helpers import fresh_seed, make_batch


def twin_pool(batch):
    """A copy of the batch's pool and our caches in it, for the twin to work on."""
    pool = batch.pool.clone()
    return pool, KVView(pool, batch.view.shape).layer(batch.layer)


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([(3, 64), (1, 128), (4, 64), (2, 40)]), st.sampled_from([1, 3, 16, 256]),
       st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_write_kv_matches_twin(heads, page_size, tokens, seed):
    kv_heads, head_dim = heads
    batch = make_batch([1], [tokens + 5], kv_heads, kv_heads, head_dim, page_size, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    # Any slots of our frames, in any order: a step's tokens land wherever their pages are.
    our_slots = (batch.ours[:, None] * page_size + torch.arange(page_size)).flatten()
    slots = our_slots[torch.randperm(len(our_slots), generator=gen)[:tokens]].to(torch.int32)
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    pool, (k_twin, v_twin) = twin_pool(batch)
    ops.write_kv(*batch.caches, k, v, slots)
    reference.write_kv(k_twin, v_twin, k, v, slots)
    assert torch.equal(batch.pool, pool), f"seed {seed}"


def test_write_kv_strided_inputs_and_int64_slots():
    """k and v as views into a fused projection output (rows dense, token stride wide)."""
    batch = make_batch([1], [40], 3, 3, 64, 16)
    fused = torch.randn(20, 3 * 3 * 64)
    k = fused[:, 192:384].view(20, 3, 64)
    v = fused[:, 384:].view(20, 3, 64)
    slots = (batch.ours[:2, None] * 16 + torch.arange(16)).flatten()[:20]
    pool, (k_twin, v_twin) = twin_pool(batch)
    ops.write_kv(*batch.caches, k, v, slots.long())
    reference.write_kv(k_twin, v_twin, k, v, slots)
    assert torch.equal(batch.pool, pool)


def test_write_then_attend_equals_twin_pipeline():
    """A decode step end to end: write the new token's K/V, then attend over it."""
    batch = make_batch([1, 1], [33, 16], 9, 3, 64, 16)
    k_cache, v_cache = batch.caches
    last = batch.context_lens - 1
    slots = (batch.page_table[torch.arange(2), last // 16] * 16 + last % 16).to(torch.int32)
    k, v = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    pool, (k_twin, v_twin) = twin_pool(batch)
    ops.write_kv(k_cache, v_cache, k, v, slots)
    reference.write_kv(k_twin, v_twin, k, v, slots)
    got = ops.paged_attention(batch.q, k_cache, v_cache, batch.page_table, batch.query_start, batch.context_lens, 0.125)
    want = reference.paged_attention(batch.q, k_twin, v_twin, batch.page_table, batch.query_start,
                                     batch.context_lens, 0.125)
    assert (got - want).abs().max() < 1e-5


def random_pool(frames, frame_bytes, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, frame_bytes), dtype=torch.uint8, generator=gen), gen


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 20), st.sampled_from([1, 7, 64, 4096, 12288]), st.integers(0, 2**31 - 1))
def test_copy_frames_matches_twin(count, frame_bytes, seed):
    pool, gen = random_pool(2 * count + 3, frame_bytes, seed)
    order = torch.randperm(pool.shape[0], generator=gen).to(torch.int32)
    src, dst = order[:count], order[count:2 * count]
    want = pool.clone()
    reference.copy_frames(want, src, dst)
    ops.copy_frames(pool, src, dst)
    assert torch.equal(pool, want), f"seed {seed}"


def test_copy_frames_may_read_one_source_twice():
    """Copy-on-write of a page shared by two children: one source, two destinations."""
    pool, _ = random_pool(6, 300, fresh_seed())
    src, dst = torch.tensor([2, 2], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    want = pool.clone()
    reference.copy_frames(want, src, dst)
    ops.copy_frames(pool, src, dst)
    assert torch.equal(pool, want)


def test_large_copy_uses_threads_and_matches():
    pool, gen = random_pool(300, 16384, fresh_seed())   # above the parallel threshold of frames.c
    src, dst = torch.arange(0, 150, dtype=torch.int32), torch.arange(150, 300, dtype=torch.int32)
    want = pool.clone()
    reference.copy_frames(want, src, dst)
    ops.copy_frames(pool, src, dst)
    assert torch.equal(pool, want)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 12), st.sampled_from([3, 512, 12288]), st.integers(0, 2**31 - 1))
def test_swap_out_and_in_round_trip(count, frame_bytes, seed):
    pool, gen = random_pool(count + 5, frame_bytes, seed)
    swap = torch.randint(0, 256, (count + 2, frame_bytes), dtype=torch.uint8, generator=gen)
    frames = torch.randperm(pool.shape[0], generator=gen)[:count].to(torch.int32)
    slots = torch.randperm(swap.shape[0], generator=gen)[:count].to(torch.int32)
    swap_want = swap.clone()
    reference.swap_out(pool, swap_want, frames, slots)
    ops.swap_out(pool, swap, frames, slots)
    assert torch.equal(swap, swap_want), f"seed {seed}"
    # Back into other frames, as after a preemption: the bytes come home unchanged.
    back = torch.randperm(pool.shape[0], generator=gen)[:count].to(torch.int32)
    pool_want = pool.clone()
    reference.swap_in(swap, pool_want, slots, back)
    ops.swap_in(swap, pool, slots, back)
    assert torch.equal(pool, pool_want), f"seed {seed}"


def test_empty_lists_are_no_ops():
    pool, _ = random_pool(4, 64, fresh_seed())
    before = pool.clone()
    empty = torch.zeros(0, dtype=torch.int32)
    ops.copy_frames(pool, empty, empty)
    ops.swap_out(pool, torch.zeros(2, 64, dtype=torch.uint8), empty, empty)
    batch = make_batch([1], [5], 3, 3, 64, 16)
    ops.write_kv(*batch.caches, torch.zeros(0, 3, 64), torch.zeros(0, 3, 64), empty)
    assert torch.equal(pool, before)
