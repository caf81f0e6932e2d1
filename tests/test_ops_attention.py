"""paged_attention on the CPU (the C kernels) against its plain-torch twin.

Fresh random batches every run (hypothesis, and seeds printed on failure): ragged decode
and prefill-chunk mixes, GQA ratios, head sizes, page sizes 1..256, shuffled page tables
in a pool shared with another tenant, poisoned outputs, strided q and out.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel import ops
from kernel.ops import cpu, reference
from tests.test_ops_helpers import make_batch, relative_error

pytestmark = pytest.mark.usefixtures("each_isa_cap")   # every vector path this CPU has (conftest.py)

TOLERANCE = 1e-5   # float32: the kernels agree with the twin to ~1e-6


def run_both(batch, scale=None, out=None):
    k_cache, v_cache = batch.caches
    head_dim = batch.q.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    before = batch.snapshot()
    if out is None:
        out = torch.full_like(batch.q, float("nan"))   # poisoned: an unwritten element shows
    got = ops.paged_attention(batch.q, k_cache, v_cache, batch.page_table, batch.query_start, batch.context_lens,
                              scale, out)
    want = reference.paged_attention(batch.q, k_cache, v_cache, batch.page_table, batch.query_start,
                                     batch.context_lens, scale)
    assert got is out
    assert torch.equal(batch.pool, before), f"attention wrote to the pool (seed {batch.seed})"
    return got, want


def assert_matches(batch, **kwargs):
    got, want = run_both(batch, **kwargs)
    assert not torch.isnan(got).any(), f"unwritten output rows (seed {batch.seed})"
    err = relative_error(got, want)
    assert err < TOLERANCE, f"relative error {err:.2e} (seed {batch.seed})"


GQA = [(9, 3), (8, 1), (4, 4), (16, 2), (32, 1), (6, 2)]


@st.composite
def batches(draw):
    heads, kv_heads = draw(st.sampled_from(GQA))
    head_dim = draw(st.sampled_from([64, 128, 64, 128, 32, 96, 40, 256]))
    page_size = draw(st.sampled_from([1, 2, 3, 7, 16, 16, 32, 64, 256]))
    num_seqs = draw(st.integers(1, 5))
    q_lens = draw(st.lists(st.sampled_from([0, 1, 1, 1, 2, 5, 16, 33]), min_size=num_seqs, max_size=num_seqs))
    extra = draw(st.lists(st.integers(0, 200), min_size=num_seqs, max_size=num_seqs))
    if sum(q_lens) == 0:
        q_lens[0] = 1
    ctx_lens = [q + e for q, e in zip(q_lens, extra)]
    seed = draw(st.integers(0, 2**31 - 1))
    return make_batch(q_lens, ctx_lens, heads, kv_heads, head_dim, page_size, seed=seed)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_matches_twin_on_random_batches(batch):
    assert_matches(batch)


def test_decode_batch_smollm2_shape():
    ctx = torch.randint(1, 700, (24,)).tolist()
    assert_matches(make_batch([1] * 24, ctx, 9, 3, 64, 16))


def test_mixed_decode_and_prefill_chunks():
    """Decodes beside chunks that attend to earlier context and causally within themselves."""
    assert_matches(make_batch([1, 40, 1, 17, 1, 64], [300, 140, 1, 17, 55, 64], 9, 3, 64, 16))
    assert_matches(make_batch([1, 40, 1, 17], [300, 140, 1, 90], 8, 1, 128, 16))


def test_gqa_ratios_and_head_sizes():
    for heads, kv_heads in GQA:
        for head_dim in (64, 128):
            assert_matches(make_batch([1, 7, 3], [50, 70, 3], heads, kv_heads, head_dim, 16))


def test_page_sizes():
    for page_size in (1, 2, 5, 16, 100, 256):
        assert_matches(make_batch([1, 19, 1], [333, 40, 257], 9, 3, 64, page_size))


def test_long_prefill_chunk_and_long_context():
    assert_matches(make_batch([128, 1], [1200, 2100], 9, 3, 64, 16))


def test_sequences_without_queries_and_zero_context_are_skipped():
    assert_matches(make_batch([0, 3, 0, 1], [0, 3, 50, 1], 4, 2, 64, 16))


def test_strided_q_and_out():
    """q and out as column slices of wider tensors (a fused qkv projection), rows dense."""
    batch = make_batch([1, 9, 2], [60, 9, 30], 9, 3, 64, 16)
    wide = torch.randn(batch.q.shape[0], 15, 64)
    wide[:, 3:12] = batch.q
    batch.q = wide[:, 3:12]
    out_wide = torch.full((batch.q.shape[0], 12, 64), float("nan"))
    got, want = run_both(batch, out=out_wide[:, 1:10])
    assert relative_error(got, want) < TOLERANCE
    assert torch.isnan(out_wide[:, 0]).all() and torch.isnan(out_wide[:, 10:]).all(), "wrote outside out"


def test_int64_indices_and_out_none():
    batch = make_batch([2, 1], [20, 40], 9, 3, 64, 16)
    k_cache, v_cache = batch.caches
    got = ops.paged_attention(batch.q, k_cache, v_cache, batch.page_table.long(), batch.query_start.long(),
                              batch.context_lens.long(), 0.125)
    want = reference.paged_attention(batch.q, k_cache, v_cache, batch.page_table, batch.query_start,
                                     batch.context_lens, 0.125)
    assert relative_error(got, want) < TOLERANCE


def test_page_table_rows_may_be_wider_than_needed():
    batch = make_batch([1, 1], [20, 40], 9, 3, 64, 16)
    batch.page_table = torch.cat([batch.page_table, torch.zeros(2, 5, dtype=torch.int32)], dim=1)
    assert_matches(batch)


def test_large_scores_stay_finite():
    """Scores of several hundred, far beyond float exp's range: the online softmax keeps
    subtracting the running max. (Float32 scores that large carry ~1e-5 rounding, hence
    the looser bound.)"""
    batch = make_batch([1, 4], [300, 200], 9, 3, 64, 16)
    batch.q *= 12.0
    got, want = run_both(batch, scale=1.0)
    assert torch.isfinite(got).all() and relative_error(got, want) < 1e-4, f"seed {batch.seed}"


@pytest.mark.parametrize("q_lens,ctx_lens", [([1, 30, 1, 1], [500, 30, 64, 1000]),   # 6 tasks: a task's heads
                                              ([1, 1], [700, 90])])                     # on one thread; 2: spread
def test_thread_counts_agree(q_lens, ctx_lens):
    """The same bits whatever the thread count, whether a task's KV heads run on one thread (two
    tasks a thread or more) or spread over the threads (fewer)."""
    batch = make_batch(q_lens, ctx_lens, 9, 3, 64, 16)
    k_cache, v_cache = batch.caches
    outs, before = [], cpu.num_threads()
    try:
        for threads in (1, 2, 3):
            ops.set_num_threads(threads)
            outs.append(ops.paged_attention(batch.q, k_cache, v_cache, batch.page_table, batch.query_start,
                                            batch.context_lens, 0.125))
    finally:
        ops.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2]), "results depend on the thread count"


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (8, 1, 128), (32, 8, 128), (16, 1, 64),
                                                       (32, 1, 64), (12, 1, 96)])
def test_a_row_s_bits_do_not_depend_on_how_its_sequence_was_chunked(cache_dtype, heads, kv_heads, head_dim):
    """A query row must have the same bits computed in a long chunk, in the chunk's tail alone (its
    prefix mapped from the page cache), or alone (decode; a speculative step's drafts, kernel/speculate.py),
    on every vector path: the paths sum in different orders, so the path is the group's, not the task's."""
    for q_len, ctx, tail in ((5, 5, 2), (5, 70, 4), (17, 100, 3), (40, 40, 14), (64, 200, 33)):
        b = make_batch([q_len], [ctx], heads, kv_heads, head_dim, 16, seed=q_len * ctx, cache_dtype=cache_dtype)
        whole = chunk_of(b, 0, q_len)
        assert torch.equal(chunk_of(b, q_len - tail, tail), whole[q_len - tail:]), (q_len, ctx, "tail")
        for j in range(0, q_len, 3):
            assert torch.equal(chunk_of(b, j, 1)[0], whole[j]), (q_len, ctx, j)


def chunk_of(batch, first, count):
    """Queries first..first+count-1 of a one-sequence batch's chunk, run as a chunk of their own."""
    k_cache, v_cache = batch.caches
    q_len, ctx = batch.q.shape[0], int(batch.context_lens[0])
    return ops.paged_attention(batch.q[first:first + count].contiguous(), k_cache, v_cache, batch.page_table,
                               torch.tensor([0, count], dtype=torch.int32),
                               torch.tensor([ctx - q_len + first + count], dtype=torch.int32), 0.125)
