"""Decode steps of SmolLM2-135M with float32, bf16-matmul and GGUF-quantized weights (issue 17).

One process loads the three programs and times their decode steps at batch 1, 8 and 64 in
interleaved rounds (this machine is shared: every variant sees the same load; min and median of the
rounds). A child process per variant reports the resident set after load (peak and current).
--gemms also times the 120 projection GEMMs of one step alone (cold weights: each matrix is
read once per pass, as in a step), so the rest of the step (attention, norms, Python) shows.
The gguf program runs twice per round: "gguf qmm" forces ops.qmm at every batch size
(qlinear.QMM_MAX_ROWS huge), "gguf int4" the int4 op (QMM_MAX_ROWS = 0) on the same blocks,
which every BlockLinear carries here as its `wide` form (with_int4_op; programs load without).
Run: PYTHONPATH=$PWD python benchmarks/bench_quant.py [--rounds 7] [--gemms]
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from tests.helpers.paged_runner import PagedRunner
from userspace.programs import qlinear
from userspace.programs.loader import load_program

VARIANTS = {"float32": {}, "bf16 matmul": {"matmul": "bfloat16"}, "gguf": {"weights": "gguf"}}
GGUF_MODES = {"gguf int4": 0, "gguf qmm": 1 << 30}        # qlinear.QMM_MAX_ROWS for each
MODEL = "smollm2-135m"
CLOCK = time.perf_counter     # --cpu-time: time.thread_time on one thread (what the work costs, not the wait)
CONTEXT = 64


def rss_after_load(variant: str) -> dict:
    code = ("import json, resource, time; from userspace.programs.loader import load_program; t = time.perf_counter(); "
            f"p = load_program({MODEL!r}, **{VARIANTS[variant]!r}); load = time.perf_counter() - t; "
            "rss = int(open('/proc/self/statm').read().split()[1]) * 4096; "
            "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024; "
            "print(json.dumps({'load_s': load, 'rss': rss, 'peak': peak}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def weight_bytes(program) -> int:
    return qlinear.read_bytes(program.layers, program.lm_head, program.norm)


def decoder(program, batch: int):
    runner = PagedRunner(program, num_frames=batch * 16)
    seqs = [runner.new_seq() for _ in range(batch)]
    runner.step([(s, list(range(10 + i, 10 + i + CONTEXT))) for i, s in enumerate(seqs)])

    def step():
        for s in seqs:          # keep contexts short of the frames they own
            if s.length >= 15 * 16:
                s.length = CONTEXT
        runner.step([(s, [7]) for s in seqs])
    return step


def gemm_pass(program, batch: int):
    x = torch.randn(batch, 1536)
    layers = program.layers

    def run():
        for layer in layers:
            h = x[:, :576].contiguous()
            qlinear.mm(h.to(program.matmul_dtype), layer.qkv_t)
            qlinear.mm(h.to(program.matmul_dtype), layer.o_t)
            qlinear.mm(h.to(program.matmul_dtype), layer.gate_up_t)
            qlinear.mm(x.to(program.matmul_dtype), layer.down_t)
        qlinear.head(x[:, :576], program.lm_head, program.matmul_dtype)
    return run


def add_int4_forms(program):
    """Every BlockLinear of the program (projections, tied head) gets the int4 op's form as `wide`."""
    for layer in program.layers:
        for name in ("qkv_t", "o_t", "gate_up_t", "down_t"):
            w = getattr(layer, name)
            if isinstance(w, qlinear.BlockLinear):
                setattr(layer, name, w.with_int4_op())
    head = program.lm_head
    if isinstance(head, qlinear.BlockTable) and isinstance(head.head, qlinear.BlockLinear):
        head.head = head.head.with_int4_op()
    elif isinstance(head, qlinear.BlockLinear):
        program.lm_head = head.with_int4_op()


def with_rows(fn, max_rows):
    """fn run with BlockLinear switching to the int4 op past max_rows rows."""
    def run():
        qlinear.QMM_MAX_ROWS = max_rows
        fn()
    return run


def split_gguf(fns: dict, make, program) -> dict:
    del fns["gguf"]
    fns.update({mode: with_rows(make(program), rows) for mode, rows in GGUF_MODES.items()})
    return fns


def race(fns: dict, rounds: int) -> dict:
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = CLOCK()
            fn()
            times[k].append(CLOCK() - t)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--gemms", action="store_true")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread, timed by its CPU time: on a crowded machine wall time mostly measures the queue")
    args = ap.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.thread_time
        torch.set_num_threads(1)
    print(f"threads {torch.get_num_threads()}; min and median of {args.rounds} interleaved rounds "
          "(shared machine: the min is the least disturbed)")
    for v in () if args.skip_rss else VARIANTS:
        r = rss_after_load(v)
        print(f"{v:12s} load {r['load_s']:.2f} s  RSS after load {r['rss'] / 2**20:.0f} MiB  "
              f"peak {r['peak'] / 2**20:.0f} MiB")
    programs = {v: load_program(MODEL, **kw) for v, kw in VARIANTS.items()}
    add_int4_forms(programs["gguf"])
    for v, p in programs.items():
        print(f"{v:12s} bytes a decode step reads (projections + head): {weight_bytes(p) / 1e6:.0f} MB")
    wide = sum(qlinear.weight_bytes(getattr(layer, n).wide) for layer in programs["gguf"].layers
               for n in ("qkv_t", "o_t", "gate_up_t", "down_t"))
    head = programs["gguf"].lm_head
    wide += qlinear.weight_bytes((head.head if isinstance(head, qlinear.BlockTable) else head).wide)
    print(f"gguf int4    bytes its GEMMs read (the int4 op's form): {wide / 1e6:.0f} MB")
    for batch in (int(b) for b in args.batches.split(",")):
        fns = split_gguf({v: decoder(p, batch) for v, p in programs.items()},
                         lambda p, b=batch: decoder(p, b), programs["gguf"])
        steps = race(fns, args.rounds)
        line = "  ".join(f"{v} {t[0] * 1e3:.1f} ({t[1] * 1e3:.1f})" for v, t in steps.items())
        print(f"batch {batch:3d} decode step ms, min (median): {line}; "
              f"float32/gguf qmm {steps['float32'][0] / steps['gguf qmm'][0]:.2f}x", flush=True)
        if args.gemms:
            gemms = race(split_gguf({v: gemm_pass(p, batch) for v, p in programs.items()},
                                    lambda p, b=batch: gemm_pass(p, b), programs["gguf"]), args.rounds)
            print("          GEMMs alone: " + "  ".join(f"{v} {t[0] * 1e3:.1f} ({t[1] * 1e3:.1f})"
                                                     for v, t in gemms.items()), flush=True)


if __name__ == "__main__":
    main()
