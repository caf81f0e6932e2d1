"""Linear layers over quantized weights, and the four calls the forward pass makes on any weight.

LlamaProgram's forward asks for x @ W (mm), x += a @ W (add_mm), embedding rows (embedding) and
the LM head (head). A weight is either a plain tensor (the float32 / bfloat16 paths, unchanged:
(in, out) for mm, (vocab, hidden) for the head) or one of the objects here, which keep a GGUF's
own blocks in a form a GEMM of kernel/ops streams (kernel/ops/qblocks.py, kernel/ops/quant.py):

- BlockLinear: Q4_0 / Q4_1 / Q4_K (4-bit), Q5_0 / Q5_1 / Q5_K / Q8_0 and every other quantized
  type requantized to Q8_0 (8-bit, gguf_blocks.py) blocks as codes with per-32 fp16 d and m
  (w = d*u + m) for ops.qmm, which quantizes x to int8 per block (csrc/cpu/qmm.c). It may carry
  `wide`, the same blocks in the int4 op's form, run past QMM_MAX_ROWS rows; programs load
  without it (qmm is faster at every row count since its 16-column tiles, 2x at 1 row, 3x at 8-64:
  docs/performance.md, 8b and 8c); the bench and tests add it with with_int4_op() to compare.

The int4 op's forms, used by BlockLinear past QMM_MAX_ROWS rows (and alone in caches of format 1):
- Int4Linear: Q4_0 / Q4_1 blocks as codes + per-32 scale and zero (lossless for the codes; the
  fp16 d and m are rounded to bf16, x is rounded to bf16).
- Int8Linear: Q8_0 blocks as two int4 planes, q + 128 = 16 * hi + lo: W = 16d(hi - 8) + (d(lo - 8) + 8d),
  two int4 GEMMs summed (1.25 bytes a weight instead of Q8_0's 1.06; still a quarter of fp32).
- BlockTable: an embedding kept as its blocks (a BlockLinear of any block type); rows are widened
  as they are looked up. When the embedding is tied the same BlockLinear is the head.
- PanelLinear: not quantized: a float32 or bfloat16 weight packed in column panels for ops.panel_mm,
  the CPU float32 / bf16-matmul paths' only copy of their projections and LM head (rows() serves a
  tied embedding), and a GGUF's F32 / F16 / BF16 matrices (or fused matrices with such a part) under
  --weights gguf, in bf16 panels.
Every layer's dequantize() is the float32 matrix it stands for: the oracle of the tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernel import ops

GROUP = 32
QMM_MAX_ROWS = 64       # rows up to which a BlockLinear with a `wide` form runs ops.qmm


class Int4Linear:
    """W (n, k) = (codes - 8) * s + z per group of 32 along k, packed for ops.int4_mm."""
    __slots__ = ("packed", "sz", "shape")

    def __init__(self, packed: torch.Tensor, sz: torch.Tensor):
        self.packed, self.sz = packed, sz
        self.shape = (packed.shape[0], packed.shape[1] * 2)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Int4Linear:
        """codes int32 (n, k) in 0..15; scale, zero float32 (n, k / 32)."""
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        return cls(ops.int4_pack(codes), sz)

    def mm(self, a: torch.Tensor) -> torch.Tensor:
        return ops.int4_mm(a.to(torch.bfloat16), self.packed, self.sz, GROUP)

    def dequantize(self) -> torch.Tensor:
        """The float32 (n, k) matrix the GEMM multiplies by (bf16 scales included)."""
        eye = torch.eye(self.shape[1], dtype=torch.bfloat16)    # the packing is opaque: read it back
        return ops.int4_mm(eye, self.packed, self.sz, GROUP).float().t().contiguous()

    def tensors(self) -> dict:
        return {"packed": self.packed, "sz": self.sz}


class Int8Linear:
    """Q8_0: W = d * q per group of 32, as two int4 planes (hi, lo) whose GEMMs add up to x @ W^T."""
    __slots__ = ("hi", "lo", "shape")

    def __init__(self, hi: Int4Linear, lo: Int4Linear):
        self.hi, self.lo, self.shape = hi, lo, hi.shape

    @classmethod
    def from_blocks(cls, q: torch.Tensor, d: torch.Tensor) -> Int8Linear:
        """q int8 (n, k); d float32 (n, k / 32)."""
        u = q.to(torch.int32) + 128
        hi = Int4Linear.from_codes(u >> 4, 16 * d, torch.zeros_like(d))
        lo = Int4Linear.from_codes(u & 15, d, 8 * d)
        return cls(hi, lo)

    def mm(self, a: torch.Tensor) -> torch.Tensor:
        a = a.to(torch.bfloat16)
        return self.hi.mm(a).float().add_(self.lo.mm(a).float())

    def dequantize(self) -> torch.Tensor:
        return self.hi.dequantize() + self.lo.dequantize()

    def tensors(self) -> dict:
        return {**{f"hi.{k}": t for k, t in self.hi.tensors().items()},
                **{f"lo.{k}": t for k, t in self.lo.tensors().items()}}


class BlockLinear:
    """W (n, k) = d * u + m per block of 32 along k (u 4- or 8-bit codes, d and m fp16), packed for
    ops.qmm; `wide` is the same weights in the int4 op's form (or None), used past QMM_MAX_ROWS rows."""
    __slots__ = ("packed", "bits", "shape", "wide", "qmm")

    def __init__(self, packed: torch.Tensor, bits: int, shape: tuple, wide=None):
        self.packed, self.bits, self.shape, self.wide = packed, bits, tuple(shape), wide
        self.qmm = ops.QmmWeights(packed, self.shape[0], self.shape[1], bits)     # checked once, bound to the C call

    @classmethod
    def from_blocks(cls, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int, wide=None) -> BlockLinear:
        """codes (n, k) in 0..2^bits - 1; d, m float (n, k / 32), exact in fp16 for the GGUF's own types."""
        return cls(ops.qmm_pack(codes, d, m, bits), bits, codes.shape, wide)

    def mm(self, a: torch.Tensor) -> torch.Tensor:
        if self.wide is not None and a.shape[0] > QMM_MAX_ROWS:
            return self.wide.mm(a)
        return self.qmm(a if a.dtype == torch.float32 else a.float())

    def with_int4_op(self) -> BlockLinear:
        """The same layer carrying the int4 op's form of its blocks as `wide` (exact codes, bf16 scales);
        itself when that op cannot hold the shape (rows % 16, k % 64) or the blocks are 8-bit with an
        offset other than Q8_0's -128 d (Q5_x: its bf16 zero would lose too much)."""
        n, k = self.shape
        if n % 16 or k % 64:
            return self
        codes, d, m = ops.qmm_unpack(self.packed, n, k, self.bits)
        if self.bits == 4:
            wide = Int4Linear.from_codes(codes, d, m + 8 * d)
        elif torch.equal(m, -128 * d):
            wide = Int8Linear.from_blocks((codes - 128).to(torch.int8), d)
        else:
            return self
        return BlockLinear(self.packed, self.bits, self.shape, wide)

    def dequantize(self) -> torch.Tensor:
        """The float32 (n, k) matrix qmm multiplies by (fp16 d and m as stored)."""
        codes, d, m = ops.qmm_unpack(self.packed, *self.shape, self.bits)
        return codes.float() * d.repeat_interleave(GROUP, 1) + m.repeat_interleave(GROUP, 1)

    def tensors(self) -> dict:
        wide = {} if self.wide is None else {f"wide.{k}": t for k, t in self.wide.tensors().items()}
        return {"packed": self.packed, **wide}


class PanelLinear:
    """W (n, k) in ops.panel_pack's column panels: x @ W^T through ops.panel_mm at every M. float32
    panels beat MKL's sgemm from 1 to 512 rows on this CPU (docs/performance.md, 7b); bfloat16 panels
    (W rounded once at packing, x rounded per call, float32 sums and outputs) serve bf16 matmuls (7c)."""
    __slots__ = ("packed", "shape")

    def __init__(self, packed: torch.Tensor, n: int, k: int | None = None):
        self.packed = packed
        self.shape = (n, packed.shape[1] if k is None else k)

    @classmethod
    def from_float(cls, w: torch.Tensor, dtype: torch.dtype = torch.float32, width: int = ops.PANEL) -> PanelLinear:
        """width: ops.PANEL, or ops.NARROW for a float32 W of few rows (a LoRA adapter's A)."""
        return cls(ops.panel_pack(w if w.dtype == dtype else w.float(), dtype, width), w.shape[0], w.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """What the weights are held in (and x is rounded to): float32 or bfloat16."""
        return self.packed.dtype

    def mm(self, a: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return ops.panel_mm(a, self.packed, self.shape[0], bias)

    def add_mm(self, x: torch.Tensor, a: torch.Tensor) -> None:
        ops.panel_mm(a, self.packed, self.shape[0], out=x, accumulate=True)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of W as float32 (an embedding lookup on a tied table): column ids % 64 of panel
        ids // 64; in bf16 panels a row's k-pairs sit at 2 * (ids % 64) and the next element."""
        ids = ids.long()
        if self.packed.dtype == torch.float32:
            width = self.packed.shape[2]
            return self.packed[ids // width, :, ids % width]
        width = self.packed.shape[2] // 2
        pairs = self.packed.view(self.packed.shape[0], self.packed.shape[1], width, 2)[ids // width, :, ids % width]
        return pairs.reshape(ids.shape[0], -1)[:, :self.shape[1]].float()

    def dequantize(self) -> torch.Tensor:
        return ops.panel_unpack(self.packed, *self.shape).float().contiguous()

    def tensors(self) -> dict:
        return {"packed": self.packed}


class BlockTable:
    """An embedding table held as a BlockLinear's packed blocks (vocab, hidden): rows are read from
    its records as they are looked up (ops.qmm_rows: d * u + m, the file's values exactly for the
    exact types; a Q8_0 row is d (q + 128) - 128 d, the same floats as q * d). When the embedding is
    tied, the same blocks are the LM head (`head`), so the table is held once, not twice (29 MB less
    for SmolLM2); an untied table in 4-bit blocks is a seventh of a float32 one."""
    __slots__ = ("blocks", "tied", "shape")

    def __init__(self, blocks: BlockLinear, tied: bool):
        self.blocks, self.tied, self.shape = blocks, tied, blocks.shape

    @property
    def head(self):
        """The tied LM head (these blocks), or None."""
        return self.blocks if self.tied else None

    @head.setter
    def head(self, layer: BlockLinear) -> None:        # the same blocks with another form beside (with_int4_op)
        if not self.tied:
            raise ValueError("an untied table has no head")
        self.blocks = layer

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return ops.qmm_rows(self.blocks.packed, ids, *self.shape, self.blocks.bits)

    def dequantize(self) -> torch.Tensor:
        return self.rows(torch.arange(self.shape[0]))

    def tensors(self) -> dict:
        return {f"blocks.{k}": t for k, t in self.blocks.tensors().items()}


LAYERS = {"block": BlockLinear, "int4": Int4Linear, "int8": Int8Linear, "panel": PanelLinear, "table": BlockTable}


def kind_of(w) -> str:
    return next(k for k, cls in LAYERS.items() if isinstance(w, cls))


def is_quantized(w) -> bool:
    return not isinstance(w, torch.Tensor)


def weight_bytes(w, read: bool = False) -> int:
    """Bytes a weight holds in memory (a tensor or any layer here); with read, the bytes one pass of a
    GEMM reads (a BlockLinear's qmm form, not its wide copy)."""
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    if read and isinstance(w, BlockLinear):
        return weight_bytes(w.packed)
    return sum(t.numel() * t.element_size() for t in w.tensors().values())


def read_bytes(layers, head, norm) -> int:
    """Bytes of weights a step reads, as held: every layer's tensors (projections, norms, biases), the
    final norm and the LM head (a tied BlockTable's head is its blocks). The embedding gives one
    row per token and is not counted."""
    read = [getattr(layer, n) for layer in layers for n in layer.__slots__]
    read += [norm, head.head if isinstance(head, BlockTable) else head]
    return sum(weight_bytes(w, read=True) for w in read if w is not None)


# -- the four calls of the forward pass -------------------------------------------------------
def mm(a: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ W (+ bias). A tensor w is (in, out) in the matmul dtype; a layer computes in bf16."""
    if isinstance(w, torch.Tensor):
        return torch.mm(a, w) if bias is None else torch.addmm(bias, a, w)
    if isinstance(w, PanelLinear):
        return w.mm(a, bias)
    out = w.mm(a)
    return out if bias is None else out.add_(bias.to(out.dtype))


def add_mm(x: torch.Tensor, a: torch.Tensor, w) -> None:
    """x += a @ W, fused into the GEMM when the dtypes agree (the residual stream stays in x's dtype)."""
    if isinstance(w, torch.Tensor) and w.dtype == x.dtype:
        x.addmm_(a, w)
    elif isinstance(w, torch.Tensor):
        x.add_(torch.mm(a.to(w.dtype), w))
    elif isinstance(w, PanelLinear):
        w.add_mm(x, a)
    else:
        x.add_(w.mm(a))


def c_gemm(w, bias: torch.Tensor | None = None):
    """(kind, packed, n, k, bits, bias, max_rows) for kernel/ops/step_ops.LayerWeights when the C layer loop
    can run w (float32 or bf16 panels, qmm blocks), else None. max_rows: the most rows it runs w at
    (a BlockLinear with a wide form runs that past QMM_MAX_ROWS), or None for any."""
    if bias is not None and not (bias.dtype == torch.float32 and bias.is_contiguous() and bias.device.type == "cpu"):
        return None
    if isinstance(w, PanelLinear):
        kind = "panel" if w.dtype == torch.float32 else "panel_bf16"
        return (kind, w.packed, *w.shape, 0, bias, None)
    if isinstance(w, BlockLinear):
        return ("qmm", w.packed, *w.shape, w.bits, bias, None if w.wide is None else QMM_MAX_ROWS)
    return None


def embedding(ids: torch.Tensor, table) -> torch.Tensor:
    return F.embedding(ids, table) if isinstance(table, torch.Tensor) else table.rows(ids)


def head(x: torch.Tensor, w, matmul_dtype: torch.dtype) -> torch.Tensor:
    """Logits (rows, vocab) in float32. A tensor w is (vocab, hidden)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x.to(matmul_dtype), w).float()
    layer = w.head if isinstance(w, BlockTable) else w
    return layer.mm(x).float()


def vector_paths() -> dict:
    """Which code the C kernels behind these layers run on this CPU (qmm, panel_mm, panel_bf16, the
    step's attention): a benchmark's record of what it timed."""
    from kernel.ops import cpu
    return cpu.vector_paths()
