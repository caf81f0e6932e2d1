"""The four projections of SmolLM2-135M's 30 layers by M: torch.mm, F.linear and kernel.ops.panel_mm.

`python benchmarks/bench_panel_mm.py [--ms 1,4,8,16,32,64] [--rounds 5] [--head]` builds 30 layers
of random float32 weights at SmolLM2's shapes (QKV 960 x 576, O 576 x 576, gate/up 3072 x 576,
down 576 x 1536), each in three layouts: (in, out) for torch.mm / addmm_ as LlamaProgram keeps them,
(out, in) for F.linear, and packed panels for panel_mm. One pass runs every layer's four
projections in layer order, so each weight comes from memory as in a decode step (425 MB a pass
per layout, far past the caches). Variants alternate within each round (order rotated); the time is
this process's CPU time (time.process_time) with torch.set_num_threads(1) and KVOS_THREADS=1.
Prints min and median over rounds in ms and the weight stream rate of the median. --head adds the
LM head (49,152 x 576) to each pass. --bf16 adds torch.mm on bf16 (in, out) copies of the same
weights (oneDNN; x cast to bf16 each call), as the kvos-bf16 system ran them before section 7c, and
panel_mm on bf16 panels of the same weights (x rounded inside), as it runs them now: half the bytes.
--only picks variants by name (comma-separated), e.g. `--only panel_mm,bf16 panel_mm,bf16 torch.mm`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
LAYERS, VOCAB, HIDDEN = 30, 49152, 576


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ms", default="1,4,8,16,32,64")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--head", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--only", default="")
    args = p.parse_args()
    os.environ["KVOS_THREADS"] = "1"
    import torch
    import torch.nn.functional as F

    from kernel import ops
    torch.set_num_threads(1)
    ops.set_num_threads(1)
    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        layer = {}
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k) * k ** -0.5
            layer[name] = (w, w.t().contiguous(), ops.panel_pack(w), n,
                           w.t().contiguous().bfloat16() if args.bf16 else None,
                           ops.panel_pack(w, torch.bfloat16) if args.bf16 else None)
        layers.append(layer)
    head = None
    if args.head:
        w = torch.randn(VOCAB, HIDDEN) * HIDDEN ** -0.5
        head = (w, None, ops.panel_pack(w), VOCAB, w.bfloat16() if args.bf16 else None,
                ops.panel_pack(w, torch.bfloat16) if args.bf16 else None)
    nbytes = sum(w.numel() * 4 for layer in layers for w, *_ in layer.values())     # float32 bytes
    nbytes += head[0].numel() * 4 if head else 0

    def run_mm(x, a, act):
        for layer in layers:
            torch.mm(x, layer["qkv"][1])
            x.addmm_(a, layer["o"][1])
            torch.mm(x, layer["gate_up"][1])
            x.addmm_(act, layer["down"][1])
        if head:
            F.linear(x, head[0])

    def run_linear(x, a, act):
        for layer in layers:
            F.linear(x, layer["qkv"][0])
            x.add_(F.linear(a, layer["o"][0]))
            F.linear(x, layer["gate_up"][0])
            x.add_(F.linear(act, layer["down"][0]))
        if head:
            F.linear(x, head[0])

    def run_panel(x, a, act):
        for layer in layers:
            ops.panel_mm(x, layer["qkv"][2], 960)
            ops.panel_mm(a, layer["o"][2], 576, out=x, accumulate=True)
            ops.panel_mm(x, layer["gate_up"][2], 3072)
            ops.panel_mm(act, layer["down"][2], 576, out=x, accumulate=True)
        if head:
            ops.panel_mm(x, head[2], VOCAB)

    def run_bf16(x, a, act):
        for layer in layers:
            torch.mm(x.bfloat16(), layer["qkv"][4])
            x.add_(torch.mm(a.bfloat16(), layer["o"][4]))
            torch.mm(x.bfloat16(), layer["gate_up"][4])
            x.add_(torch.mm(act.bfloat16(), layer["down"][4]))
        if head:
            F.linear(x.bfloat16(), head[4])

    def run_bf16_panel(x, a, act):
        for layer in layers:
            ops.panel_mm(x, layer["qkv"][5], 960)
            ops.panel_mm(a, layer["o"][5], 576, out=x, accumulate=True)
            ops.panel_mm(x, layer["gate_up"][5], 3072)
            ops.panel_mm(act, layer["down"][5], 576, out=x, accumulate=True)
        if head:
            ops.panel_mm(x, head[5], VOCAB)

    variants = {"torch.mm": run_mm, "F.linear": run_linear, "panel_mm": run_panel}
    if args.bf16:
        variants["bf16 torch.mm"] = run_bf16
        variants["bf16 panel_mm"] = run_bf16_panel
    if args.only:
        variants = {name: variants[name] for name in args.only.split(",")}
    print(f"{nbytes / 1e6:.0f} MB of weights a pass; one thread, CPU ms (min / median of {args.rounds} rounds)")
    ratios = [(a, b) for a, b in (("torch.mm", "panel_mm"), ("panel_mm", "bf16 panel_mm"),
                                  ("bf16 torch.mm", "bf16 panel_mm")) if a in variants and b in variants]
    print("M      " + "".join(f"{name:>24}" for name in variants) + "   " +
          "  ".join(f"{a} / {b}" for a, b in ratios) + " (medians)")
    for m in [int(v) for v in args.ms.split(",")]:
        x, a, act = (torch.randn(m, HIDDEN) * 0.1, torch.randn(m, HIDDEN) * 0.1, torch.randn(m, 1536) * 0.1)
        times = {name: [] for name in variants}
        names = list(variants)
        for fn in variants.values():   # warm-up
            fn(x, a, act)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t = time.process_time()
                variants[name](x, a, act)
                times[name].append(time.process_time() - t)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        cells = "".join(f"{min(ts) * 1e3:9.1f} / {med[name] * 1e3:6.1f} "      # bf16 variants read half the bytes
                        f"{nbytes / (2 if name.startswith('bf16') else 1) / med[name] / 1e9:4.1f}GB/s"
                        for name, ts in times.items())
        print(f"{m:<7}{cells}   " + "  ".join(f"{med[a] / med[b]:.2f}x" for a, b in ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
