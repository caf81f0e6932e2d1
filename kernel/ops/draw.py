"""Drawing one token per logits row: temperature, min-p, top-k and top-p as thresholds, then the
inverse CDF at one uniform per row.

kernel/sampling.py calls draw_tokens after it has shaped the rows (grammar, bias, penalties) and
taken the greedy ones; each row's uniform comes from its own process's generator, so a row's token
depends on nothing else in the batch. Float32 CPU rows run csrc/cpu/draw.c, every other row (CUDA,
bfloat16) the twin, reference.draw_tokens, which is the contract: batched torch, one sort over the
batch where a row asks for top-p. The per-row arguments are checked here (EINVAL) before anything
runs; they are host tensors whatever the logits' device.
"""
import math
from numbers import Integral, Real

import torch

from kernel.ops import reference
from kernel.ops import validate as val


def _per_row(name, values, rows, ok, what) -> list:
    """values (a sequence or a 1-D tensor) as a list of one number per row, each passing ok (EINVAL
    otherwise). Plain Python: at a decode step's few rows a torch op per check would cost more than
    the draw (and isinstance against numbers.Real alone costs a microsecond a value)."""
    values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    if len(values) != rows:
        val.fail(f"draw_tokens: {name} needs one value per row ({rows}), got {len(values)}")
    for v in values:
        number = type(v) in (float, int) or (isinstance(v, Real) and not isinstance(v, bool))  # fast path first
        if not number or not ok(v):
            val.fail(f"draw_tokens: every {name} must be {what}, got {v!r}")
    return values


def draw_tokens(logits: torch.Tensor, temperature, top_k, top_p, min_p, u) -> torch.Tensor:
    """int64 (rows,) tokens on logits' device. logits: float (rows, vocab); per row (sequences or
    CPU tensors): temperature > 0, top_k >= 0 (0: no limit), top_p in (0, 1], min_p in [0, 1],
    u in [0, 1) (the row's uniform, float64)."""
    val.tensor("logits", logits, ndim=2, dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64))
    rows, vocab = logits.shape
    if vocab == 0:
        val.fail("draw_tokens: logits rows are empty")
    temperature = _per_row("temperature", temperature, rows, lambda v: math.isfinite(v) and v > 0,
                           "a finite number > 0")
    top_k = _per_row("top_k", top_k, rows, lambda v: (type(v) is int or isinstance(v, Integral)) and v >= 0,
                     "an integer >= 0")
    top_p = _per_row("top_p", top_p, rows, lambda v: 0 < v <= 1, "in (0, 1]")
    min_p = _per_row("min_p", min_p, rows, lambda v: 0 <= v <= 1, "in [0, 1]")
    u = _per_row("u", u, rows, lambda v: 0 <= v < 1, "in [0, 1)")
    if rows == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    per_row = (torch.tensor(temperature, dtype=torch.float32),
               torch.tensor([min(k, vocab) for k in top_k], dtype=torch.int32),   # k >= vocab keeps all, as 0
               torch.tensor(top_p, dtype=torch.float64),
               torch.log(torch.tensor(min_p, dtype=torch.float32)),               # min_p 0: -inf, none
               torch.tensor(u, dtype=torch.float64))
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        from kernel.ops import cpu
        return cpu.draw_tokens(logits if logits.stride(-1) == 1 else logits.contiguous(), *per_row)
    return reference.draw_tokens(logits, *(t.to(logits.device) for t in per_row))
