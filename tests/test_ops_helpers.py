"""Builders for the kernel/ops tests: batches laid out as kvos lays them out.

A pool of frames is shared by two tenants whose models differ (KVView of two KV shapes);
our sequences get a random, shuffled subset of the frames and the other tenant's
frames sit between them, holding its own data, which the tests check is never touched.
No tests here.
"""
import random
from dataclasses import dataclass

import torch

from kernel.kvcache import KVShape, KVView, q8_quantize, q8_scales

OTHER_TENANT = KVShape(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float16)   # 16 bytes a token


def fresh_seed() -> int:
    """A new seed each run (the tests print it on failure, so a failure can be replayed)."""
    return random.SystemRandom().randrange(2**31)


@dataclass
class Batch:
    pool: torch.Tensor            # uint8 (num_frames, frame_bytes), shared by both tenants
    view: KVView                  # ours
    layer: int                    # the layer under test; the other layer must stay as it was
    ours: torch.Tensor            # frames of our sequences
    theirs: torch.Tensor          # frames of the other tenant
    q: torch.Tensor
    page_table: torch.Tensor
    query_start: torch.Tensor
    context_lens: torch.Tensor
    seed: int

    @property
    def caches(self):
        return self.view.layer(self.layer)

    def snapshot(self):
        return self.pool.clone()

    def untouched_outside_layer(self, before) -> bool:
        """Every byte but this layer's K/V in our frames is as it was: the other tenant's
        frames, our other layer, the padding."""
        now = self.pool.clone()
        restored = KVView(now, self.view.shape).layer(self.layer)
        originals = KVView(before, self.view.shape).layer(self.layer)
        for cache, original in zip(restored, originals):
            cache[self.ours] = original[self.ours]
            if cache.dtype == torch.int8:       # and the scales beside the codes
                q8_scales(cache)[self.ours] = q8_scales(original)[self.ours]
        return torch.equal(now, before)


def fill(cache, frames, values):
    """cache[frames] = values (float), as write_kv would store them: an int8 cache gets codes and scales."""
    if cache.dtype == torch.int8:
        codes, scale = q8_quantize(values)
        cache[frames] = codes
        q8_scales(cache)[frames] = scale
    else:
        cache[frames] = values.to(cache.dtype)


def make_batch(q_lens, ctx_lens, heads, kv_heads, head_dim, page_size, *, dtype=torch.float32, device="cpu",
               seed=None, pad_bytes=0, spare_frames=3, cache_dtype=None) -> Batch:
    """A packed batch: sequence s has q_lens[s] new tokens and ctx_lens[s] tokens of context.
    q is in dtype, the caches in cache_dtype (default: dtype)."""
    seed = fresh_seed() if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    shape = KVShape(2, kv_heads, head_dim, cache_dtype or dtype)
    pages = [-(-c // page_size) for c in ctx_lens]
    ours_count = sum(pages)
    num_frames = 2 * ours_count + spare_frames
    frame_bytes = shape.bytes_per_token * page_size + pad_bytes
    pool = torch.randint(0, 256, (num_frames, frame_bytes), dtype=torch.uint8, generator=gen)
    view = KVView(pool, shape)
    assert view.page_size == page_size, (view.page_size, page_size)
    order = torch.randperm(num_frames, generator=gen)
    ours, theirs = order[:ours_count], order[ours_count:]
    for cache in view.layer(0) + view.layer(1):
        fill(cache, ours, torch.randn((len(ours), *cache.shape[1:]), generator=gen))
    other = KVView(pool, OTHER_TENANT)
    for layer in range(OTHER_TENANT.num_layers):
        for cache in other.layer(layer):
            cache[theirs] = torch.randn((len(theirs), *cache.shape[1:]), generator=gen).to(OTHER_TENANT.dtype)
    table = torch.zeros(len(ctx_lens), max(pages + [1]), dtype=torch.int32)
    at = 0
    for s, n in enumerate(pages):
        table[s, :n] = ours[at:at + n].to(torch.int32)
        at += n
    query_start = torch.tensor([0, *torch.tensor(q_lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(query_start[-1]), heads, head_dim, generator=gen).to(dtype)
    pool = pool.to(device)
    return Batch(pool, KVView(pool, shape), 1, ours.to(device), theirs.to(device), q.to(device), table.to(device),
                 query_start.to(device), torch.tensor(ctx_lens, dtype=torch.int32, device=device), seed)


def relative_error(got, want) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def cache_batches(cache_dtype):
    """A hypothesis strategy of packed batches over a cache of cache_dtype (float32 q): GQA groups of
    1 to 32, head sizes that take every attention path, pages of 1 to 64 tokens, prefill chunks and
    decode rows, empty sequences."""
    from hypothesis import strategies as st

    @st.composite
    def batches(draw):
        heads, kv_heads = draw(st.sampled_from([(9, 3), (8, 1), (4, 4), (32, 1)]))
        head_dim = draw(st.sampled_from([64, 128, 40, 256]))
        page_size = draw(st.sampled_from([1, 7, 16, 64]))
        num_seqs = draw(st.integers(1, 4))
        q_lens = draw(st.lists(st.sampled_from([0, 1, 1, 3, 16, 33]), min_size=num_seqs, max_size=num_seqs))
        extra = draw(st.lists(st.integers(0, 150), min_size=num_seqs, max_size=num_seqs))
        if sum(q_lens) == 0:
            q_lens[0] = 1
        seed = draw(st.integers(0, 2**31 - 1))
        return make_batch(q_lens, [q + e for q, e in zip(q_lens, extra)], heads, kv_heads, head_dim, page_size,
                          seed=seed, cache_dtype=cache_dtype)
    return batches()


def attention_matches_twin(batch, tolerance=1e-5):
    """ops.paged_attention over the batch's caches against reference.paged_attention: float32 out,
    written into the given tensor, the pool untouched, within tolerance of the twin."""
    from kernel import ops
    from kernel.ops import reference
    k_cache, v_cache = batch.caches
    before = batch.snapshot()
    out = torch.full_like(batch.q, float("nan"))
    got = ops.paged_attention(batch.q, k_cache, v_cache, batch.page_table, batch.query_start, batch.context_lens,
                              0.1, out)
    want = reference.paged_attention(batch.q, k_cache, v_cache, batch.page_table, batch.query_start,
                                     batch.context_lens, 0.1)
    assert got is out and got.dtype == torch.float32 and not torch.isnan(got).any()
    assert torch.equal(batch.pool, before)
    assert relative_error(got, want) < tolerance, f"seed {batch.seed}"


def attention_error_against_float32(cache_dtype) -> float:
    """The same K/V written to a float32 cache and to one of cache_dtype (as write_kv would store them):
    the relative error of ops.paged_attention over the second against the first."""
    from kernel import ops
    q_lens, ctx = [1, 1, 24], [300, 17, 60]
    f32 = make_batch(q_lens, ctx, 9, 3, 64, 16, seed=5)
    narrow = make_batch(q_lens, ctx, 9, 3, 64, 16, seed=5, cache_dtype=cache_dtype)
    for wide, cache in zip(f32.caches, narrow.caches):
        fill(cache, f32.ours, wide[f32.ours])
    args = (f32.page_table, f32.query_start, f32.context_lens, 0.125)
    rounded, exact = (ops.paged_attention(f32.q, *b.caches, *args) for b in (narrow, f32))
    return relative_error(rounded, exact)
