"""The fused layer ops bound to one forward step on the CPU (float32 activations): checked once a step.

A CPU forward makes one CpuStep per step. Its constructor runs the full checks of fused.py and
dispatch.py on everything fixed for the step (positions, slots, page table, the RoPE tables, the KV
view's geometry) and allocates the step's buffers (the norm output h, attention's out); the norm
weights are checked once per program (NormWeights). Per layer only the fresh tensor a GEMM returned
is checked, with a few attribute reads (float32 on the CPU, the step's shape, dense rows), and the C
kernel of csrc/cpu/fused.c or attention.c runs. Index ranges (positions, slots, the page table) are
checked by the C pre-passes on layer 0, whose indices every later layer reuses. A bad argument is
KvosError(EINVAL) before any write. The buffers are reused by every layer: a caller consumes each
result (h, attention's out, the SiLU output) before the next call that writes it.
"""
import math

import torch

from kernel.ops import cpu, dispatch
from kernel.ops import validate as val

_CPU = torch.device("cpu")


class NormWeights:
    """RMSNorm weights (float32, contiguous, (hidden,) each) checked once and held for a program's life."""
    __slots__ = ("tensors", "hidden", "pointers")

    def __init__(self, tensors, hidden: int):
        for i, w in enumerate(tensors):
            val.tensor(f"norm weight {i}", w, ndim=1, dtypes=(torch.float32,), device=_CPU)
            if w.shape[0] != hidden or not w.is_contiguous():
                val.fail(f"norm weight {i} must be contiguous ({hidden},), has shape {tuple(w.shape)}")
        self.tensors, self.hidden = tuple(tensors), hidden
        cpu._load()
        self.pointers = tuple(cpu._ptr(w) for w in self.tensors)     # the C calls' arguments, made once


def _fresh(name, t, shape):
    """The per-layer check of a GEMM's output: what the C kernels assume of it."""
    if not (type(t) is torch.Tensor and t.dtype is torch.float32 and t.device.type == "cpu"
            and t.shape == shape and t.stride(-1) == 1):
        val.tensor(name, t, ndim=len(shape), dtypes=(torch.float32,), device=_CPU)
        val.fail(f"{name} must be float32 {tuple(shape)} with dense rows, is {tuple(t.shape)} {t.stride()}")


def _float_ptr(t):
    """A float * to t's data: offsets into it (q, k, v of one qkv row block) are cffi pointer arithmetic."""
    return cpu._ext.ffi.cast("float *", t.data_ptr())


class CpuStep:
    """One step's bound ops; layer i's calls read kv.layer(i) and norm weights by index."""

    def __init__(self, *, num_tokens, hidden, eps, norms: NormWeights, num_heads, kv_heads, head_dim, inter,
                 cos, sin, positions, slot_mapping, page_table, query_start, context_lens, scale, kv):
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            val.fail(f"eps must be a positive finite number, not {eps!r}")
        if norms.hidden != hidden:
            val.fail(f"norm weights are ({norms.hidden},), the step's rows {hidden} wide")
        self.n, self.hidden, self.eps, self.norms = num_tokens, hidden, float(eps), norms.tensors
        self.nq, self.nkv, self.d = num_heads, kv_heads, head_dim
        self.q_size, self.k_end = num_heads * head_dim, (num_heads + kv_heads) * head_dim
        self.qkv_shape = torch.Size((num_tokens, self.k_end + kv_heads * head_dim))
        self.rows_shape = torch.Size((num_tokens, hidden))
        self.kv, self.scale = kv, val.scale_value(scale)
        self.h = torch.empty(num_tokens, hidden)
        # Layer 0's caches stand for every layer's: KVView cuts each layer's pair with one size and stride.
        k_cache, v_cache = kv.layer(0)
        val.cache_pair(k_cache, v_cache)
        if k_cache.dtype not in dispatch.CPU_DTYPES or k_cache.shape[2:] != (kv_heads, head_dim):
            val.fail(f"the cache holds {k_cache.dtype} {tuple(k_cache.shape)}, the step wants "
                     f"({kv_heads}, {head_dim}) heads in {dispatch.CPU_DTYPES}")
        self.cache_bf16 = int(k_cache.dtype == torch.bfloat16)
        self.geometry = (k_cache.shape[0], k_cache.shape[1], *k_cache.stride()[:3])
        for name, t, width in (("cos", cos, head_dim), ("sin", sin, head_dim // 2)):
            val.tensor(name, t, ndim=2, dtypes=(torch.float32,), device=_CPU)
            val.rows_contiguous(name, t)
            if t.shape[1] != width or t.shape[0] != cos.shape[0]:
                val.fail(f"{name} has shape {tuple(t.shape)}, expected (positions, {width}) like cos")
        if head_dim % 2:
            val.fail(f"RoPE needs an even head_dim, not {head_dim}")
        self.cos, self.sin = cos, sin
        self.positions = val.index("positions", positions, length=num_tokens, device=_CPU)
        self.slots = val.index("slot_mapping", slot_mapping, length=num_tokens, device=_CPU)
        # Attention's fixed arguments through dispatch's own checks (on an empty q: nothing runs).
        self.attn = torch.empty(num_tokens, num_heads, head_dim)
        num_seqs = page_table.shape[0] if isinstance(page_table, torch.Tensor) and page_table.dim() == 2 else 0
        dispatch.paged_attention(torch.empty(0, num_heads, head_dim), k_cache, v_cache, page_table,
                                 query_start, context_lens, scale, torch.empty(0, num_heads, head_dim), check=False)
        self.page_table = val.as_int32("page_table", page_table)
        self.context_lens = val.index("context_lens", context_lens, length=num_seqs, device=_CPU)
        self.query_start = val.index("query_start", query_start, length=num_seqs + 1, device=_CPU)
        self.act = torch.empty(num_tokens, inter)
        self.gate_up_shape = torch.Size((num_tokens, 2 * inter))
        # Every pointer and stride fixed for the step, made once (a cffi cast costs ~0.5 us).
        self.lib, ptr = cpu._load().lib, cpu._ptr
        self.w = norms.pointers
        self.p_h, self.p_act, self.p_attn = ptr(self.h), ptr(self.act), ptr(self.attn)
        self.rope_args = (ptr(cos), cos.stride(0), ptr(sin), sin.stride(0), ptr(self.positions), cos.shape[0])
        self.table_args = (ptr(self.page_table), self.page_table.stride(0), self.page_table.shape[1],
                           ptr(self.query_start), ptr(self.context_lens), num_seqs, num_tokens, num_heads, kv_heads,
                           head_dim, self.scale)
        self.p_slots = ptr(self.slots)
        self.bad = cpu._ext.ffi.new("int64_t[2]")
        self.x = self.p_x = self.qkv = self.p_qkv = None

    def rms_norm(self, x, i):
        """h = RMSNorm(x) * norm weight i; x (tokens, hidden) becomes the residual stream add_rms_norm adds to."""
        _fresh("x", x, self.rows_shape)
        if not x.is_contiguous():
            val.fail("the residual stream x must be contiguous")
        self.x, self.p_x = x, cpu._ptr(x)
        self.lib.kvos_rms_norm(self.p_x, self.hidden, self.w[i], self.p_h, self.hidden, self.n, self.hidden, self.eps)
        return self.h

    def add_rms_norm(self, delta, i):
        """x += delta; h = RMSNorm(x) * norm weight i, x being the residual stream rms_norm was given."""
        _fresh("delta", delta, self.rows_shape)
        self.lib.kvos_add_rms_norm(self.p_x, self.hidden, cpu._ptr(delta), delta.stride(0), self.w[i], self.p_h,
                                   self.hidden, self.n, self.hidden, self.eps)
        return self.h

    def rope_write_kv(self, layer, qkv):
        """RoPE of the q heads of qkv (in place) and of its k heads; k and v into layer's cache. The
        rotated q stays in qkv for attention()."""
        _fresh("qkv", qkv, self.qkv_shape)
        k_cache, v_cache = self.kv.layer(layer)
        base, stride, d = _float_ptr(qkv), qkv.stride(0), self.d
        self.qkv, self.p_qkv = qkv, base
        rc = self.lib.kvos_rope_write_kv(
            base, stride, d, self.nq, base + self.q_size, stride, d, base + self.k_end, stride, d, *self.rope_args,
            cpu._ptr(k_cache), cpu._ptr(v_cache), self.cache_bf16, *self.geometry, self.p_slots, self.n,
            self.nkv, d, int(layer == 0), self.bad)
        if rc:      # nothing was written: the tensor call raises the same reason
            self._rope_tensors(layer, qkv, True)
            raise AssertionError(f"kvos_rope_write_kv returned {rc}, the tensor call found nothing")  # pragma: no cover

    def attention(self, layer):
        """Paged attention of the q that rope_write_kv rotated over layer's cache -> (tokens, heads * head_dim)."""
        if self.qkv is None:
            val.fail("attention needs rope_write_kv's q first")
        k_cache, v_cache = self.kv.layer(layer)
        rc = self.lib.kvos_paged_attention(
            self.p_attn, self.q_size, self.d, self.p_qkv, self.qkv.stride(0), self.d, cpu._ptr(k_cache),
            cpu._ptr(v_cache), self.cache_bf16, *self.geometry, *self.table_args, int(layer == 0), self.bad)
        if rc:      # the pre-pass found a bad index before any write: the tensor call words it
            q = self.qkv[:, :self.q_size].view(self.n, self.nq, self.d)
            cpu.paged_attention(q, k_cache, v_cache, self.page_table, self.query_start, self.context_lens,
                                self.scale, self.attn, True)
            raise AssertionError(f"kvos_paged_attention: code {rc}, the tensor call found nothing")  # pragma: no cover
        return self.attn.view(self.n, self.q_size)

    def silu_mul(self, gate_up):
        """SiLU(gate) * up of the gate/up GEMM's output, into the step's (tokens, inter) buffer."""
        _fresh("gate_up", gate_up, self.gate_up_shape)
        self.lib.kvos_silu_mul(cpu._ptr(gate_up), gate_up.stride(0), self.p_act, self.act.shape[1], self.n,
                               self.act.shape[1])
        return self.act

    def _rope_tensors(self, layer, qkv, check):
        n, d = self.n, self.d
        q = qkv[:, :self.q_size].view(n, self.nq, d)
        k = qkv[:, self.q_size:self.k_end].view(n, self.nkv, d)
        v = qkv[:, self.k_end:].view(n, self.nkv, d)
        cpu.rope_write_kv(q, k, v, self.cos, self.sin, self.positions, *self.kv.layer(layer), self.slots, check)
