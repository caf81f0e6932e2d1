"""The machine's limits, measured in the same run: fp32 matmul FLOP/s and memory read bandwidth.

Run as its own process with the systems' thread count (`python -m userspace.bench.ceiling THREADS
[DEVICE]`); prints one JSON object. The compute ceiling of a run is tokens x 2 x parameters over
this FLOP/s: no fp32 system can process tokens faster on this machine's threads. With a cuda
DEVICE every rate is the GPU's (GEMMs and a read of device memory, timed with CUDA events).
"""
from __future__ import annotations

import json
import sys
import time

MM_SIZE = 2048          # square fp32 matmuls, ~17 GFLOP each: long enough to time, short enough to repeat
MODEL_SHAPE = (512, 576, 3072)      # a SmolLM2 gate/up projection over a 512-token step
READ_BYTES = 512 << 20


GPU_MM_SIZE = 8192      # ~1.1 TFLOP: milliseconds on a GPU, long enough for events to time
GPU_READ_BYTES = 2 << 30    # far past any L2, so the sum reads HBM


def measure(threads: int, repeats: int = 5, device: str = "cpu") -> dict:
    import os
    os.environ["KVOS_THREADS"] = str(threads)     # the C kernels' share of the one OpenMP pool
    import torch
    if device != "cpu":
        torch.set_num_threads(threads)
        return measure_gpu(device, repeats)

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
    return {"threads": threads, "cpu": _cpu_name(), "vector_paths": qlinear.vector_paths(),
            "matmul_flops": square, "model_gemm_flops": shaped, "read_bytes_per_s": read,
            "bf16_gemm_flops": bf16,
            "matmul": f"{MM_SIZE}x{MM_SIZE} fp32 torch.mm, best of {repeats}",
            "mkl_gemm_flops": mkl, "panel_gemm_flops": panels,
            "onednn_bf16_gemm_flops": onednn, "panel_bf16_gemm_flops": bf16_panels,
            "model_gemm": f"the faster of F.linear and kernel.ops.panel_mm, ({m}x{k}) @ ({k}x{n})^T fp32, "
                          f"best of {repeats * 4}",
            "read": f"torch.sum over {READ_BYTES >> 20} MiB fp32, best of {repeats}"}


def _cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it ("?" elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return "?"


def measure_gpu(device: str, repeats: int = 5) -> dict:
    """The same keys as measure(), each the GPU's: fp32 GEMMs without TF32 (the fp32 rows' arithmetic),
    bf16 GEMMs, and torch.sum over device memory. The model-shaped GEMM is kept for the record; on a
    GPU it is far too small to reach the square one's rate, and the ceiling takes the larger."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device(device)
    n = GPU_MM_SIZE
    square = _square_gpu_rate(dev, n, torch.float32, repeats)
    bf16 = _square_gpu_rate(dev, n, torch.bfloat16, repeats)
    m, k, nn = MODEL_SHAPE
    x, w = torch.randn(m, k, device=dev), torch.randn(nn, k, device=dev)
    shaped = _best_gpu_rate(lambda: torch.nn.functional.linear(x, w), 2 * m * k * nn, repeats * 4)
    buf = torch.ones(GPU_READ_BYTES // 4, device=dev)
    read = _best_gpu_rate(lambda: buf.sum(), GPU_READ_BYTES, repeats)
    return {"threads": torch.get_num_threads(), "device": device, "device_name": torch.cuda.get_device_name(dev),
            "matmul_flops": square, "model_gemm_flops": shaped, "read_bytes_per_s": read, "bf16_gemm_flops": bf16,
            "matmul": f"{n}x{n} fp32 torch.mm on {device} (TF32 off), best of {repeats}",
            "model_gemm": f"F.linear ({m}x{k}) @ ({k}x{nn})^T fp32 on {device}, best of {repeats * 4}",
            "bf16_gemm": f"{n}x{n} bf16 torch.mm on {device}, best of {repeats}",
            "read": f"torch.sum over {GPU_READ_BYTES >> 20} MiB fp32 of device memory, best of {repeats}"}


def _square_gpu_rate(dev, n: int, dtype, repeats: int) -> float:
    """FLOP/s of an n x n x n torch.mm in dtype (its operands are freed on return)."""
    import torch
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    return _best_gpu_rate(lambda: torch.mm(a, b), 2 * n**3, repeats)


def _best_gpu_rate(fn, work: float, repeats: int) -> float:
    import torch
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    return work / best


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
    print(json.dumps(measure(threads, device=sys.argv[2] if len(sys.argv) > 2 else "cpu")))
