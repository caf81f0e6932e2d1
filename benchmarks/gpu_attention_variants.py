"""Decode attention on a GPU, variant against variant (python3 benchmarks/gpu_attention_variants.py).

Builds csrc/cuda/attention.cu with other compile-time settings (-DUNROLL=, -DMIN_BLOCKS=), or
another source file given as NAME=PATH, checks each against SDPA and times it with CUDA
events on the shapes of gpu_check.py. For tuning: the kernel's defaults are what ships.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check  # noqa: E402  (imports kernel.ops)

from kernel.ops import cuda as cuda_ops  # noqa: E402

CASES = [("SmolLM2", 9, 3, 64, 64, 512), ("SmolLM2", 9, 3, 64, 256, 512), ("SmolLM2", 9, 3, 64, 256, 4096),
         ("LLaMA-7B", 32, 32, 128, 64, 4096), ("LLaMA-7B", 32, 32, 128, 256, 4096)]


def use_variant(defines=(), path=None):
    """Make kernel.ops.cuda compile attention.cu with `defines`, or from `path` instead."""
    plain = cuda_ops._Kernels.source

    def source(self, name):
        code, options = plain(self, name)
        if name == "attention.cu" and path:
            code = f"// variant {path}\n" + Path(path).read_text()
        return f"// {' '.join(defines)}\n{code}", options + tuple(defines)

    cuda_ops.kernels.source = source.__get__(cuda_ops.kernels)
    cuda_ops.kernels._modules.clear()
    cuda_ops.kernels._functions.clear()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="*", default=["shipped="],
                    help="NAME=-DX=1,-DY=2 or NAME=path/to/attention.cu ('shipped=' is the file as it is)")
    args = ap.parse_args()
    device = torch.device("cuda")
    results = {}
    for spec in args.variants:
        name, _, rest = spec.partition("=")
        if rest.endswith(".cu"):
            use_variant(path=rest)
        else:
            use_variant(defines=tuple(d for d in rest.split(",") if d))
        row = []
        for label, heads, kv_heads, head_dim, batch, ctx in CASES:
            t, t_sdpa, rate, _, err = gpu_check.decode_row(device, torch.float16, heads, kv_heads, head_dim, batch, ctx)
            ok = err < gpu_check.TOLERANCE[torch.float16]
            gpu_check.check(f"{name}: {label} b={batch} ctx={ctx}", ok, f"rel err {err:.1e}")
            row.append((t, t_sdpa, rate))
            torch.cuda.empty_cache()
        results[name] = row
    print(f"\n{'variant':<14}" + "".join(f"{f'{c[0]} {c[4]}x{c[5]}':>22}" for c in CASES))
    print(f"{'':<14}" + "".join(f"{'ms  TB/s  SDPA/x':>22}" for _ in CASES))
    for name, row in results.items():
        print(f"{name:<14}" + "".join(f"{t * 1e3:>10.3f}{rate / 1e12:>6.2f}{ts / t:>6.2f}" for t, ts, rate in row))
    return 1 if gpu_check.FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
