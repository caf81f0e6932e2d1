"""ops.qmm alone on random weights of SmolLM2-135M's shapes (30 layers of qkv, o, gate_up, down in
4-bit blocks and the 49152 x 576 head in 8-bit blocks: 98 MB, more than the L3, so every pass
reads the weights from memory), against the int4 op on the same codes.

Variants, interleaved round by round in one process, one thread, CPU time (time.thread_time),
min and median of the rounds: "qmm raw" calls the C entry point through cffi with no checks,
"qmm" is ops.qmm (checks included), "int4 op" is ops.int4_mm on bf16 x (the head as two planes).
--baseline DIR adds "qmm old": another kvos checkout's qmm (its kernel/ops/qblocks.py packing and
its built kernel/ops/_kvos_cpu.abi3.so, raw), on the same codes. --panel adds "panel f32": ops'
float32 panel_mm C entry point on float32 weights of the same shapes (538 MB).
--split times qmm raw (and qmm old) on the 4-bit projections and on the 8-bit head apart, each in
G int8 multiply-adds a second. --paths vnni,avx2,amx adds "qmm <path>": qmm raw on that vector path
(on an AVX-512 VNNI CPU, the two paths side by side on the same codes; with --split, apart too).
Run: PYTHONPATH=$PWD python benchmarks/bench_qmm.py [--rounds 7] [--batches 1,8,64] [--baseline DIR] [--panel] [--split]
     [--paths vnni,avx2]
"""
import argparse
import importlib.util
import pathlib
import statistics
import sys
import time

import torch

from kernel import ops
from kernel.ops import cpu
from kernel.ops.qblocks import PATHS
from userspace.programs.qlinear import Int4Linear, Int8Linear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LAYERS = 30
HEAD = (49152, 576)


def load_baseline(root: str):
    """(pack function, C library, ffi) of the kvos checkout at root, under module names of their own."""
    ops_dir = pathlib.Path(root) / "kernel" / "ops"
    mods = []
    for name, path in (("kvos_baseline._kvos_cpu", ops_dir / "_kvos_cpu.abi3.so"),
                       ("kvos_baseline_qblocks", ops_dir / "qblocks.py")):
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        mods.append(mod)
    ext, qb = mods
    return qb.qmm_pack, ext.lib, ext.ffi


def weights(g, old_pack=None):
    out = []
    for _ in range(LAYERS):
        for n, k in SHAPES:
            codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
            d, m = torch.rand(n, k // 32, generator=g) * 0.01, -torch.rand(n, k // 32, generator=g) * 0.05
            old = old_pack(codes, d, m, 4) if old_pack else None
            out.append((n, k, 4, ops.qmm_pack(codes, d, m, 4), Int4Linear.from_codes(codes, d, m + 8 * d), old))
    n, k = HEAD
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    d = torch.rand(n, k // 32, generator=g) * 0.01
    old = old_pack(q.int() + 128, d, -128 * d, 8) if old_pack else None
    out.append((n, k, 8, ops.qmm_pack(q.int() + 128, d, -128 * d, 8), Int8Linear.from_blocks(q, d), old))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--baseline", help="a kvos checkout whose qmm runs as 'qmm old'")
    ap.add_argument("--panel", action="store_true", help="also time float32 panel_mm on the same shapes")
    ap.add_argument("--split", action="store_true", help="4-bit projections and the 8-bit head timed apart")
    ap.add_argument("--paths", default="", help="vector paths to time apart, of: portable, vnni, avx2, amx")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cpu.set_num_threads(1)
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - set(PATHS)
    if unknown:
        ap.error(f"--paths: unknown {sorted(unknown)}; choose from {sorted(PATHS)}")
    old_pack, old_lib, old_ffi = load_baseline(args.baseline) if args.baseline else (None, None, None)
    if old_lib is not None:
        old_lib.kvos_set_num_threads(1)
    ws = weights(torch.Generator().manual_seed(0), old_pack)
    new_lib, new_ffi = cpu._load().lib, cpu._load().ffi

    def new_ptr(t):
        return new_ffi.cast("void *", t.data_ptr())
    panels = [(n, k, ops.panel_pack(torch.randn(n, k))) for n, k, *_ in ws] if args.panel else []
    qmm_bytes = sum(w[3].numel() for w in ws)
    print(f"one thread, CPU time; qmm's weights {qmm_bytes / 1e6:.0f} MB; min (median) of {args.rounds} rounds")
    for m in (int(b) for b in args.batches.split(",")):
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        xb = {k: x.bfloat16() for k, x in xs.items()}
        outs = {n: torch.empty(m, n) for n in {w[0] for w in ws}}
        fns = {
            "qmm raw": lambda xs=xs, outs=outs: [cpu.qmm(xs[k], p, n, b, 0, outs[n]) for n, k, b, p, *_ in ws],
            "qmm": lambda xs=xs: [ops.qmm(xs[k], p, n, b) for n, k, b, p, *_ in ws],
            "int4 op": lambda xb=xb: [w.mm(xb[k]) for n, k, b, p, w, _ in ws],
        }
        if old_lib is not None:
            def ptr(t):
                return old_ffi.cast("void *", t.data_ptr())
            fns["qmm old"] = lambda xs=xs, outs=outs, m=m: [
                old_lib.kvos_qmm(ptr(outs[n]), n, ptr(xs[k]), k, m, k, ptr(o), n, b, 0) for n, k, b, p, w, o in ws]
        for path in paths:
            fns[f"qmm {path}"] = lambda xs=xs, outs=outs, code=PATHS[path]: [
                cpu.qmm(xs[k], p, n, b, code, outs[n]) for n, k, b, p, *_ in ws]
        macs = {}
        if args.split:
            for bits, part in ((4, "4-bit"), (8, "head")):
                group = [w for w in ws if w[2] == bits]
                macs[part] = m * sum(n * k for n, k, *_ in group)
                # the C entry point through cffi, as qmm old calls its own: the same Python per call
                fns[f"qmm raw {part}"] = lambda xs=xs, outs=outs, m=m, group=group: [
                    new_lib.kvos_qmm(new_ptr(outs[n]), n, new_ptr(xs[k]), k, m, k, new_ptr(p), n, b, 0)
                    for n, k, b, p, *_ in group]
                for path in paths:
                    fns[f"qmm {path} {part}"] = lambda xs=xs, outs=outs, group=group, code=PATHS[path]: [
                        cpu.qmm(xs[k], p, n, b, code, outs[n]) for n, k, b, p, *_ in group]
                if old_lib is not None:
                    fns[f"qmm old {part}"] = lambda xs=xs, outs=outs, m=m, group=group: [
                        old_lib.kvos_qmm(ptr(outs[n]), n, ptr(xs[k]), k, m, k, ptr(o), n, b, 0)
                        for n, k, b, p, w, o in group]
        if panels:
            fns["panel f32"] = lambda xs=xs, outs=outs, m=m: [cpu.panel_mm(outs[n], xs[k], p, None, m, k, n, False)
                                                         for n, k, p in panels]
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
        if macs:
            print(f"M {m:3d} G MAC/s: " + "  ".join(
                f"{name} {macs[name.rsplit(' ', 1)[1]] / min(t) / 1e9:.1f}" for name, t in times.items()
                if name.rsplit(" ", 1)[-1] in macs), flush=True)


if __name__ == "__main__":
    main()
