"""Drawing one token per logits row: temperature, min-p, top-k and top-p as thresholds, then the
inverse CDF at one uniform per row.

kernel/sampling.py calls draw_tokens after it has shaped the rows (grammar, bias, penalties) and
taken the greedy ones; each row's uniform comes from its own process's generator, so a row's token
depends on nothing else in the batch. Float32 CPU rows run csrc/cpu/draw.c, every other row (CUDA,
bfloat16) the twin, reference.draw_tokens, which is the contract: batched torch, one sort over the
batch where a row asks for top-p. The per-row arguments are checked here (EINVAL) before anything
runs; they are host tensors whatever the logits' device.
"""
from numbers import Integral, Real

import torch

from kernel.ops import reference
from kernel.ops import validate as val


def _per_row(name, values, rows, dtype, ok, what) -> torch.Tensor:
    """values (a sequence of Python numbers, or a 1-D tensor) as a CPU tensor of dtype with one
    value per row, each passing ok (EINVAL otherwise). A batch's worth is checked by one torch
    expression, not a Python test per value."""
    integral = not dtype.is_floating_point
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.dtype == torch.bool or values.is_complex() or \
                (integral and values.dtype.is_floating_point):
            val.fail(f"draw_tokens: {name} must be a 1-D {'integer' if integral else 'real'} tensor, "
                     f"got {values.dtype} of shape {tuple(values.shape)}")
        t = values.detach().to("cpu", dtype)
    else:
        values = list(values)
        kinds = set(map(type, values))
        if not kinds <= ({int} if integral else {int, float}):      # the slow check, for other number types
            for v in values:
                if isinstance(v, bool) or not isinstance(v, Integral if integral else Real):
                    val.fail(f"draw_tokens: every {name} must be {what}, got {v!r}")
        try:
            t = torch.tensor(values, dtype=dtype)
        except (OverflowError, RuntimeError, ValueError):
            val.fail(f"draw_tokens: every {name} must be {what}")
    if t.shape[0] != rows:
        val.fail(f"draw_tokens: {name} needs one value per row ({rows}), got {t.shape[0]}")
    bad = ~ok(t)
    if bool(bad.any()):
        val.fail(f"draw_tokens: every {name} must be {what}, got {t[bad][0].item()!r}")
    return t


def draw_tokens(logits: torch.Tensor, temperature, top_k, top_p, min_p, u) -> torch.Tensor:
    """int64 (rows,) tokens on logits' device. logits: float (rows, vocab); per row (sequences or
    CPU tensors): temperature > 0, top_k >= 0 (0: no limit), top_p in (0, 1], min_p in [0, 1],
    u in [0, 1) (the row's uniform, float64)."""
    val.tensor("logits", logits, ndim=2, dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64))
    rows, vocab = logits.shape
    if vocab == 0:
        val.fail("draw_tokens: logits rows are empty")
    temperature = _per_row("temperature", temperature, rows, torch.float32, lambda t: torch.isfinite(t) & (t > 0),
                           "a finite number > 0")
    top_k = _per_row("top_k", top_k, rows, torch.int64, lambda t: t >= 0, "an integer >= 0")
    top_p = _per_row("top_p", top_p, rows, torch.float64, lambda t: (t > 0) & (t <= 1), "in (0, 1]")
    min_p = _per_row("min_p", min_p, rows, torch.float32, lambda t: (t >= 0) & (t <= 1), "in [0, 1]")
    u = _per_row("u", u, rows, torch.float64, lambda t: (t >= 0) & (t < 1), "in [0, 1)")
    if rows == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    per_row = (temperature, top_k.clamp(max=vocab).to(torch.int32),    # k >= vocab keeps every token, as 0
               top_p, torch.log(min_p), u)                              # min_p 0: log -inf, no threshold
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        from kernel.ops import cpu
        return cpu.draw_tokens(logits if logits.stride(-1) == 1 else logits.contiguous(), *per_row)
    return reference.draw_tokens(logits, *(t.to(logits.device) for t in per_row))
