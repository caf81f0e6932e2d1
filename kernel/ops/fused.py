"""Fused layer ops: residual add + RMSNorm, RoPE + write_kv, SiLU x up (each one kernel on CUDA).

Each keeps the signature of its twin in reference.py (plus `check=` where indices are read), checks
every argument before any memory is written (KvosError EINVAL), then runs csrc/cuda/fused.cu on
CUDA tensors (kernel/ops/cuda_fused.py), csrc/cpu/fused.c on float32 CPU tensors (kernel/ops/cpu.py;
a bf16 or int8 cache is narrowed in C), or the twin on bfloat16 CPU activations. The CPU forward calls the
C kernels through kernel/ops/step_ops.py, which checks the same things once per step.
"""
import math

import torch

from kernel.ops import dispatch
from kernel.ops import validate as val


def _backend(device, dtype=torch.float32):
    if device.type == "cuda":
        from kernel.ops import cuda_fused
        return cuda_fused
    if device.type == "cpu" and dtype == torch.float32:
        from kernel.ops import cpu
        return cpu
    if device.type == "cpu":
        from kernel.ops import reference
        return reference
    val.fail(f"kernel/ops runs on cpu or cuda tensors, not {device.type}")


def _rows(name, t, like, width=None):
    """A (tokens, width) tensor of like's dtype and device with a dense last dimension."""
    val.tensor(name, t, ndim=2, dtypes=(like.dtype,), device=like.device)
    val.rows_contiguous(name, t)
    want = (like.shape[0], like.shape[1] if width is None else width)
    if tuple(t.shape) != want:
        val.fail(f"{name} has shape {tuple(t.shape)}, expected {want}")


def _float_dtype(name, t):
    dtypes = dispatch._float_dtypes(t.device)
    if t.dtype not in dtypes:
        val.fail(f"{t.device.type} {name} holds {dtypes}, not {t.dtype}")


def add_rms_norm(residual, delta, weight, eps, out=None):
    """residual += delta; out = RMSNorm(residual) * weight (see reference.add_rms_norm). out may be
    residual itself; other overlaps are undefined."""
    val.tensor("residual", residual, ndim=2)
    _float_dtype("residual", residual)
    val.rows_contiguous("residual", residual)
    _rows("delta", delta, residual)
    val.tensor("weight", weight, ndim=1, dtypes=(residual.dtype,), device=residual.device)
    if weight.shape[0] != residual.shape[1] or not weight.is_contiguous():
        val.fail(f"weight must be contiguous ({residual.shape[1]},), has shape {tuple(weight.shape)}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        val.fail(f"eps must be a positive finite number, not {eps!r}")
    if out is None:
        out = torch.empty_like(residual)
    _rows("out", out, residual)
    if residual.shape[0]:
        _backend(residual.device, residual.dtype).add_rms_norm(residual, delta, weight, float(eps), out)
    return out


def rope_write_kv(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping, *, check=True):
    """RoPE of q (in place) and k; the rotated k and v into their slots (see reference.rope_write_kv).
    With check, positions and slots are range-checked (on CUDA: one host sync)."""
    val.cache_pair(k_cache, v_cache)
    device = k_cache.device
    _backend(device)
    dispatch._cache_dtype(device, k_cache)
    num_frames, page_size, kv_heads, head_dim = k_cache.shape
    act = dispatch._activation_dtype(device, k_cache.dtype)
    if head_dim % 2:
        val.fail(f"RoPE needs an even head_dim, not {head_dim}")
    val.tensor("q", q, ndim=3, dtypes=(act,), device=device)
    val.rows_contiguous("q", q)
    num_tokens = q.shape[0]
    if q.shape[2] != head_dim:
        val.fail(f"q has head_dim {q.shape[2]}, the cache {head_dim}")
    for name, t in (("k", k), ("v", v)):
        val.tensor(name, t, ndim=3, dtypes=(act,), device=device)
        val.rows_contiguous(name, t)
        if tuple(t.shape) != (num_tokens, kv_heads, head_dim):
            val.fail(f"{name} has shape {tuple(t.shape)}, expected ({num_tokens}, {kv_heads}, {head_dim})")
    for name, t, width in (("cos", cos, head_dim), ("sin", sin, head_dim // 2)):
        val.tensor(name, t, ndim=2, dtypes=(act,), device=device)
        val.rows_contiguous(name, t)
        if t.shape[1] != width or t.shape[0] != cos.shape[0]:
            val.fail(f"{name} has shape {tuple(t.shape)}, expected (positions, {width}) like cos")
    positions = val.index("positions", positions, length=num_tokens, device=device)
    slots = val.index("slot_mapping", slot_mapping, length=num_tokens, device=device)
    if num_tokens == 0:
        return
    if device.type == "cpu":        # float32 activations: the C kernel checks every index before a write
        from kernel.ops import cpu
        cpu.rope_write_kv(q, k, v, cos, sin, positions, k_cache, v_cache, slots, True)
        return
    if check:
        positions_in_range(positions, cos.shape[0])
        val.slots_in_range(slots, num_frames * page_size)
    _backend(device).rope_write_kv(q, k, v, cos, sin, positions, k_cache, v_cache, slots)


def positions_in_range(positions, num_positions):
    bad = (positions < 0) | (positions >= num_positions)
    if bool(bad.any()):
        t = int(torch.nonzero(bad)[0, 0])
        val.fail(f"positions[{t}] = {int(positions[t])} is outside the RoPE tables' {num_positions} rows")


def silu_mul(gate_up, out=None):
    """out = SiLU(gate) * up of (tokens, 2 * inter) rows (see reference.silu_mul)."""
    val.tensor("gate_up", gate_up, ndim=2)
    _float_dtype("gate_up", gate_up)
    val.rows_contiguous("gate_up", gate_up)
    if gate_up.shape[1] % 2:
        val.fail(f"gate_up's width {gate_up.shape[1]} is not 2 * inter")
    inter = gate_up.shape[1] // 2
    if out is None:
        out = torch.empty(gate_up.shape[0], inter, dtype=gate_up.dtype, device=gate_up.device)
    _rows("out", out, gate_up, inter)
    if gate_up.shape[0]:
        _backend(gate_up.device, gate_up.dtype).silu_mul(gate_up, out)
    return out
