"""Argument checks at the door of kernel/ops: every bad argument is a KvosError(EINVAL).

Two kinds. Metadata checks (dtype, device, rank, shapes, strides) read no tensor data,
cost microseconds and always run. Index checks read index tensors (slots, page tables,
query_start, context_lens, frame lists): on the CPU the C kernels run them in a pre-pass
before their first write; on CUDA the functions here run them with torch reductions and
one host sync, so the ops take `check=` and a caller may check once per step.
"""
import math

import torch

from kernel.errors import EINVAL, KernelPanic, KvosError

INDEX_DTYPES = (torch.int32, torch.int64)
_INT32_MAX = 2**31 - 1


def fail(reason: str):
    raise KvosError(EINVAL, reason)


def tensor(name, t, *, ndim, dtypes=None, device=None):
    if not isinstance(t, torch.Tensor):
        fail(f"{name} must be a torch.Tensor, not {type(t).__name__}")
    if t.dim() != ndim:
        fail(f"{name} must have {ndim} dimensions, has shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        fail(f"{name} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    if device is not None and t.device != device:
        fail(f"{name} is on {t.device}, expected {device}")


def rows_contiguous(name, t):
    """The innermost dimension is dense (stride 1); outer strides are free (views of the pool, qkv splits)."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        fail(f"{name} must have a contiguous last dimension, has strides {t.stride()}")


def index(name, t, *, length=None, device=None):
    """A 1-D index tensor as contiguous int32 (int64 is accepted and converted after a range check)."""
    tensor(name, t, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if length is not None and t.shape[0] != length:
        fail(f"{name} has {t.shape[0]} entries, expected {length}")
    return as_int32(name, t)


def as_int32(name, t):
    if t.dtype == torch.int64:
        if t.numel():
            lo, hi = torch.aminmax(t)
            if int(lo) < -_INT32_MAX or int(hi) > _INT32_MAX:
                fail(f"{name} holds values outside int32")
        t = t.to(torch.int32)
    return t.contiguous()


def cache_pair(k_cache, v_cache):
    """(num_frames, page_size, kv_heads, head_dim) views of one pool, with equal strides."""
    tensor("k_cache", k_cache, ndim=4)
    tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), device=k_cache.device)
    if k_cache.shape != v_cache.shape:
        fail(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    if k_cache.stride() != v_cache.stride():
        fail(f"k_cache and v_cache strides differ: {k_cache.stride()} vs {v_cache.stride()}")
    rows_contiguous("k_cache", k_cache)
    if k_cache.shape[1] < 1:
        fail("page_size must be at least 1")


def scale_value(scale):
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        fail(f"scale must be a finite number, not {scale!r}")
    return float(scale)


def frame_pool(name, pool, device=None):
    tensor(name, pool, ndim=2, dtypes=(torch.uint8,), device=device)
    if pool.stride(1) != 1 and pool.shape[1] > 1:
        fail(f"{name} frames must be contiguous bytes")


# ---- reasons for bad indices, shared by the C pre-pass (cpu.py) and the torch checks below ----

def bad_slot(t, slot, num_slots):
    fail(f"slot_mapping[{t}] = {slot} is outside the cache's {num_slots} slots")


def bad_batch(code, s, p, page_table, query_start, context_lens, num_tokens, num_frames, page_size):
    """Raise the reason for rule `code` of the batch check, found at sequence s (page p)."""
    qs = query_start
    if code == "qstart0":
        fail(f"query_start[0] = {int(qs[0])}, must be 0")
    if code == "order":
        fail(f"query_start decreases at sequence {s}: {int(qs[s])} then {int(qs[s + 1])}")
    if code == "end":
        fail(f"query_start ends at {int(qs[-1])} but q has {num_tokens} tokens")
    if code == "context":
        fail(f"context_lens[{s}] = {int(context_lens[s])} is shorter than its "
             f"{int(qs[s + 1]) - int(qs[s])} new tokens")
    if code == "pages":
        ctx = int(context_lens[s])
        fail(f"sequence {s} needs {-(-ctx // page_size)} pages for {ctx} tokens, "
             f"its page-table row holds {page_table.shape[1]}")
    fail(f"page_table[{s}, {p}] = {int(page_table[s, p])} is not a frame of the pool (0..{num_frames - 1})")


def bad_frame_list(code, i, src, dst, src_count, dst_count, src_name, dst_name):
    if code == "src":
        fail(f"{src_name}[{i}] = {int(src[i])} is outside 0..{src_count - 1}")
    if code == "dst":
        fail(f"{dst_name}[{i}] = {int(dst[i])} is outside 0..{dst_count - 1}")
    if code == "duplicate":
        fail(f"{dst_name}[{i}] = {int(dst[i])} repeats an earlier destination")
    fail(f"{dst_name}[{i}] = {int(dst[i])} is also a source: the copy would depend on its order")


# ---- index checks with torch ops (CUDA, or any device): one host sync when all is well ----

def _first(mask):
    return int(torch.nonzero(mask.flatten())[0, 0])


def slots_in_range(slot_mapping, num_slots):
    bad = (slot_mapping < 0) | (slot_mapping >= num_slots)
    if bool(bad.any()):
        t = _first(bad)
        bad_slot(t, int(slot_mapping[t]), num_slots)


def batch_in_range(page_table, query_start, context_lens, num_tokens, num_frames, page_size):
    """Torch twin of check_batch in csrc/cpu/attention.c: same rules, same order, same reasons."""
    qs = query_start.long()
    ctx = context_lens.long()
    q_lens = qs[1:] - qs[:-1]
    pages = torch.where(q_lens > 0, (ctx + page_size - 1) // page_size, 0)
    used = torch.arange(page_table.shape[1], device=page_table.device)[None, :] < pages[:, None]
    bad_entry = used & ((page_table < 0) | (page_table >= num_frames))
    flags = torch.stack([qs[0] != 0, (q_lens < 0).any(), qs[-1] != num_tokens, (ctx < q_lens).any(),
                         (pages > page_table.shape[1]).any(), bad_entry.any()])
    if not bool(flags.any()):
        return
    flags = flags.tolist()
    args = (page_table, query_start, context_lens, num_tokens, num_frames, page_size)
    if flags[0]:
        bad_batch("qstart0", 0, 0, *args)
    if flags[1]:
        bad_batch("order", _first(q_lens < 0), 0, *args)
    if flags[2]:
        bad_batch("end", 0, 0, *args)
    # Per sequence, the C check reports the context first, then pages, then entries.
    per_seq = torch.stack([ctx < q_lens, pages > page_table.shape[1], bad_entry.any(dim=1)], dim=1)
    s = _first(per_seq.any(dim=1))
    rule = per_seq[s].tolist().index(True)
    if rule == 0:
        bad_batch("context", s, 0, *args)
    if rule == 1:
        bad_batch("pages", s, 0, *args)
    bad_batch("entry", s, _first(bad_entry[s]), *args)


def frame_lists(src, src_count, dst, dst_count, same_pool, src_name="src", dst_name="dst"):
    """Range, no repeated destination, and (same pool) no destination that is also a source."""
    bad_src = (src < 0) | (src >= src_count)
    bad_dst = (dst < 0) | (dst >= dst_count)
    flags = [bad_src.any(), bad_dst.any()]
    if dst.numel():
        flags.append(torch.as_tensor(torch.unique(dst).numel() != dst.numel(), device=dst.device))
        if same_pool:
            flags.append(torch.isin(dst, src).any())
    if not bool(torch.stack(flags).any()):
        return
    # The slow path finds the first culprit in the C pre-pass's order: ranges, repeats, overlap.
    names = (src, dst, src_count, dst_count, src_name, dst_name)
    bad_range = torch.stack([bad_src, bad_dst], dim=1)
    if bool(bad_range.any()):
        i = _first(bad_range.any(dim=1))
        bad_frame_list("src" if bool(bad_src[i]) else "dst", i, *names)
    seen = set()
    for i, d in enumerate(dst.tolist()):
        if d in seen:
            bad_frame_list("duplicate", i, *names)
        seen.add(d)
    sources = set(src.tolist())
    i = next(i for i, d in enumerate(dst.tolist()) if d in sources)
    bad_frame_list("overlap", i, *names)


# ---- the same index checks on host arrays (numpy): the batch builder's, before any device copy ----

def host_batch(slot_mapping, page_table, query_start, context_lens, num_frames, page_size):
    """slots_in_range and batch_in_range on numpy arrays, with no device tensor read: a graph-captured
    forward cannot sync, so the batch builder checks what it is about to copy. All well costs a few
    numpy reductions; a failure is worded by the torch checks above (same rules, same reasons)."""
    import numpy as np
    slots = np.asarray(slot_mapping, dtype=np.int64)
    num_slots = num_frames * page_size
    if slots.size and (slots.min() < 0 or slots.max() >= num_slots):
        slots_in_range(torch.from_numpy(slots), num_slots)
    qs = np.asarray(query_start, dtype=np.int64)
    ctx = np.asarray(context_lens, dtype=np.int64)
    table = np.asarray(page_table)
    q_lens = qs[1:] - qs[:-1]
    pages = np.where(q_lens > 0, (ctx + page_size - 1) // page_size, 0)
    used = np.arange(table.shape[1])[None, :] < pages[:, None]
    ok = (qs.size == ctx.size + 1 and qs[0] == 0 and qs[-1] == slots.size and not (q_lens < 0).any()
          and not (ctx < q_lens).any() and not (pages > table.shape[1]).any()
          and not (used & ((table < 0) | (table >= num_frames))).any())
    if not ok:
        if qs.size != ctx.size + 1:
            fail(f"query_start has {qs.size} entries, expected {ctx.size + 1}")
        batch_in_range(torch.from_numpy(table), torch.from_numpy(qs), torch.from_numpy(ctx), slots.size,
                       num_frames, page_size)
        raise KernelPanic("host_batch: the torch check found nothing wrong where the numpy check did")
