"""y = x @ W^T for small M over W packed in column panels (csrc/cpu/panel_mm.c, csrc/cpu/panel_bf16.c).

panel_pack(w) turns W (n, k) into (ceil(n / PANEL), k, PANEL) float32: each panel holds PANEL output
columns with k running contiguously inside it, the last panel padded with zeros. Pack once at
load; panel_mm then streams every weight once per call and uses it for all rows of x, where MKL's
sgemm at a few rows re-reads or under-uses them (docs/performance.md, section 7b). The packed form
is the only copy the program needs: panel_unpack gives W back exactly.
panel_pack(w, torch.bfloat16) rounds W to bf16 and packs (ceil(n / PANEL), ceil(k / 2), 2 * PANEL):
k in pairs, (W[c, 2j], W[c, 2j + 1]) side by side for each column c (k padded with a zero column when
odd), the operand layout of vdpbf16ps; panel_mm on it rounds x to bf16 and sums in float32 (7c).
panel_pack(w, width=NARROW) packs float32 W in panels of 16 columns instead, for a W of few rows (a
LoRA adapter's A: 8 to 24): panel_mm on them gives the same bits, reading 16 columns where 64-column
panels would pad them to 64.
CPU only; the twin is reference.panel_mm. Every bad argument is KvosError(EINVAL), nothing written.
"""
import torch

from kernel.ops import validate as val

PANEL = 64      # columns per panel; csrc/cpu/panel_mm.c's PANEL (cpu.panel_mm checks they agree)
NARROW = 16     # columns per narrow panel (panel_mm.c's NARROW): float32 only
_CPU = torch.device("cpu")


PATHS = {"auto": 0, "portable": 1, "dp": 2}      # the bf16 kernel's code: best here, plain C, vdpbf16ps


def panel_pack(w: torch.Tensor, dtype: torch.dtype = torch.float32, width: int = PANEL) -> torch.Tensor:
    """W (n, k) -> the packed form in dtype (a new tensor): float32 (ceil(n / width), k, width), or
    bfloat16 (ceil(n / PANEL), ceil(k / 2), 2 * PANEL) with W rounded to nearest even. width is PANEL,
    or NARROW for float32."""
    val.tensor("w", w, ndim=2, dtypes=(torch.float32, torch.bfloat16), device=_CPU)
    if width not in (PANEL, NARROW) or (width == NARROW and dtype != torch.float32):
        val.fail(f"panels are {PANEL} columns wide, or {NARROW} in float32; not {width!r} in {dtype}")
    n, k = w.shape
    panels = -(-n // width)
    if dtype == torch.bfloat16:
        kp = -(-k // 2)
        padded = torch.zeros(panels * PANEL, 2 * kp, dtype=torch.bfloat16)
        padded[:n, :k] = w
        return padded.view(panels, PANEL, kp, 2).transpose(1, 2).reshape(panels, kp, 2 * PANEL)
    if dtype != torch.float32:
        val.fail(f"panels are float32 or bfloat16, not {dtype}")
    w = w.float()
    if n % width:   # pad the last panel with zeros (otherwise no temporary: one copy, the result)
        padded = torch.zeros(panels * width, k, dtype=torch.float32)
        padded[:n] = w
        w = padded
    return w.reshape(panels, width, k).transpose(1, 2).contiguous()


def panel_unpack(packed: torch.Tensor, n: int, k: int | None = None) -> torch.Tensor:
    """The (n, k) matrix a packed form holds, in its dtype (exact: packing only moves values). k is
    needed only for a bf16 form of odd k (otherwise it is the packed k, or twice its pairs)."""
    _packed(packed, n)
    if packed.dtype == torch.bfloat16:
        panels, kp = packed.shape[:2]
        k = 2 * kp if k is None else k
        if not isinstance(k, int) or not 2 * kp - 1 <= k <= 2 * kp:
            val.fail(f"k = {k!r} does not fit {kp} pairs")
        return packed.view(panels, kp, PANEL, 2).transpose(1, 2).reshape(panels * PANEL, 2 * kp)[:n, :k]
    return packed.transpose(1, 2).reshape(-1, packed.shape[1])[:n]


def _packed(packed, n):
    val.tensor("packed", packed, ndim=3, dtypes=(torch.float32, torch.bfloat16), device=_CPU)
    widths = (PANEL, NARROW) if packed.dtype == torch.float32 else (2 * PANEL,)
    if packed.shape[2] not in widths or not packed.is_contiguous():
        what = f"k, {PANEL} or {NARROW}" if packed.dtype == torch.float32 else f"k / 2, {2 * PANEL}"
        val.fail(f"packed must be contiguous (panels, {what}), is {tuple(packed.shape)} "
                 f"with strides {packed.stride()}")
    width = packed.shape[2] if packed.dtype == torch.float32 else PANEL      # output columns a panel
    if not isinstance(n, int) or not (packed.shape[0] - 1) * width < n <= packed.shape[0] * width:
        val.fail(f"n = {n!r} does not fit {packed.shape[0]} panels of {width} columns")


def _span(t):
    """[first, last) byte addresses a tensor's elements can touch (empty for no elements)."""
    if t.numel() == 0:
        return (0, 0)
    last = 0
    for size, stride in zip(t.shape, t.stride()):
        last += (size - 1) * stride
    start = t.data_ptr()
    return (start, start + (last + 1) * t.element_size())


def panel_mm(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None,
             out: torch.Tensor | None = None, accumulate: bool = False, *, path: str = "auto") -> torch.Tensor:
    """out (m, n) = x (m, k) @ W^T (+ bias) in float32, or out += that when accumulate.

    x and out may have any row stride (their last dimension dense); bias is (n,). out must not
    share memory with x, packed or bias (the kernel writes it while it reads them). On bf16 panels x
    is float32 (rounded to bf16 inside) or bfloat16, its k the pairs' 2 * kp or 2 * kp - 1 (then the
    last packed column, zero when W's k was odd, is not used); out and bias stay float32. path
    ("auto", "portable" or "dp") picks the bf16 kernel's code; float32 panels have one."""
    _packed(packed, n)
    bf16 = packed.dtype == torch.bfloat16
    val.tensor("x", x, ndim=2, dtypes=(torch.float32, torch.bfloat16) if bf16 else (torch.float32,), device=_CPU)
    val.rows_contiguous("x", x)
    m, k = x.shape
    if k != packed.shape[1] and not (bf16 and (k + 1) // 2 == packed.shape[1]):
        val.fail(f"x has k = {k}, the packed weights {2 * packed.shape[1] if bf16 else packed.shape[1]}")
    if path not in PATHS:
        val.fail(f"path must be one of {list(PATHS)}, not {path!r}")
    if bias is not None:
        val.tensor("bias", bias, ndim=1, dtypes=(torch.float32,), device=_CPU)
        if bias.shape[0] != n or not bias.is_contiguous():
            val.fail(f"bias must be contiguous ({n},), is {tuple(bias.shape)}")
    if out is None:
        if accumulate:
            val.fail("accumulate needs an out to add to")
        out = torch.empty(m, n, dtype=torch.float32)
    else:
        val.tensor("out", out, ndim=2, dtypes=(torch.float32,), device=_CPU)
        if tuple(out.shape) != (m, n):
            val.fail(f"out has shape {tuple(out.shape)}, expected ({m}, {n})")
        val.rows_contiguous("out", out)
        if m > 1 and out.stride(0) < n:
            val.fail(f"out's rows overlap each other (row stride {out.stride(0)} < {n})")
        o0, o1 = _span(out)
        for name, t in (("x", x), ("packed", packed), ("bias", bias)):
            if t is not None:
                t0, t1 = _span(t)
                if o0 < t1 and t0 < o1:
                    val.fail(f"out shares memory with {name}")
    if m == 0 or n == 0:
        return out
    if k == 0:
        if not accumulate:
            out.copy_(bias.expand(m, n) if bias is not None else torch.zeros(m, n))
        elif bias is not None:
            out.add_(bias)
        return out
    from kernel.ops import cpu
    if not bf16:
        cpu.panel_mm(out, x, packed, bias, m, k, n, accumulate)
    elif path == "dp" and not cpu.panel_bf16_has_dp():
        val.fail("this CPU has no AVX512_BF16: path='dp' cannot run here")
    else:
        cpu.panel_mm_bf16(out, x, packed, bias, m, k, n, accumulate, PATHS[path])
    return out
