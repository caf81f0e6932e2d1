"""A decode step's wall time by batch size, on the CPU: what one more process in a step costs.

    python benchmarks/bench_decode_batch.py [--batches 1,2,4,8,16] [--steps 25] [--threads 2]

For each batch B, boots a kernel, spawns B greedy processes of a 100-token prompt (each starting
with another token, so none maps another's pages) and times --steps decode steps after three
warm-up steps; prints the median step in ms and its ratio to batch 1. To compare two builds of the
C kernels, run it on each, alternating (the machine drifts between runs; see docs/performance.md
section 17).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kernel  # noqa: E402


def step_ms(model: str, batch: int, steps: int, threads: int) -> float:
    k = kernel.boot(memory="256MiB", threads=threads)
    root = k.syscalls()
    tid = root.spawn_tenant(model)
    ids = root.tokenize(tid, (ROOT / "docs" / "lifecycle.md").read_text())[:100]
    pids = [root.spawn(tid, [ids[0] + i] + ids[1:], max_tokens=steps + 10, temperature=0, ignore_eos=True)
            for i in range(batch)]
    for _ in range(3):                       # the prefill, then two decode steps
        k.step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        k.step()
        times.append(time.perf_counter() - started)
    for pid in pids:
        root.kill(pid)
        root.wait(pid)
    k.shutdown()
    return 1000 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    ms = {b: step_ms(args.model, b, args.steps, args.threads) for b in batches}
    print(f"{args.model}, decode step (median of {args.steps}), {args.threads} threads")
    for b, t in ms.items():
        print(f"batch {b:4}: {t:7.1f} ms  ({t / ms[batches[0]]:.2f}x batch {batches[0]})")


if __name__ == "__main__":
    main()
