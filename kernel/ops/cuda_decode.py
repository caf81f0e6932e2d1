"""Paged decode attention v2 on CUDA (csrc/cuda/attention_v2.cu): its plan, work list and launch.

kernel/ops/cuda.py sends decode-shaped calls (one query row per sequence) here and keeps v1 for
prefill and mixed batches; v2 is correct for any batch (it follows each row's causal length),
only not built for long query chunks. A launch is fixed by shapes alone: grid (work items, kv
heads, groups of 8 query heads), items = rows x chunks of the page table's capacity, so the same
launch serves every step of a CUDA graph. A caller that knows the context lengths on the host
(the batch builder) may pass `work`, a device int32 (items, 2) list of (row, chunk) with the live
items first and rows of -1 after (work_list builds it): blocks past the live ones exit at once.
"""
import functools
import math

import numpy as np
import torch

from kernel.ops import cuda
from kernel.ops import validate as val

TILE = 32            # attention_v2.cu: V2_TILE
HEADS = 8            # attention_v2.cu: V2_HEADS
WARPS_MAX = 4        # attention_v2.cu: V2_WARPS_MAX
STAGES = 2           # attention_v2.cu: V2_STAGES (a variant built with -DV2_STAGES=n sets this too)
SMEM_BUDGET = 100 * 1024   # per block: two blocks of the largest layouts fit an SM (228 KiB on Hopper)

# attention_v2.cu: struct attn_v2_args (tests compare the layouts).
ATTN_V2_ARGS = np.dtype([("a", cuda.ATTN_ARGS), ("work", np.uint64)], align=True)


def _round16(x):
    return (x + 15) // 16 * 16


def layout(warps, head_dim, itemsize, chunk, page_size, stages=None):
    """Byte offsets of a block's shared-memory regions and its total (attention_v2.cu: v2_layout)."""
    stages = STAGES if stages is None else stages
    row_bytes = _round16(head_dim * itemsize) + 16
    sizes = [("frames", _round16(4 * (chunk // page_size + 2))), ("q", _round16(4 * HEADS * head_dim)),
             ("off", 8 * warps * TILE), ("p", 4 * warps * HEADS * TILE),
             ("ring", warps * stages * 2 * TILE * row_bytes)]
    at, offsets = 0, {}
    for name, size in sizes:
        offsets[name] = at
        at += size
    offsets["total"] = at
    return offsets


@functools.cache
def _sm_count(device_index):
    if device_index is None or not torch.cuda.is_available():
        return 132   # the emulator (tensors on the CPU): an H100's count, so plans match a GPU's
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan(rows, kv_heads, group, head_dim, itemsize, capacity, page_size, chunk=None, sms=132):
    """(warps per block, chunk size, chunks per row, shared bytes) of a launch.

    Chunk: 512 tokens, halved (down to 64) while the blocks would be fewer than 4 per SM; it
    depends only on shapes, so a graph captured for a batch size stays valid. Warps: as many
    (up to 4) as the chunk has tiles and SMEM_BUDGET has room for their rings."""
    blocks_per_row = kv_heads * math.ceil(group / HEADS)
    if chunk is None:
        chunk = 512
        while chunk > 64 and rows * blocks_per_row * math.ceil(capacity / chunk) < 4 * sms:
            chunk //= 2
    chunks = max(1, math.ceil(capacity / chunk))
    warps = min(WARPS_MAX, math.ceil(min(chunk, capacity) / TILE))   # no warp without a tile
    while warps > 1 and layout(warps, head_dim, itemsize, chunk, page_size)["total"] > SMEM_BUDGET:
        warps -= 1
    return warps, chunk, chunks, layout(warps, head_dim, itemsize, chunk, page_size)["total"]


def work_list(context_lens, chunk, chunks):
    """Host int32 (rows * chunks, 2): the live (row, chunk) items of a decode batch whose row r has
    context_lens[r] tokens, longest rows' chunks first, then (-1, -1) padding to a fixed size."""
    lens = np.asarray(context_lens, dtype=np.int64)
    items = np.full((len(lens) * chunks, 2), -1, dtype=np.int32)
    used = np.minimum(-(-lens // chunk), chunks)
    order = np.argsort(-used, kind="stable")
    rows = np.repeat(order, used[order])
    within = np.arange(len(rows)) - np.repeat(np.cumsum(used[order]) - used[order], used[order])
    items[:len(rows), 0], items[:len(rows), 1] = rows, within
    return items


def paged_attention(q, k_cache, v_cache, page_table, query_start, context_lens, scale, out, check,
                    work=None, chunk=None):
    """v2 of cuda.paged_attention (arguments checked by dispatch.py). `work` (device int32
    (rows * chunks, 2), see work_list) needs the `chunk` it was built with."""
    num_frames, page_size, kv_heads, head_dim = k_cache.shape
    num_tokens, num_heads = q.shape[0], q.shape[1]
    group = num_heads // kv_heads
    device, itemsize = q.device, k_cache.element_size()
    if work is not None and chunk is None:
        val.fail("a work list needs the chunk size it was built with")
    if head_dim > 256:
        return cuda.paged_attention_v1(q, k_cache, v_cache, page_table, query_start, context_lens, scale, out,
                                       check)
    aligned = cuda._aligned16(k_cache.data_ptr(), v_cache.data_ptr(), head_dim * itemsize,
                              *(s * itemsize for s in k_cache.stride()[:3]))
    capacity = page_table.shape[1] * page_size
    warps, chunk, chunks, smem = plan(num_tokens, kv_heads, group, head_dim, itemsize, capacity, page_size,
                                      chunk, _sm_count(device.index if device.type == "cuda" else None))
    items = num_tokens * chunks
    if work is not None:
        val.tensor("work", work, ndim=2, dtypes=(torch.int32,), device=device)
        if tuple(work.shape) != (items, 2) or not work.is_contiguous():
            val.fail(f"work has shape {tuple(work.shape)}, expected contiguous ({items}, 2)")
    f32 = dict(dtype=torch.float32, device=device)
    parts = [torch.empty(0, **f32)] * 3
    if chunks > 1:
        parts = [torch.empty((num_tokens, num_heads, chunks), **f32),
                 torch.empty((num_tokens, num_heads, chunks), **f32),
                 torch.empty((num_tokens, num_heads, chunks, head_dim), **f32)]
    args = np.zeros(1, dtype=ATTN_V2_ARGS)
    args[0]["a"] = (out.data_ptr(), out.stride(0), out.stride(1), q.data_ptr(), q.stride(0), q.stride(1),
                    k_cache.data_ptr(), v_cache.data_ptr(), page_size, *k_cache.stride()[:3],
                    page_table.data_ptr(), page_table.stride(0), query_start.data_ptr(), context_lens.data_ptr(),
                    context_lens.shape[0], num_heads, group, head_dim, scale * cuda._LOG2E, chunk, chunks,
                    *(p.data_ptr() for p in parts))
    args[0]["work"] = 0 if work is None else work.data_ptr()
    bound = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    name = f"kvos_decode_attention_{cuda._SUFFIX[q.dtype]}{'' if aligned else '_unaligned'}_d{bound}"
    cuda.kernels.launch("attention_v2.cu", name, device, (items, kv_heads, math.ceil(group / HEADS)),
                        (32 * warps,), (args,), shared_mem=smem)
    if chunks > 1:
        block = min(256, 32 * math.ceil(head_dim / 32))
        combine_args = np.array(args[0]["a"], dtype=cuda.ATTN_ARGS)
        cuda.kernels.launch("attention.cu", f"kvos_attention_combine_{cuda._SUFFIX[q.dtype]}", device,
                            (num_tokens, num_heads), (block,), (combine_args,))
    return out
