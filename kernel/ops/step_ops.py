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
import copy
import math

import torch

from kernel.errors import ENOMEM, KvosError
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


class LayerWeights:
    """Every decoder layer's four GEMMs (QKV, O, gate/up, down) as csrc/cpu/layers.c reads them:
    checked once, held with their tensors for a program's life. Each GEMM is given as
    (kind, packed, n, k, bits, bias): kind "panel" (float32 panels of ops.panel_pack), "panel_bf16"
    (its bf16 panels, x rounded inside) or "qmm" (ops.qmm_pack's 4/8-bit blocks); bias float32 (n,) or None."""
    KINDS = {"panel": 1, "panel_bf16": 2, "qmm": 3}
    NAMES = ("qkv", "o", "gate_up", "down")

    def __init__(self, layers, *, hidden, inter, num_heads, kv_heads, head_dim):
        from kernel.ops import panel, qblocks
        q_size, qkv_width = num_heads * head_dim, (num_heads + 2 * kv_heads) * head_dim
        shapes = {"qkv": (qkv_width, hidden), "o": (hidden, q_size), "gate_up": (2 * inter, hidden),
                  "down": (hidden, inter)}
        cpu._load()
        ffi = cpu._ext.ffi
        self.table = ffi.new("kvos_layer[]", len(layers))
        self.tensors = []          # what the table points into, alive as long as it is
        self.shape = (hidden, inter, num_heads, kv_heads, head_dim)
        for i, gemms in enumerate(layers):
            if len(gemms) != 4:
                val.fail(f"layer {i} has {len(gemms)} GEMMs, not the 4 of {self.NAMES}")
            for name, (kind, packed, n, k, bits, bias) in zip(self.NAMES, gemms):
                what = f"layer {i}'s {name}"
                if (n, k) != shapes[name]:
                    val.fail(f"{what} is ({n}, {k}), the model's {shapes[name]}")
                if kind == "qmm":
                    qblocks._check_packed(packed, n, k, bits)
                    if packed.device.type != "cpu":
                        val.fail(f"{what} is on {packed.device}, not the cpu")
                elif kind in ("panel", "panel_bf16"):
                    panel._packed(packed, n)
                    want = torch.float32 if kind == "panel" else torch.bfloat16
                    pk = k if kind == "panel" else -(-k // 2)
                    if packed.dtype != want or packed.shape[1] != pk:
                        val.fail(f"{what}: {kind} wants {want} panels of k {pk}, "
                                 f"has {packed.dtype} {tuple(packed.shape)}")
                    bits = 0
                else:
                    val.fail(f"{what} is of kind {kind!r}, not one of {list(self.KINDS)}")
                if bias is not None:
                    val.tensor(f"{what} bias", bias, ndim=1, dtypes=(torch.float32,), device=_CPU)
                    if bias.shape[0] != n or not bias.is_contiguous():
                        val.fail(f"{what} bias must be contiguous ({n},), is {tuple(bias.shape)}")
                entry = getattr(self.table[i], name)
                entry.kind, entry.w, entry.n, entry.k, entry.bits = self.KINDS[kind], cpu._ptr(packed), n, k, bits
                entry.bias = ffi.NULL if bias is None else cpu._ptr(bias)
                self.tensors += [packed, bias]
        self.num_layers = len(layers)
        self.lora = None           # with_deltas: (largest r, adapters) of its deltas

    def takes_deltas(self, layer: int, name: str) -> bool:
        """Whether layer's GEMM `name` can take LoRA deltas in C (float32 panels or qmm blocks)."""
        return getattr(self.table[layer], name).kind != self.KINDS["panel_bf16"]

    def with_deltas(self, adapters) -> "LayerWeights":
        """These weights with LoRA adapters' deltas on their GEMMs (an adapter's own program, or a batch
        of a base's and its adapters' rows): adapters is [{(layer, name): (a, b, r)}], a and b float32
        panels (ops.panel_pack; A's narrow) of A (r, k) and B (n, r) on the GEMM `name` of NAMES (lora.py's
        LoraWeights.c_delta, checked when it was made); which rows each adapter's deltas take is the
        step's (CpuStep.layers' lora_rows). Only float32-panel and qmm GEMMs take deltas (takes_deltas:
        a bf16-panel GEMM rounds x first, which its deltas do not): EINVAL otherwise. The new object
        shares every tensor of this one."""
        ffi = cpu._ext.ffi
        out = copy.copy(self)
        out.table = ffi.new("kvos_layer[]", self.num_layers)
        ffi.memmove(out.table, self.table, ffi.sizeof("kvos_layer") * self.num_layers)
        from kernel.ops import panel
        per_gemm, r_max = {}, 0
        for adapter, deltas in enumerate(adapters):
            for (layer, name), (a, b, r) in deltas.items():
                per_gemm.setdefault((layer, name), []).append((a, b, r, adapter))
                r_max = max(r_max, r)
        out.keep, out.tensors = [], list(self.tensors)
        for (layer, name), found in per_gemm.items():
            if not 0 <= layer < self.num_layers or name not in self.NAMES:
                val.fail(f"a LoRA delta on layer {layer}'s {name!r}: the weights have {self.num_layers} layers "
                         f"of {self.NAMES}")
            if not self.takes_deltas(layer, name):
                val.fail(f"layer {layer}'s {name} runs bf16 panels: its LoRA deltas stay in the Python loop")
            entry = getattr(out.table[layer], name)
            for a, b, r, _ in found:     # what the C loop reads: A (r, k) in narrow and B (n, r) in wide panels
                panel._packed(a, r)
                panel._packed(b, entry.n)
                if (a.dtype != torch.float32 or b.dtype != torch.float32 or a.shape[1] != entry.k or b.shape[1] != r
                        or a.shape[2] != panel.NARROW or b.shape[2] != panel.PANEL):
                    val.fail(f"layer {layer}'s {name} ({entry.n}, {entry.k}): a LoRA delta of rank {r} needs "
                             f"float32 panels of ({r}, {entry.k}), {panel.NARROW} wide, and ({entry.n}, {r}), "
                             f"{panel.PANEL} wide; has {a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
            array = ffi.new("kvos_lora_delta[]", len(found))
            for d, (a, b, r, adapter) in zip(array, found):
                b_k = _nonzero_k(b)
                d.a, d.b, d.r, d.adapter = cpu._ptr(a), cpu._ptr(b), r, adapter
                d.b_k = ffi.cast("int32_t *", b_k.data_ptr())
                out.tensors += [a, b, b_k]
            entry.deltas, entry.num_deltas = array, len(found)
            out.keep.append(array)
        out.lora = (r_max, len(adapters)) if per_gemm else None
        return out


def _nonzero_k(b: torch.Tensor) -> torch.Tensor:
    """Per wide panel of a delta's B (panels, r, PANEL), the k rows [first, last + 1) holding a nonzero
    weight, (0, 0) for none: what kvos_panel_mm_kranges reads. A slot's B is block-diagonal over its
    pieces (q, k and v: each panel's columns take one piece's rank rows), so about a third to a half
    of it is skipped, with the bits of the whole panels (csrc/cpu/panel_mm.c says why)."""
    rows = (b != 0).any(dim=2)                                  # (panels, r)
    r, some = rows.shape[1], rows.any(dim=1)
    first = torch.where(some, rows.int().argmax(dim=1), 0)
    last = torch.where(some, r - rows.flip(1).int().argmax(dim=1), 0)
    return torch.stack([first, last], dim=1).to(torch.int32).contiguous()


def _row_sets(lora_rows, adapters: int, n: int):
    """(what to keep alive, kvos_row_set[adapters]) of lora_rows, checked: ascending (start, end) ranges
    inside the step's n rows, or None (every row)."""
    if not isinstance(lora_rows, (list, tuple)) or len(lora_rows) != adapters:
        val.fail(f"the weights' LoRA deltas need the rows of {adapters} adapters, not {lora_rows!r}")
    ffi = cpu._ext.ffi
    sets, keep = ffi.new("kvos_row_set[]", adapters), []
    for row_set, rows in zip(sets, lora_rows):
        if rows is None:
            row_set.num_ranges = -1
            continue
        flat = [int(v) for pair in rows for v in pair]
        if (len(flat) != 2 * len(rows) or any(not 0 <= s < e <= n for s, e in zip(flat[::2], flat[1::2]))
                or any(e > s for e, s in zip(flat[1:-1:2], flat[2::2]))):      # each range after the last
            val.fail(f"LoRA rows {rows} are not ascending (start, end) ranges inside the step's {n} rows")
        row_set.ranges = pairs = ffi.new("int64_t[]", flat)
        row_set.num_ranges = len(rows)
        keep.append(pairs)
    return (sets, keep), sets


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
        if k_cache.dtype not in dispatch.CPU_CACHE_DTYPES or k_cache.shape[2:] != (kv_heads, head_dim):
            val.fail(f"the cache holds {k_cache.dtype} {tuple(k_cache.shape)}, the step wants "
                     f"({kv_heads}, {head_dim}) heads in {dispatch.CPU_CACHE_DTYPES}")
        self.cache_kind = cpu.cache_kind(k_cache.dtype)
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
            cpu._ptr(k_cache), cpu._ptr(v_cache), self.cache_kind, *self.geometry, self.p_slots, self.n,
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
            cpu._ptr(v_cache), self.cache_kind, *self.geometry, *self.table_args, int(layer == 0), self.bad)
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

    def layers(self, weights: LayerWeights, x, lora_rows: list | None = None):
        """Every decoder layer in one C call (csrc/cpu/layers.c): the kernels rope_write_kv, attention,
        add_rms_norm and silu_mul run, in their order, with the GEMMs between them. x is the residual
        stream rms_norm(x, 0) was given; returns h, the final norm of the stream (norm weight 2L).
        Weights with LoRA deltas take lora_rows: per adapter, its (start, end) row ranges, or None for
        every row."""
        if self.x is None or x is not self.x:
            val.fail("layers needs rms_norm(x, 0) first, on the same x")
        if weights.shape != (self.hidden, self.act.shape[1], self.nq, self.nkv, self.d):
            val.fail(f"the layer weights are for (hidden, inter, heads, kv heads, head_dim) {weights.shape}, "
                     f"the step's {(self.hidden, self.act.shape[1], self.nq, self.nkv, self.d)}")
        if 2 * weights.num_layers + 1 != len(self.w) or weights.num_layers > self.kv.num_layers:
            val.fail(f"{weights.num_layers} layers of weights, {len(self.w)} norm weights and "
                     f"{self.kv.num_layers} cache layers do not agree")
        ffi, ptr, n = cpu._ext.ffi, cpu._ptr, self.n
        qkv, gate_up, delta = (torch.empty(n, self.qkv_shape[1]), torch.empty(n, self.gate_up_shape[1]),
                               torch.empty(n, self.hidden))
        buf = ffi.new("kvos_step_buffers *", {"x": self.p_x, "h": self.p_h, "qkv": ptr(qkv), "attn": self.p_attn,
                                              "gate_up": ptr(gate_up), "act": self.p_act, "delta": ptr(delta)})
        if weights.lora is not None:         # the deltas' scratch (x A^T) and their rows
            r_max, adapters = weights.lora
            lora_xa = torch.empty(n, r_max)
            buf.lora_xa = ptr(lora_xa)
            rows_alive, buf.lora_rows = _row_sets(lora_rows, adapters, n)     # (alive through the call)
        elif lora_rows is not None:
            val.fail("lora_rows for weights without LoRA deltas")
        k0, v0 = self.kv.layer(0)
        shape = ffi.new("kvos_step_shape *")
        (shape.num_tokens, shape.hidden, shape.inter, shape.num_heads, shape.kv_heads,
         shape.head_dim) = n, self.hidden, self.act.shape[1], self.nq, self.nkv, self.d
        shape.scale = self.scale
        shape.cos, shape.cos_stride, shape.sin, shape.sin_stride, shape.positions, shape.num_positions = self.rope_args
        shape.k_cache0, shape.v_cache0, shape.cache_kind = ptr(k0), ptr(v0), self.cache_kind
        shape.layer_stride = self.kv.layer_stride
        (shape.num_frames, shape.page_size, shape.frame_stride, shape.token_stride,
         shape.head_stride) = self.geometry
        shape.slot_mapping = self.p_slots
        (shape.page_table, shape.page_table_stride, shape.max_pages, shape.query_start, shape.context_lens,
         shape.num_seqs) = self.table_args[:6]
        norms = ffi.new("float *[]", list(self.w))
        rc = self.lib.kvos_layers(weights.table, weights.num_layers, norms, self.eps, buf, shape, 1, self.bad)
        if rc == cpu._ext.lib.KVOS_E_NOMEM:
            raise KvosError(ENOMEM, "the C kernel could not allocate its scratch memory")
        if rc:      # a bad index, found on layer 0 where the Python loop finds it: the checked calls word it
            self.rope_write_kv(0, qkv)
            self.attention(0)
            raise AssertionError(f"kvos_layers returned {rc}, the checked calls found nothing")  # pragma: no cover
        return self.h

    def _rope_tensors(self, layer, qkv, check):
        n, d = self.n, self.d
        q = qkv[:, :self.q_size].view(n, self.nq, d)
        k = qkv[:, self.q_size:self.k_end].view(n, self.nkv, d)
        v = qkv[:, self.k_end:].view(n, self.nkv, d)
        cpu.rope_write_kv(q, k, v, self.cos, self.sin, self.positions, *self.kv.layer(layer), self.slots, check)
