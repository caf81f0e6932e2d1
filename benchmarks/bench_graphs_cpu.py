"""What the custom ops and the decode graph runner cost on the CPU.

PYTHONPATH=. python3 benchmarks/bench_graphs_cpu.py [--model M] [--rounds N]

One thread, CPU time of this thread (it holds on a shared machine), contenders interleaved round by
round, min and median over rounds:
1. the torch.library layer: the C kernel called directly (kernel/ops/cpu.py) against the same call
   through torch.ops.kvos (kernel/ops/library.py), for write_kv and paged_attention on a small decode
   batch (SmolLM2's 9/3/64 heads, 4 sequences);
2. a decode step of the whole kernel (tiny-llama, or --model) eager against the graph runner's padded
   static path (graphs=True: no capture on the CPU), at batch 3 (padded to 4) and 8;
3. batch building (kernel/step.py's host_batch and to_device, or build_batch where a tree has that)
   per decode step at 256 sequences of tiny-llama with 300-token prompts;
4. host_batch alone at the same 256 decode rows, its page table gathered from the kernel's persistent
   rows (kernel/pagerows.py) against filled row by row, both on every step in alternating order;
5. the host's part of such a step at temperature 0.7, by part (schedule, host_batch, sample_rows, commit):
   the step's CPU time less the program's forward, best of 5 rounds of 10 steps.
"""
import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernel  # noqa: E402
from kernel import ops  # noqa: E402
from kernel.ops import cpu, library  # noqa: E402
from tests.test_ops_helpers import make_batch  # noqa: E402


def rounds_of(contenders: dict, rounds: int, calls: int) -> dict:
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.thread_time()
            for _ in range(calls):
                fn()
            times[name].append((time.thread_time() - t0) / calls)
    return times


def show(label, times, unit, scale):
    for name, values in times.items():
        print(f"   {label:<28} {name:<22} min {min(values) * scale:8.2f} {unit}   "
              f"median {statistics.median(values) * scale:8.2f} {unit}")


def op_layer(rounds):
    b = make_batch([1] * 4, [40, 30, 70, 17], 9, 3, 64, 16, seed=1)
    k_cache, v_cache = b.caches
    k = torch.randn(4, 3, 64)
    slots = torch.tensor([1, 17, 33, 50], dtype=torch.int32)
    out = torch.empty_like(b.q)
    attn = (b.q, k_cache, v_cache, b.page_table, b.query_start, b.context_lens, 0.125, out, True)
    print("== the torch.library layer: CPU time per call")
    show("write_kv", rounds_of({"C directly": lambda: cpu.write_kv(k_cache, v_cache, k, k, slots, True),
                                "torch.ops.kvos": lambda: library.write_kv(k_cache, v_cache, k, k, slots, True),
                                "ops.write_kv (checks)": lambda: ops.write_kv(k_cache, v_cache, k, k, slots)},
                               rounds, 2000), "us", 1e6)
    show("paged_attention", rounds_of({"C directly": lambda: cpu.paged_attention(*attn),
                                       "torch.ops.kvos": lambda: library.paged_attention(*attn)},
                                      rounds, 2000), "us", 1e6)


def decode_steps(model, batches, rounds):
    print(f"== a decode step of {model}: eager against the static (padded) path, CPU time per step")
    for batch in batches:
        k = kernel.boot(memory="64MiB", graphs=True, threads=1)
        s = k.syscalls()
        tid = s.spawn_tenant(model)
        rng = random.Random(0)
        for _ in range(batch):
            s.spawn(tid, [rng.randrange(3, 500) for _ in range(40)], max_tokens=500, temperature=0, ignore_eos=True)
        for _ in range(5):
            k.step()
        runner = k.graphs

        def steps(on, k=k, runner=runner):
            def run():
                k.graphs = runner if on else None
                k.step()
            return run
        show(f"batch {batch}", rounds_of({"eager": steps(False), "static": steps(True)}, rounds, 10), "ms", 1e3)


def decoding_256(temperature=0.0):
    """A kernel whose 256 tiny-llama sequences decode, 30 steps after their 300-token prompts."""
    k = kernel.boot(memory="256MiB", threads=1, max_running=256, token_budget=4096)
    s = k.syscalls()
    tid = s.spawn_tenant("tiny-llama")
    rng = random.Random(0)
    for _ in range(256):
        s.spawn(tid, [rng.randrange(3, 500) for _ in range(300)], max_tokens=200, temperature=temperature,
                ignore_eos=True)
    for _ in range(30):
        k.step()
    return k


def batch_building(rounds):
    from kernel import step as kstep
    spent = [0.0]
    for name in ("build_batch", "host_batch", "to_device"):
        if hasattr(kstep, name):
            real = getattr(kstep, name)

            def timed(*a, _real=real, **kw):
                t0 = time.thread_time()
                out = _real(*a, **kw)
                spent[0] += time.thread_time() - t0
                return out
            setattr(kstep, name, timed)
    k = decoding_256()
    per = []
    for _ in range(rounds):
        spent[0] = 0.0
        for _ in range(10):
            k.step()
        per.append(spent[0] / 10)
    print("== batch building per decode step, 256 sequences (CPU time)")
    print(f"   min {min(per) * 1e6:.0f} us   median {statistics.median(per) * 1e6:.0f} us")


def page_rows_vs_rebuilt(rounds):
    from kernel import batch as kbatch
    from kernel import step as kstep
    real = getattr(kbatch, "host_batch", None)       # the function itself: part 3 wraps kstep's name
    if real is None or "page_rows" not in real.__code__.co_varnames:
        print("== host_batch: this tree has no persistent page rows")
        return
    wrapped = kstep.host_batch
    spent = {"persistent rows": 0.0, "rebuilt": 0.0}
    flip = [False]

    def both(works, wanted, mm, null_frame=None, page_rows=None, *extra):
        out = None
        order = (("rebuilt", None), ("persistent rows", page_rows))
        for name, rows in (order[::-1] if flip[0] else order):
            t0 = time.thread_time()
            got = real(works, wanted, mm, null_frame, rows, *extra)
            spent[name] += time.thread_time() - t0
            out = got if rows is not None else out
        flip[0] = not flip[0]
        return out
    kstep.host_batch = both
    k = decoding_256()
    per = {name: [] for name in spent}
    for _ in range(rounds):
        for name in spent:
            spent[name] = 0.0
        for _ in range(10):
            k.step()
        for name in spent:
            per[name].append(spent[name] / 10)
    kstep.host_batch = wrapped
    print("== host_batch per decode step, 256 sequences (CPU time)")
    for name, times in per.items():
        print(f"   {name:16s} min {min(times) * 1e6:.0f} us   median {statistics.median(times) * 1e6:.0f} us")


def host_parts(rounds):
    import collections

    from kernel import step as kstep
    from kernel.sched import scheduler as ksched
    spent = collections.defaultdict(float)
    saved = []

    def wrap(owner, name, label):
        real = getattr(owner, name)
        saved.append((owner, name, real))

        def timed(*a, **kw):
            t0 = time.thread_time()
            out = real(*a, **kw)
            spent[label] += time.thread_time() - t0
            return out
        setattr(owner, name, timed)
    for name in ("host_batch", "sample_rows", "commit"):
        wrap(kstep, name, name)
    wrap(ksched.Scheduler, "schedule", "schedule")
    k = decoding_256(temperature=0.7)
    wrap(k.device, "forward", "forward")
    best = None
    for _ in range(rounds):
        spent.clear()
        t0 = time.thread_time()
        for _ in range(10):
            k.step()
        row = {name: v / 10 for name, v in spent.items()}
        row["step"] = (time.thread_time() - t0) / 10
        best = row if best is None or row["step"] < best["step"] else best
    for owner, name, real in saved:
        setattr(owner, name, real)
    print("== the host's part of a 256-sequence decode step at temperature 0.7 (CPU time, best round)")
    print(f"   step {best['step'] * 1e3:.2f} ms, forward {best['forward'] * 1e3:.2f} ms, "
          f"host {(best['step'] - best['forward']) * 1e3:.2f} ms: " +
          ", ".join(f"{name} {best[name] * 1e3:.2f}" for name in ("schedule", "host_batch", "sample_rows", "commit")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ops.set_num_threads(1)
    op_layer(args.rounds)
    decode_steps(args.model, (3, 8), args.rounds)
    batch_building(5)
    page_rows_vs_rebuilt(7)
    host_parts(5)


if __name__ == "__main__":
    main()
