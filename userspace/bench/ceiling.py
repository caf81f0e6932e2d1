"""The machine's limits, measured in the same run: fp32 matmul FLOP/s and memory read bandwidth.

Run as its own process with the systems' thread count (`python -m userspace.bench.ceiling`);
prints one JSON object. The compute ceiling of a run is tokens x 2 x parameters over
this FLOP/s: no fp32 system can process tokens faster on this machine's threads.
"""
from __future__ import annotations

import json
import sys
import time

MM_SIZE = 2048          # square fp32 matmuls, ~17 GFLOP each: long enough to time, short enough to repeat
MODEL_SHAPE = (512, 576, 3072)      # a SmolLM2 gate/up projection over a 512-token step
READ_BYTES = 512 << 20


def measure(threads: int, repeats: int = 5) -> dict:
    import os
    os.environ["KVOS_THREADS"] = str(threads)     # the C kernels' share of the one OpenMP pool
    import torch

    from userspace.programs import qlinear
    torch.set_num_threads(threads)
    a, b = torch.randn(MM_SIZE, MM_SIZE), torch.randn(MM_SIZE, MM_SIZE)
    square = _best_rate(lambda: torch.mm(a, b), 2 * MM_SIZE**3, repeats)
    m, k, n = MODEL_SHAPE
    x, w = torch.randn(m, k), torch.randn(n, k)
    mkl = _best_rate(lambda: torch.nn.functional.linear(x, w), 2 * m * k * n, repeats * 4)
    # kvos's own fp32 GEMM (ops.panel_mm over packed panels, what the fp32 program runs): the ceiling is
    # the faster of the two, so no fp32 row is priced at a rate below what kvos itself reaches.
    panel = qlinear.PanelLinear.from_float(w)
    panels = _best_rate(lambda: panel.mm(x), 2 * m * k * n, repeats * 4)
    shaped = max(mkl, panels)
    # The same GEMM in bf16: the faster of torch's (oneDNN; AMX where the CPU has it) and bf16 panels (what
    # the bf16-matmul program runs on the CPU): the kvos-bf16 row's roofline prices its matmuls at this
    # rate. Not part of the fp32 ceiling.
    xb, wb = x.bfloat16(), w.bfloat16()
    onednn = _best_rate(lambda: torch.nn.functional.linear(xb, wb), 2 * m * k * n, repeats * 4)
    panel_bf16 = qlinear.PanelLinear.from_float(w, torch.bfloat16)
    bf16_panels = _best_rate(lambda: panel_bf16.mm(x), 2 * m * k * n, repeats * 4)
    bf16 = max(onednn, bf16_panels)
    buf = torch.ones(READ_BYTES // 4)
    read = _best_rate(lambda: buf.sum(), READ_BYTES, repeats)
    return {"threads": threads, "matmul_flops": square, "model_gemm_flops": shaped, "read_bytes_per_s": read,
            "bf16_gemm_flops": bf16,
            "matmul": f"{MM_SIZE}x{MM_SIZE} fp32 torch.mm, best of {repeats}",
            "mkl_gemm_flops": mkl, "panel_gemm_flops": panels,
            "onednn_bf16_gemm_flops": onednn, "panel_bf16_gemm_flops": bf16_panels,
            "model_gemm": f"the faster of F.linear and kernel.ops.panel_mm, ({m}x{k}) @ ({k}x{n})^T fp32, "
                          f"best of {repeats * 4}",
            "read": f"torch.sum over {READ_BYTES >> 20} MiB fp32, best of {repeats}"}


def _best_rate(fn, work: float, repeats: int) -> float:
    fn()                                  # first call: allocation and thread start-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return work / best


if __name__ == "__main__":
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    print(json.dumps(measure(threads)))
