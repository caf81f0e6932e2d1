"""The CUDA path of kernel/ops: the kernels of csrc/cuda, compiled at first use by CuPy.

CuPy is imported only when a CUDA tensor arrives. Sources are compiled with NVRTC (CuPy
picks -arch=sm_90 on Hopper) against csrc/common, the math the CPU kernels use too.
Tensors stay torch's: kernels get their data pointers and run on torch's current stream,
so no copy is made and ordering with torch's own work is kept. Arguments arrive checked
(dispatch.py). Swap copies read and write the pinned host swap area directly.
"""
import hashlib
import math
import os
import pathlib

import numpy as np
import torch

from kernel.errors import ENODEV, KernelPanic, KvosError

THREADS = 128        # csrc/cuda/attention.cu: THREADS
G_BATCH = 4          # csrc/cuda/attention.cu: G_BATCH
COPY_CHUNK = 8192    # csrc/cuda/frames.cu: CHUNK_BYTES
SMEM_DEFAULT = 48 * 1024
DECODE_KERNEL = os.environ.get("KVOS_CUDA_DECODE", "v2")   # "v1": the v1 kernel for decode too

# csrc/cuda/attention.cu: struct attn_args, field for field (tests compare the layouts).
ATTN_ARGS = np.dtype([
    ("out", np.uint64), ("out_tok_stride", np.int64), ("out_head_stride", np.int64),
    ("q", np.uint64), ("q_tok_stride", np.int64), ("q_head_stride", np.int64),
    ("k_cache", np.uint64), ("v_cache", np.uint64), ("page_size", np.int64), ("frame_stride", np.int64),
    ("token_stride", np.int64), ("head_stride", np.int64),
    ("page_table", np.uint64), ("page_table_stride", np.int64),
    ("query_start", np.uint64), ("context_lens", np.uint64), ("num_seqs", np.int32),
    ("num_heads", np.int32), ("group", np.int32), ("head_dim", np.int32),
    ("q_scale", np.float32), ("partition_size", np.int32), ("num_partitions", np.int32),
    ("part_m", np.uint64), ("part_l", np.uint64), ("part_acc", np.uint64),
], align=True)

_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_LOG2E = 1.4426950408889634


def csrc_dir() -> pathlib.Path:
    """csrc/ of the source tree (or of an installed package: the same place, two levels up)."""
    env = os.environ.get("KVOS_CSRC")
    path = pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parents[2] / "csrc"
    if not (path / "cuda").is_dir() or not (path / "common").is_dir():
        raise KernelPanic(f"cuda: no CUDA sources at {path} (set KVOS_CSRC to the csrc folder)")
    return path


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise KvosError(ENODEV, f"CUDA tensors need CuPy (pip install cupy-cuda12x or -cuda13x): {e}") from None
    return cupy


class _Kernels:
    """The compiled modules of csrc/cuda, one per source file, and their functions."""

    def __init__(self):
        self._modules, self._functions, self._streams = {}, {}, {}

    def source(self, name):
        root = csrc_dir()
        code = (root / "cuda" / name).read_text()
        # CuPy's kernel cache keys on the code text only: name the headers' content in it.
        headers = sorted((root / "common").glob("*.h")) + sorted((root / "cuda").glob("*.cuh"))
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in headers)).hexdigest()[:16]
        options = ("-std=c++17", f"-I{root / 'common'}", f"-I{root / 'cuda'}")
        return f"// kvos headers {digest}\n{code}", options

    def module(self, name):
        if name not in self._modules:
            cupy = _cupy()
            code, options = self.source(name)
            try:
                module = cupy.RawModule(code=code, options=options, backend="nvrtc")
                module.compile()
            except cupy.cuda.compiler.CompileException as nvrtc_error:
                try:   # NVRTC builds lack some headers on some installs; nvcc is the fallback
                    module = cupy.RawModule(code=code, options=options, backend="nvcc")
                    module.compile()
                except Exception:
                    raise KernelPanic(f"cuda: {name} does not compile: {nvrtc_error}") from nvrtc_error
            self._modules[name] = module
        return self._modules[name]

    def function(self, module, name, device):
        key = (module, name, device.index)
        if key not in self._functions:
            self._functions[key] = self.module(module).get_function(name)
        return self._functions[key]

    def stream(self, device):
        """torch's current stream on `device`, as a CuPy stream object."""
        ptr = torch.cuda.current_stream(device).cuda_stream
        if ptr not in self._streams:
            self._streams[ptr] = _cupy().cuda.ExternalStream(ptr, device.index)
        return self._streams[ptr]

    def launch(self, module, name, device, grid, block, args, shared_mem=0):
        cupy = _cupy()
        with cupy.cuda.Device(device.index):
            fn = self.function(module, name, device)
            if shared_mem > SMEM_DEFAULT and fn.max_dynamic_shared_size_bytes < shared_mem:
                fn.max_dynamic_shared_size_bytes = shared_mem
            fn(grid, block, args, shared_mem=shared_mem, stream=self.stream(device))


kernels = _Kernels()


def _ptr(t):
    return np.uint64(t.data_ptr())


def _i64(*values):
    return tuple(np.int64(v) for v in values)


def _aligned16(*values):
    return all(v % 16 == 0 for v in values)


def write_kv(k_cache, v_cache, k, v, slot_mapping, check):
    num_frames, page_size, kv_heads, head_dim = k_cache.shape
    bits = "b32" if k_cache.element_size() == 4 else "b16"
    block = min(256, 32 * math.ceil(kv_heads * head_dim / 32))
    args = (_ptr(k_cache), _ptr(v_cache), *_i64(page_size, *k_cache.stride()[:3]), _ptr(k), _ptr(v),
            *_i64(k.stride(0), k.stride(1), v.stride(0), v.stride(1)), _ptr(slot_mapping),
            np.int32(kv_heads), np.int32(head_dim))
    kernels.launch("write_kv.cu", f"kvos_write_kv_{bits}", k_cache.device, (k.shape[0],), (block,), args)


def attention_plan(group, head_dim, itemsize, aligned, capacity, partition=None):
    """Partition size, partition count, vector width and shared memory of a launch.

    Contexts longer than a partition (512 tokens, fewer for wide GQA groups so the scores
    fit in shared memory) are split across blocks, which keeps the GPU busy on small
    decode batches; tests pass a small `partition` to exercise the merge."""
    vec = 16 // itemsize if aligned else 1
    chunks = head_dim // vec
    slices = THREADS // min(chunks, THREADS)
    if partition is None:
        partition = 512 if group <= 8 else max(32, 4096 // group)

    def shared(ps):
        return 8 * ps + 4 * (group * head_dim + group * ps + slices * G_BATCH * head_dim + 2 * group)
    while shared(partition) > 96 * 1024 and partition > 32:
        partition //= 2
    return partition, max(1, math.ceil(capacity / partition)), vec, shared(partition)


def paged_attention(q, k_cache, v_cache, page_table, query_start, context_lens, scale, out, check):
    """Decode-shaped calls (a query row per sequence) take v2 (cuda_decode.py: split-K, cp.async);
    prefill chunks and mixed batches take v1. KVOS_CUDA_DECODE=v1 keeps v1 for everything."""
    if q.shape[0] == context_lens.shape[0] and DECODE_KERNEL == "v2":
        from kernel.ops import cuda_decode
        return cuda_decode.paged_attention(q, k_cache, v_cache, page_table, query_start, context_lens, scale,
                                           out, check)
    return paged_attention_v1(q, k_cache, v_cache, page_table, query_start, context_lens, scale, out, check)


def paged_attention_v1(q, k_cache, v_cache, page_table, query_start, context_lens, scale, out, check):
    """attention.cu: a block per (query row, kv head, partition of 512 tokens), partitions merged."""
    num_frames, page_size, kv_heads, head_dim = k_cache.shape
    num_tokens, num_heads = q.shape[0], q.shape[1]
    group = num_heads // kv_heads
    device, itemsize = q.device, k_cache.element_size()
    aligned = _aligned16(k_cache.data_ptr(), v_cache.data_ptr(), head_dim * itemsize,
                         *(s * itemsize for s in k_cache.stride()[:3]))
    partition, num_partitions, vec, smem = attention_plan(group, head_dim, itemsize, aligned,
                                                          page_table.shape[1] * page_size)
    f32 = dict(dtype=torch.float32, device=device)
    parts = [torch.empty(0, **f32)] * 3
    if num_partitions > 1:
        parts = [torch.empty((num_tokens, num_heads, num_partitions), **f32),
                 torch.empty((num_tokens, num_heads, num_partitions), **f32),
                 torch.empty((num_tokens, num_heads, num_partitions, head_dim), **f32)]
    args = np.zeros(1, dtype=ATTN_ARGS)
    args[0] = (out.data_ptr(), out.stride(0), out.stride(1), q.data_ptr(), q.stride(0), q.stride(1),
               k_cache.data_ptr(), v_cache.data_ptr(), page_size, *k_cache.stride()[:3],
               page_table.data_ptr(), page_table.stride(0), query_start.data_ptr(), context_lens.data_ptr(),
               context_lens.shape[0], num_heads, group, head_dim, scale * _LOG2E, partition, num_partitions,
               *(p.data_ptr() for p in parts))
    suffix = _SUFFIX[q.dtype] + ("" if vec > 1 else "_unaligned")
    kernels.launch("attention.cu", f"kvos_paged_attention_{suffix}", device,
                   (num_tokens, kv_heads, num_partitions), (THREADS,), (args,), shared_mem=smem)
    if num_partitions > 1:
        block = min(256, 32 * math.ceil(head_dim / 32))
        kernels.launch("attention.cu", f"kvos_attention_combine_{_SUFFIX[q.dtype]}", device,
                       (num_tokens, num_heads), (block,), (args,))
    return out


def copy_frames(src_pool, dst_pool, src, dst, check, src_name="src", dst_name="dst"):
    """dst_pool[dst[i]] = src_pool[src[i]]; either pool may be the pinned host swap area."""
    gpu = src_pool.device if src_pool.device.type == "cuda" else dst_pool.device
    src, dst = src.to(gpu, non_blocking=True), dst.to(gpu, non_blocking=True)
    frame_bytes = src_pool.shape[1]
    width = "16" if _aligned16(frame_bytes, src_pool.data_ptr(), dst_pool.data_ptr()) else "1"
    grid = (src.shape[0], math.ceil(frame_bytes / COPY_CHUNK))
    kernels.launch("frames.cu", f"kvos_copy_frames_{width}", gpu, grid, (256,),
                   (_ptr(src_pool), _ptr(dst_pool), np.int64(frame_bytes), _ptr(src), _ptr(dst)))


def qmm(x, packed, n, bits, out):
    """out = x @ W^T on packed 4/8-bit blocks (csrc/cuda/qmm.cu; arguments checked by kernel/ops/qblocks.py)."""
    m, k = x.shape
    kb = packed.shape[1]
    xq = torch.empty(m, kb * 32, dtype=torch.int8, device=x.device)
    xd, xs = (torch.empty(m, kb, dtype=torch.float32, device=x.device) for _ in range(2))
    kernels.launch("qmm.cu", "kvos_qmm_quantize", x.device, (m,), (32,),
                   (_ptr(x), *_i64(x.stride(0), k, kb), _ptr(xq), _ptr(xd), _ptr(xs)))
    kernels.launch("qmm.cu", "kvos_qmm_blocks", x.device, (packed.shape[0],), (32,),
                   (_ptr(out), *_i64(out.stride(0)), _ptr(xq), _ptr(xd), _ptr(xs), *_i64(m, kb),
                    _ptr(packed), np.int64(n), np.int32(bits)))
    return out
