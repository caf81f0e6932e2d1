"""Float32 y = x @ W^T for small M over W packed in column panels (the C kernel csrc/cpu/panel_mm.c).

panel_pack(w) turns W (n, k) into (ceil(n / PANEL), k, PANEL): each panel holds PANEL output
columns with k running contiguously inside it, the last panel padded with zeros. Pack once at
load; panel_mm then streams every weight once per call and uses it for all rows of x, where MKL's
sgemm at a few rows re-reads or under-uses them (docs/performance.md, section 7b). The packed form
is the only copy the program needs: panel_unpack gives W back exactly. CPU only; the twin is
reference.panel_mm. Every bad argument is KvosError(EINVAL) and nothing is written.
"""
import torch

from kernel.ops import validate as val

PANEL = 64      # columns per panel; csrc/cpu/panel_mm.c's PANEL (cpu.panel_mm checks they agree)
_CPU = torch.device("cpu")


def panel_pack(w: torch.Tensor) -> torch.Tensor:
    """W (n, k) float32 -> the packed (ceil(n / PANEL), k, PANEL) float32 form (a new tensor)."""
    val.tensor("w", w, ndim=2, dtypes=(torch.float32,), device=_CPU)
    n, k = w.shape
    panels = -(-n // PANEL)
    if n % PANEL:   # pad the last panel with zeros (otherwise no temporary: one copy, the result)
        padded = torch.zeros(panels * PANEL, k, dtype=torch.float32)
        padded[:n] = w
        w = padded
    return w.reshape(panels, PANEL, k).transpose(1, 2).contiguous()


def panel_unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The (n, k) matrix a packed form holds (exact: packing only moves values)."""
    _packed(packed, n)
    return packed.transpose(1, 2).reshape(-1, packed.shape[1])[:n]


def _packed(packed, n):
    val.tensor("packed", packed, ndim=3, dtypes=(torch.float32,), device=_CPU)
    if packed.shape[2] != PANEL or not packed.is_contiguous():
        val.fail(f"packed must be contiguous (panels, k, {PANEL}), is {tuple(packed.shape)} "
                 f"with strides {packed.stride()}")
    if not isinstance(n, int) or not (packed.shape[0] - 1) * PANEL < n <= packed.shape[0] * PANEL:
        val.fail(f"n = {n!r} does not fit {packed.shape[0]} panels of {PANEL} columns")


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
             out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """out (m, n) = x (m, k) @ W^T (+ bias) in float32, or out += that when accumulate.

    x and out may have any row stride (their last dimension dense); bias is (n,). out must not
    share memory with x, packed or bias (the kernel writes it while it reads them)."""
    _packed(packed, n)
    val.tensor("x", x, ndim=2, dtypes=(torch.float32,), device=_CPU)
    val.rows_contiguous("x", x)
    m, k = x.shape
    if k != packed.shape[1]:
        val.fail(f"x has k = {k}, the packed weights {packed.shape[1]}")
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
    cpu.panel_mm(out, x, packed, bias, m, k, n, accumulate)
    return out
