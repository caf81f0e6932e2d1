"""Launches of csrc/cuda/fused.cu (arguments arrive checked by kernel/ops/fused.py): one block per
token, threads over the row; torch's tensors and stream, as in kernel/ops/cuda.py."""
import math

import numpy as np

from kernel.ops import cuda


def _block(width):
    return min(256, 32 * math.ceil(width / 32))


def add_rms_norm(residual, delta, weight, eps, out):
    tokens, hidden = residual.shape
    args = (cuda._ptr(residual), np.int64(residual.stride(0)), cuda._ptr(delta), np.int64(delta.stride(0)),
            cuda._ptr(weight), cuda._ptr(out), np.int64(out.stride(0)), np.int32(hidden), np.float32(eps))
    cuda.kernels.launch("fused.cu", f"kvos_add_rms_norm_{cuda._SUFFIX[residual.dtype]}", residual.device,
                        (tokens,), (_block(hidden),), args, shared_mem=4 * 32)   # a float per warp


def rope_write_kv(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping):
    num_frames, page_size, kv_heads, head_dim = k_cache.shape
    i64 = np.int64
    args = (cuda._ptr(q), i64(q.stride(0)), i64(q.stride(1)), cuda._ptr(k), i64(k.stride(0)), i64(k.stride(1)),
            cuda._ptr(v), i64(v.stride(0)), i64(v.stride(1)), cuda._ptr(cos), i64(cos.stride(0)),
            cuda._ptr(sin), i64(sin.stride(0)), cuda._ptr(positions), cuda._ptr(k_cache), cuda._ptr(v_cache),
            i64(page_size), *(i64(s) for s in k_cache.stride()[:3]), cuda._ptr(slot_mapping),
            np.int32(q.shape[1]), np.int32(kv_heads), np.int32(head_dim))
    cuda.kernels.launch("fused.cu", f"kvos_rope_write_kv_{cuda._SUFFIX[q.dtype]}", q.device, (q.shape[0],),
                        (_block(q.shape[1] * head_dim // 2),), args)


def silu_mul(gate_up, out):
    tokens, inter = out.shape
    args = (cuda._ptr(gate_up), np.int64(gate_up.stride(0)), cuda._ptr(out), np.int64(out.stride(0)),
            np.int32(inter))
    cuda.kernels.launch("fused.cu", f"kvos_silu_mul_{cuda._SUFFIX[gate_up.dtype]}", gate_up.device, (tokens,),
                        (_block(inter),), args)
