"""`python -m userspace.bench.profile`: where kvos's time goes on a bench workload, by category.

Runs kvos in this process in manual mode under cProfile, each step run by a trace() syscall, and sums
the calls that make up a step (matmuls, attention, norms, sampling, scheduler, batch building...; on
the CPU a step's layers are one C call unless --python-loop),
then step time by batch shape from the trace records. --cpu-time with --threads 1 holds on a busy machine."""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

# (category, how to find its time): "tot" sums the tottime of calls whose name contains one of
# the patterns (torch builtins); "cum" sums the cumulative time of the Python functions named
# (file suffix, function); "self" their own time, without what they call. Tests check that every
# named function exists. Overlaps are small: to_device's and sample()'s few `to`/index_select
# calls count twice.
CATEGORIES = [
    ("matmul (mm, addmm, F.linear)", "tot", ("built-in method torch._C._nn.linear", "method 'addmm_'",
                                              "built-in method torch.mm>", "built-in method torch.addmm>")),
    ("matmul (C panel_mm, float32)", "cum", (("kernel/ops/panel.py", "panel_mm"),)),
    ("matmul (C qmm, GGUF blocks)", "cum", (("kernel/ops/qblocks.py", "__call__"), ("kernel/ops/qblocks.py", "qmm"))),
    ("dtype casts and residual adds (bf16 matmuls)", "tot", ("method 'to' of", "method 'add_' of")),
    ("layers in one C call (csrc/cpu/layers.c)", "cum", (("kernel/ops/step_ops.py", "layers"),)),
    ("attention (C paged_attention)", "cum", (("kernel/ops/dispatch.py", "paged_attention"),
                                              ("kernel/ops/step_ops.py", "attention"))),
    ("fused C ops (norms, RoPE + K/V write, SiLU)", "cum", (
        ("kernel/ops/step_ops.py", "rms_norm"), ("kernel/ops/step_ops.py", "add_rms_norm"),
        ("kernel/ops/step_ops.py", "rope_write_kv"), ("kernel/ops/step_ops.py", "silu_mul"))),
    ("K/V write (C write_kv)", "cum", (("kernel/ops/dispatch.py", "write_kv"),)),
    ("RMSNorm", "tot", ("method torch.rms_norm",)),
    ("RoPE", "cum", (("userspace/programs/rope.py", "apply"),)),
    ("RoPE table lookup", "cum", (("userspace/programs/rope.py", "lookup"),)),
    ("SiLU x up", "tot", ("built-in method torch._C._nn.silu", "method 'mul_'")),
    ("embedding, row select", "tot", ("method torch.embedding", "method 'index_select'")),
    ("the forward's own Python (the layer loop)", "self", (("userspace/programs/llama.py", "forward"),)),
    ("sampling", "cum", (("kernel/step.py", "sample_rows"),)),
    ("scheduler", "cum", (("kernel/sched/scheduler.py", "schedule"),)),
    ("batch building", "cum", (("kernel/batch.py", "host_batch"), ("kernel/batch.py", "to_device"),
                               ("kernel/devices/graphs.py", "fill"))),
    ("mm flush (CoW, swap copies)", "cum", (("kernel/mm/memory.py", "flush"),)),
    ("commit (append_token, stop checks, exits)", "cum", (("kernel/step.py", "commit"),)),
    ("step record (schedstat, trace ring)", "cum", (("kernel/step.py", "record"),)),
]
# trace()'s wait: in manual mode it runs the next step, so this only bounds one step.
STEP_TIMEOUT = 600.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m userspace.bench.profile", description=__doc__)
    p.add_argument("--workload", choices=("mixed", "shared", "sampling", "single"), default="mixed")
    p.add_argument("--trace", metavar="FILE")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--memory", default="1GiB")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--token-budget", type=int, default=512)
    p.add_argument("--pstats", metavar="FILE", help="also save the raw profile (snakeviz, pstats)")
    p.add_argument("--python-loop", action="store_true",
                   help="run the CPU program's layer loop in Python (KVOS_LAYER_LOOP=python), not in one C call, "
                        "so the breakdown shows each op")
    p.add_argument("--cpu-time", action="store_true",
                   help="time calls by the process's CPU time, not wall time: with --threads 1 the breakdown "
                        "holds even while other work shares the cores")
    args = p.parse_args(argv)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "KVOS_THREADS"):
        os.environ[name] = str(args.threads)
    if args.python_loop:
        os.environ["KVOS_LAYER_LOOP"] = "python"

    import kernel
    from userspace.bench import workloads
    from userspace.programs.loader import load_program

    program = load_program(args.model, "cpu")      # for the workload's token ids, as `kvos bench` does
    workload = workloads.build(args.workload, program, quick=args.quick, trace=args.trace)
    del program
    k = kernel.boot(device="cpu", memory=args.memory, threads=args.threads, token_budget=args.token_budget)
    root = k.syscalls()
    tid = root.spawn_tenant(args.model)
    root.wait(root.spawn(tid, workload.requests[0].prompt[:8], max_tokens=2, temperature=0, ignore_eos=True))
    queue = list(workload.requests)

    def hand_over():
        r = queue.pop(0)
        root.spawn_n(tid, r.prompt, r.n, max_tokens=r.output_len, temperature=workload.temperature,
                     ignore_eos=True)

    # Arrivals are ignored: everything is spawned at once, or (serial) each when the previous has ended.
    while queue and not (workload.serial and len(queue) < len(workload.requests)):
        hand_over()
    since = root.schedstat().steps
    profiler = cProfile.Profile(time.process_time) if args.cpu_time else cProfile.Profile()
    started = time.perf_counter()
    cpu0 = time.process_time()
    profiler.enable()
    history = []
    # Manual mode: each trace() runs the next step in this thread, so cProfile sees Kernel.step;
    # [] means nothing is runnable any more (serial: the request has ended, the next one goes in).
    while True:
        steps = root.trace(since=since, timeout=STEP_TIMEOUT)
        if not steps:
            if not queue:
                break
            hand_over()
            continue
        history.extend(steps)
        since = steps[-1].step
    profiler.disable()
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    total = cpu if args.cpu_time else wall
    print(f"wall {wall:.1f} s, CPU {cpu:.1f} s on {args.threads} thread(s); shares below are of "
          f"{'CPU' if args.cpu_time else 'wall'} time")
    report(pstats.Stats(profiler), total, history, workload)
    if args.pstats:
        profiler.dump_stats(args.pstats)
    k.shutdown()
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
                total += cumtime if how == "cum" else tottime
        out[name] = total
    return out


def report(stats, wall, history, workload) -> None:
    """Print the breakdown; `wall` is the total the shares are of (wall or CPU seconds), `history`
    the run's step records."""
    cats = category_seconds(stats)
    step_total = sum(cum for (f, _, fn), (_, _, _, cum, _) in stats.stats.items()
                     if f.endswith("kernel/kernel.py") and fn == "step")
    print(f"kvos profile: {workload.name}, {workload.num_samples} sequences, {len(history)} steps, {wall:.1f} s "
          f"(under cProfile), {step_total:.1f} s in Kernel.step")
    for name, seconds in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {name:46s} {seconds:8.2f} s  {seconds / wall:6.1%}")
    rest = wall - sum(cats.values())
    print(f"  {'everything else':46s} {rest:8.2f} s  {rest / wall:6.1%}")
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
    print("  steps by shape (the kernel's own step timer, from the trace records):")
    for key, (n, secs, toks) in sorted(buckets.items()):
        print(f"    {key:14s} {n:5d} steps  {secs / n * 1000:8.1f} ms/step  {toks / secs:8.1f} tok/s  "
              f"{secs:7.1f} s")


if __name__ == "__main__":
    raise SystemExit(main())
