"""kvos's ops as torch.library custom ops: schemas, fake implementations and dispatch (opcheck), the
ops through torch.ops.kvos against their twins, and torch.compile treating them as opaque calls.

opcheck runs each op under the schema checker, FakeTensor mode and AOT dispatch; the caches it is
given are separate tensors (the kernel's are two views of one pool, which a schema cannot say).
"""
import pytest
import torch

from kernel import ops
from kernel.ops import library, reference
from tests.test_ops_helpers import make_batch


def separate_caches(batch):
    """k and v caches as two tensors of their own (with the pool's strides dropped)."""
    k_cache, v_cache = batch.caches
    return k_cache.contiguous().clone(), v_cache.contiguous().clone()


@pytest.fixture
def batch():
    return make_batch([1, 3, 2, 1], [40, 3, 70, 17], 9, 3, 64, 16, seed=5)


def test_ops_are_registered_with_schemas_that_name_what_they_write():
    for name, written in (("write_kv", {"k_cache", "v_cache"}), ("paged_attention", {"out"}),
                          ("copy_frames", {"dst_pool"})):
        schema = getattr(torch.ops.kvos, name).default._schema
        mutable = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert mutable == written, (name, mutable)
        assert not schema.returns


@pytest.mark.parametrize("check", [True, False])
def test_opcheck_paged_attention(batch, check):
    k_cache, v_cache = separate_caches(batch)
    out = torch.zeros_like(batch.q)
    args = (batch.q, k_cache, v_cache, batch.page_table, batch.query_start, batch.context_lens, 0.125, out, check)
    torch.library.opcheck(torch.ops.kvos.paged_attention.default, args)


def test_opcheck_write_kv(batch):
    k_cache, v_cache = separate_caches(batch)
    n, kv_heads, head_dim = 5, k_cache.shape[2], k_cache.shape[3]
    k, v = torch.randn(n, kv_heads, head_dim), torch.randn(n, kv_heads, head_dim)
    slots = torch.tensor([0, 17, 33, 2, 60], dtype=torch.int32)
    torch.library.opcheck(torch.ops.kvos.write_kv.default, (k_cache, v_cache, k, v, slots, True))


def test_opcheck_copy_frames():
    src_pool = torch.randint(0, 256, (6, 64), dtype=torch.uint8)
    dst_pool = torch.zeros((4, 64), dtype=torch.uint8)
    src, dst = torch.tensor([5, 0, 2], dtype=torch.int32), torch.tensor([1, 3, 0], dtype=torch.int32)
    torch.library.opcheck(torch.ops.kvos.copy_frames.default, (src_pool, dst_pool, src, dst, True, "src", "dst"))


def test_the_custom_ops_agree_with_the_twins(batch):
    k_cache, v_cache = batch.caches
    want = reference.paged_attention(batch.q, k_cache, v_cache, batch.page_table, batch.query_start,
                                      batch.context_lens, 0.125)
    out = torch.full_like(batch.q, float("nan"))
    library.paged_attention(batch.q, k_cache, v_cache, batch.page_table, batch.query_start, batch.context_lens,
                            0.125, out, True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    k = torch.randn(3, k_cache.shape[2], k_cache.shape[3])
    slots = torch.tensor([4, 9, 1], dtype=torch.int32)
    twin_k, twin_v = k_cache.clone(), v_cache.clone()
    reference.write_kv(twin_k, twin_v, k, -k, slots)
    library.write_kv(k_cache, v_cache, k, -k, slots, True)
    assert torch.equal(k_cache, twin_k) and torch.equal(v_cache, twin_v)


def test_a_refusal_inside_the_custom_op_is_still_einval_and_writes_nothing(batch):
    """On the CPU the range check is the C pre-pass, inside the custom op: its KvosError crosses the
    dispatcher unchanged, and the pool is untouched."""
    from kernel.errors import EINVAL, KvosError
    k_cache, v_cache = batch.caches
    before = batch.pool.clone()
    k = torch.randn(2, k_cache.shape[2], k_cache.shape[3])
    with pytest.raises(KvosError) as e:
        library.write_kv(k_cache, v_cache, k, k, torch.tensor([0, 10**6], dtype=torch.int32), True)
    assert e.value.errno == EINVAL and "slot_mapping[1]" in str(e.value)
    assert torch.equal(batch.pool, before)


def test_torch_compile_sees_the_ops_as_opaque_calls(batch):
    """A compiled function around paged_attention gives the eager result: dynamo traces through the
    fake implementation and calls the real kernel (no graph break needed for the op itself)."""
    k_cache, v_cache = separate_caches(batch)

    def attend(q, page_table, query_start, context_lens):
        out = torch.empty_like(q)
        torch.ops.kvos.paged_attention(q * 1.0, k_cache, v_cache, page_table, query_start, context_lens, 0.125,
                                       out, False)
        return out + 0.0

    eager = attend(batch.q, batch.page_table, batch.query_start, batch.context_lens)
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    got = compiled(batch.q, batch.page_table, batch.query_start, batch.context_lens)
    torch.testing.assert_close(got, eager)
    assert torch.equal(eager, ops.paged_attention(batch.q, k_cache, v_cache, batch.page_table, batch.query_start,
                                                  batch.context_lens, 0.125))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_on_cuda(dtype):
    """The CUDA kernels through the same custom ops: opcheck, and the result against the twin."""
    b = make_batch([1, 3, 2, 1], [40, 3, 70, 17], 9, 3, 64, 16, seed=5, dtype=dtype, device="cuda")
    k_cache, v_cache = separate_caches(b)
    out = torch.zeros_like(b.q)
    args = (b.q, k_cache, v_cache, b.page_table, b.query_start, b.context_lens, 0.125, out, False)
    torch.library.opcheck(torch.ops.kvos.paged_attention.default, args)
    library.paged_attention(*args)
    want = reference.paged_attention(b.q, k_cache, v_cache, b.page_table, b.query_start, b.context_lens, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    k = torch.randn(3, k_cache.shape[2], k_cache.shape[3], device="cuda", dtype=dtype)
    slots = torch.tensor([4, 9, 1], dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.kvos.write_kv.default, (k_cache, v_cache, k, k, slots, False))
