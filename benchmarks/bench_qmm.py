"""ops.qmm alone on random weights of SmolLM2-135M's shapes (30 layers of qkv, o, gate_up, down in
4-bit blocks and the 49152 x 576 head in 8-bit blocks: 98 MB, more than the L3, so every pass
reads the weights from memory), against the int4 op on the same codes.

Variants, interleaved round by round in one process, one thread, CPU time (time.thread_time),
min and median of the rounds: "qmm raw" calls the C entry point through cffi with no checks,
"qmm" is ops.qmm (checks included), "int4 op" is ops.int4_mm on bf16 x (the head as two planes).
Run: PYTHONPATH=$PWD python benchmarks/bench_qmm.py [--rounds 7] [--batches 1,8,64]
"""
import argparse
import statistics
import time

import torch

from kernel import ops
from kernel.ops import cpu
from userspace.programs.qlinear import Int4Linear, Int8Linear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LAYERS = 30
HEAD = (49152, 576)


def weights(g):
    out = []
    for _ in range(LAYERS):
        for n, k in SHAPES:
            codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
            d, m = torch.rand(n, k // 32, generator=g) * 0.01, -torch.rand(n, k // 32, generator=g) * 0.05
            out.append((n, k, 4, ops.qmm_pack(codes, d, m, 4), Int4Linear.from_codes(codes, d, m + 8 * d)))
    n, k = HEAD
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    d = torch.rand(n, k // 32, generator=g) * 0.01
    out.append((n, k, 8, ops.qmm_pack(q.int() + 128, d, -128 * d, 8), Int8Linear.from_blocks(q, d)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batches", default="1,8,64")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cpu.set_num_threads(1)
    ws = weights(torch.Generator().manual_seed(0))
    qmm_bytes = sum(w[3].numel() for w in ws)
    print(f"one thread, CPU time; qmm's weights {qmm_bytes / 1e6:.0f} MB; min (median) of {args.rounds} rounds")
    for m in (int(b) for b in args.batches.split(",")):
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        xb = {k: x.bfloat16() for k, x in xs.items()}
        outs = {n: torch.empty(m, n) for n in {w[0] for w in ws}}
        fns = {
            "qmm raw": lambda xs=xs, outs=outs: [cpu.qmm(xs[k], p, n, b, 0, outs[n]) for n, k, b, p, _ in ws],
            "qmm": lambda xs=xs: [ops.qmm(xs[k], p, n, b) for n, k, b, p, _ in ws],
            "int4 op": lambda xb=xb: [w.mm(xb[k]) for n, k, b, p, w in ws],
        }
        times = {name: [] for name in fns}
        for fn in fns.values():
            fn()
        for _ in range(args.rounds):
            for name, fn in fns.items():
                t = time.thread_time()
                fn()
                times[name].append(time.thread_time() - t)
        line = "  ".join(f"{name} {min(t) * 1e3:.2f} ({statistics.median(t) * 1e3:.2f})" for name, t in times.items())
        print(f"M {m:3d} ms: {line}; qmm raw reads {qmm_bytes / min(times['qmm raw']) / 1e9:.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
