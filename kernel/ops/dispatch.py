"""The ops of kernel/ops: check arguments at the door, then run C (cpu) or CUDA (cuda).

Each op keeps the signature of its twin in reference.py and adds `check=` (keyword):
index ranges (slots, page tables, query_start, context_lens, frame lists) are checked
when it is true. On the CPU that check is a C pre-pass and costs next to nothing; on
CUDA it costs one host sync, so a forward pass may check once per step and pass
check=False for the other layers. Shape, dtype and device checks always run.
Index tensors are int32; int64 is accepted and converted (one extra copy per call).
After the checks each op calls its torch.library custom op (library.py), which the dispatcher
sends to the C or the CUDA kernel; on CUDA nothing after the checks syncs with the host, so
with check=False (the batch builder checked the host arrays) an op may be captured in a graph.
"""
import torch

from kernel.kvcache import q8_scales
from kernel.ops import library
from kernel.ops import validate as val

CPU_DTYPES = (torch.float32, torch.bfloat16)     # caches; activations (q, k, v, out) are float32 on the CPU
# int8 caches too on the CPU: rows of codes, each followed by its float32 scale (kernel/kvcache.py).
CPU_CACHE_DTYPES = CPU_DTYPES + (torch.int8,)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _backend(device):
    if device.type == "cpu":
        from kernel.ops import cpu
        return cpu
    if device.type == "cuda":
        from kernel.ops import cuda
        return cuda
    val.fail(f"kernel/ops runs on cpu or cuda tensors, not {device.type}")


def _float_dtypes(device):
    return CPU_DTYPES if device.type == "cpu" else CUDA_DTYPES


def _cache_dtype(device, k_cache):
    """A dtype the device's kernels store, and for int8 the rows' layout (codes, then the scale)."""
    dtypes = CPU_CACHE_DTYPES if device.type == "cpu" else CUDA_DTYPES
    if k_cache.dtype not in dtypes:
        val.fail(f"{device.type} caches hold {dtypes}, not {k_cache.dtype}")
    if k_cache.dtype == torch.int8:
        q8_scales(k_cache)


def _activation_dtype(device, cache_dtype):
    """q, k, v and out: float32 on the CPU whatever the cache holds (the C kernels convert a bf16
    cache row by row); on CUDA the cache's own dtype."""
    return torch.float32 if device.type == "cpu" else cache_dtype


def write_kv(k_cache, v_cache, k, v, slot_mapping, *, check=True):
    """Scatter new keys and values into their slots (see reference.write_kv)."""
    val.cache_pair(k_cache, v_cache)
    device, dtype = k_cache.device, k_cache.dtype
    _backend(device)                  # a device kvos runs on (cpu or cuda)
    _cache_dtype(device, k_cache)
    num_frames, page_size, kv_heads, head_dim = k_cache.shape
    act = _activation_dtype(device, dtype)
    for name, t in (("k", k), ("v", v)):
        val.tensor(name, t, ndim=3, dtypes=(act,), device=device)
        if tuple(t.shape[1:]) != (kv_heads, head_dim):
            val.fail(f"{name} has shape {tuple(t.shape)}, expected (num_tokens, {kv_heads}, {head_dim})")
        val.rows_contiguous(name, t)
    if k.shape[0] != v.shape[0]:
        val.fail(f"k has {k.shape[0]} tokens, v has {v.shape[0]}")
    slots = val.index("slot_mapping", slot_mapping, length=k.shape[0], device=device)
    if k.shape[0] == 0:
        return
    if check and device.type != "cpu":
        val.slots_in_range(slots, num_frames * page_size)
    library.write_kv(k_cache, v_cache, k, v, slots, check)


def paged_attention(q, k_cache, v_cache, page_table, query_start, context_lens, scale, out=None, *, check=True):
    """Causal attention of packed queries over paged context (see reference.paged_attention)."""
    val.cache_pair(k_cache, v_cache)
    device, dtype = k_cache.device, k_cache.dtype
    _backend(device)                  # a device kvos runs on (cpu or cuda)
    _cache_dtype(device, k_cache)
    num_frames, page_size, kv_heads, head_dim = k_cache.shape
    act = _activation_dtype(device, dtype)
    val.tensor("q", q, ndim=3, dtypes=(act,), device=device)
    val.rows_contiguous("q", q)
    num_tokens, num_heads = q.shape[0], q.shape[1]
    if q.shape[2] != head_dim:
        val.fail(f"q has head_dim {q.shape[2]}, the cache {head_dim}")
    if num_heads < kv_heads or num_heads % kv_heads:
        val.fail(f"q's {num_heads} heads are not a multiple of the cache's {kv_heads} kv heads")
    if out is None:
        out = torch.empty(q.shape, dtype=act, device=device)
    val.tensor("out", out, ndim=3, dtypes=(act,), device=device)
    if out.shape != q.shape:
        val.fail(f"out has shape {tuple(out.shape)}, q {tuple(q.shape)}")
    val.rows_contiguous("out", out)
    val.tensor("page_table", page_table, ndim=2, dtypes=val.INDEX_DTYPES, device=device)
    num_seqs = page_table.shape[0]
    if page_table.shape[1] < 1 and num_seqs:
        val.fail("page_table has no columns")
    page_table = val.as_int32("page_table", page_table)
    context_lens = val.index("context_lens", context_lens, length=num_seqs, device=device)
    query_start = val.index("query_start", query_start, length=num_seqs + 1, device=device)
    scale = val.scale_value(scale)
    if check and device.type != "cpu":
        val.batch_in_range(page_table, query_start, context_lens, num_tokens, num_frames, page_size)
    if num_tokens == 0:
        return out
    library.paged_attention(q, k_cache, v_cache, page_table, query_start, context_lens, scale, out, check)
    return out


def _frame_copy_args(src_pool, dst_pool, src, dst, src_name, dst_name):
    if src_pool.shape[1] != dst_pool.shape[1]:
        val.fail(f"frames of {src_pool.shape[1]} and {dst_pool.shape[1]} bytes differ in size")
    # Frame lists may live on the host even when the pool is on the GPU (they are short).
    gpu = src_pool.device if src_pool.device.type != "cpu" else dst_pool.device
    for name, t in ((src_name, src), (dst_name, dst)):
        val.tensor(name, t, ndim=1, dtypes=val.INDEX_DTYPES)
        if t.device.type != "cpu" and t.device != gpu:
            val.fail(f"{name} is on {t.device}, the pool on {gpu}")
    if src.shape[0] != dst.shape[0]:
        val.fail(f"{src_name} has {src.shape[0]} entries, {dst_name} {dst.shape[0]}")
    return val.as_int32(src_name, src), val.as_int32(dst_name, dst)


def copy_frames(pool, src, dst, *, check=True):
    """pool[dst[i]] = pool[src[i]] (copy-on-write). No dst may repeat or also be a src."""
    val.frame_pool("pool", pool)
    if not pool.is_contiguous():
        val.fail("pool must be contiguous")
    _backend(pool.device)             # a device kvos runs on (cpu or cuda)
    src, dst = _frame_copy_args(pool, pool, src, dst, "src", "dst")
    if src.shape[0] == 0:
        return
    if check and pool.device.type != "cpu":
        val.frame_lists(src, pool.shape[0], dst, pool.shape[0], True)
    library.copy_frames(pool, pool, src, dst, check, "src", "dst")


def _swap_args(pool, swap):
    val.frame_pool("pool", pool)
    val.frame_pool("swap", swap, device=torch.device("cpu"))
    if not (pool.is_contiguous() and swap.is_contiguous()):
        val.fail("pool and swap must be contiguous")
    if pool.device.type == "cuda":
        if not swap.is_pinned():
            val.fail("the swap area of a CUDA pool must be pinned host memory")
    return _backend(pool.device)


def swap_out(pool, swap, frames, slots, *, check=True):
    """swap[slots[i]] = pool[frames[i]]: device frames to the host swap area."""
    _swap_copy(pool, swap, pool, swap, frames, slots, "frames", "slots", check)


def swap_in(swap, pool, slots, frames, *, check=True):
    """pool[frames[i]] = swap[slots[i]]: host swap slots back into device frames."""
    _swap_copy(pool, swap, swap, pool, slots, frames, "slots", "frames", check)


def _swap_copy(pool, swap, src_pool, dst_pool, src, dst, src_name, dst_name, check):
    """dst_pool[dst[i]] = src_pool[src[i]] between a frame pool and its swap area, either way."""
    _swap_args(pool, swap)
    src, dst = _frame_copy_args(src_pool, dst_pool, src, dst, src_name, dst_name)
    if src.shape[0] == 0:
        return
    if check and pool.device.type != "cpu":
        val.frame_lists(src, src_pool.shape[0], dst, dst_pool.shape[0], False, src_name, dst_name)
    library.copy_frames(src_pool, dst_pool, src, dst, check, src_name, dst_name)
