"""`python -m userspace.bench.profile`: where kvos's time goes on a bench workload, by category.

Runs kvos in this process (same workload and boot options as `kvos bench`) under cProfile and sums
the calls that make up a step (matmuls, attention, norms, sampling, scheduler, batch building...),
then step time by batch shape. --cpu-time with --threads 1 holds on a busy machine."""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

# (category, how to find its time): "tot" sums the tottime of calls whose name contains one of
# the patterns (torch builtins); "cum" sums the cumulative time of the Python functions named
# (file suffix, function), old and new homes alike (a function that moved is still found).
CATEGORIES = [
    ("matmul (mm, addmm, F.linear)", "tot", ("built-in method torch._C._nn.linear", "method 'addmm_'",
                                              "built-in method torch.mm>", "built-in method torch.addmm>")),
    ("dtype casts and residual adds (bf16 matmuls)", "tot", ("method 'to' of", "method 'add_' of")),
    ("attention (C paged_attention)", "cum", (("kernel/ops/dispatch.py", "paged_attention"),)),
    ("K/V write (C write_kv)", "cum", (("kernel/ops/dispatch.py", "write_kv"),)),
    ("RMSNorm", "tot", ("method torch.rms_norm",)),
    ("RoPE", "cum", (("userspace/programs/rope.py", "apply"),)),
    ("RoPE table lookup", "cum", (("userspace/programs/rope.py", "lookup"),)),
    ("SiLU x up", "tot", ("built-in method torch._C._nn.silu", "method 'mul_'")),
    ("embedding, row select", "tot", ("method torch.embedding", "method 'index_select'")),
    ("sampling", "cum", (("kernel/step.py", "sample_rows"), ("kernel/kernel.py", "_sample"))),
    ("scheduler", "cum", (("kernel/sched/scheduler.py", "schedule"),)),
    ("batch building", "cum", (("kernel/batch.py", "build_batch"),)),
    ("mm flush (CoW, swap copies)", "cum", (("kernel/mm/memory.py", "flush"),)),
    ("commit (append, stop checks, exits)", "cum", (("kernel/step.py", "commit"), ("kernel/kernel.py", "_commit"))),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m userspace.bench.profile", description=__doc__)
    p.add_argument("--workload", choices=("mixed", "shared", "sampling"), default="mixed")
    p.add_argument("--trace", metavar="FILE")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--memory", default="1GiB")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--token-budget", type=int, default=512)
    p.add_argument("--pstats", metavar="FILE", help="also save the raw profile (snakeviz, pstats)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time calls by the process's CPU time, not wall time: with --threads 1 the breakdown "
                        "holds even while other work shares the cores")
    args = p.parse_args(argv)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "KVOS_THREADS"):
        os.environ[name] = str(args.threads)

    import kernel
    from userspace.bench import workloads
    from userspace.programs.loader import load_program

    program = load_program(args.model, "cpu")
    workload = workloads.build(args.workload, program, quick=args.quick, trace=args.trace)
    k = kernel.boot(device="cpu", memory=args.memory, threads=args.threads, token_budget=args.token_budget)
    sys_ = k.syscalls()
    tid = sys_.spawn_tenant(args.model)
    sys_.wait(sys_.spawn(tid, workload.requests[0].prompt[:8], max_tokens=2, temperature=0, ignore_eos=True))
    for r in workload.requests:       # arrivals are ignored: everything is spawned at once
        pid = sys_.spawn(tid, r.prompt, max_tokens=r.output_len, temperature=workload.temperature,
                         ignore_eos=True)
        if r.n > 1:
            sys_.fork(pid, r.n - 1)
    profiler = cProfile.Profile(time.process_time) if args.cpu_time else cProfile.Profile()
    started = time.perf_counter()
    cpu0 = time.process_time()
    profiler.enable()
    steps, history = 0, []
    while k.step():
        steps += 1
        last = k.stats.history[-1] if k.stats.history else None
        if last is not None and (not history or last.step != history[-1].step):
            history.append(last)
    profiler.disable()
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    total = cpu if args.cpu_time else wall
    print(f"wall {wall:.1f} s, CPU {cpu:.1f} s on {args.threads} thread(s); shares below are of "
          f"{'CPU' if args.cpu_time else 'wall'} time")
    report(pstats.Stats(profiler), total, steps, history, workload)
    if args.pstats:
        profiler.dump_stats(args.pstats)
    return 0


def category_seconds(stats: pstats.Stats) -> dict:
    out = {}
    for name, how, patterns in CATEGORIES:
        total = 0.0
        for (filename, _, func), (_, _, tottime, cumtime, _) in stats.stats.items():
            if how == "tot":
                if any(pat in func for pat in patterns):
                    total += tottime
            elif any(filename.endswith(f) and func == fn for f, fn in patterns):
                total += cumtime
        out[name] = total
    return out


def report(stats, wall, steps, history, workload) -> None:
    """Print the breakdown; `wall` is the total the shares are of (wall or CPU seconds)."""
    cats = category_seconds(stats)
    step_total = sum(cum for (f, _, fn), (_, _, _, cum, _) in stats.stats.items()
                     if f.endswith("kernel/kernel.py") and fn == "step")
    print(f"kvos profile: {workload.name}, {workload.num_samples} sequences, {steps} steps, {wall:.1f} s "
          f"(under cProfile), {step_total:.1f} s in Kernel.step")
    for name, seconds in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {name:40s} {seconds:8.2f} s  {seconds / wall:6.1%}")
    rest = wall - sum(cats.values())
    print(f"  {'everything else':40s} {rest:8.2f} s  {rest / wall:6.1%}")
    if history:
        _by_shape(history)


def _by_shape(history) -> None:
    """Step time by what the step computed: the cost of decode-only steps by batch size, and prefill."""
    buckets = {}
    for r in history:
        if r.prefill_tokens:
            key = "with prefill"
        else:
            b = r.batch_size
            key = "decode x1" if b == 1 else "decode x2-7" if b < 8 else "decode x8-31" if b < 32 else "decode x32+"
        n, secs, toks = buckets.get(key, (0, 0.0, 0))
        buckets[key] = (n + 1, secs + r.seconds, toks + r.prefill_tokens + r.decode_tokens)
    print("  steps by shape (the kernel's own step timer):")
    for key, (n, secs, toks) in sorted(buckets.items()):
        print(f"    {key:14s} {n:5d} steps  {secs / n * 1000:8.1f} ms/step  {toks / secs:8.1f} tok/s  "
              f"{secs:7.1f} s")


if __name__ == "__main__":
    raise SystemExit(main())
