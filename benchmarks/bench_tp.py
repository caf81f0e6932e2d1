"""The CPU cost of tensor parallelism per decode step: collectives (count, bytes, seconds) and step time.

For each batch size, one kernel on one rank and one on --tp ranks (gloo) run the same decode
steps, interleaved round by round so the machine's noise falls on both. Every rank gets
--threads threads (1 by default: TP t then uses t cores where one rank uses one). Reported per
decode step: wall time of each, their ratio, and on rank 0 the collectives' count, bytes and the
seconds spent in them (that time includes waiting for the slowest rank, so it bounds the
transport's cost from above). A machine with fewer cores than ranks cannot show a speedup.

    .venv/bin/python benchmarks/bench_tp.py                                  # tiny-llama, tp 2
    .venv/bin/python benchmarks/bench_tp.py --model smollm2-135m --tp 3 --batches 1 8
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import kernel


def boot(args, tp: int, batch: int):
    k = kernel.boot(device="cpu", memory="64MiB", token_budget=max(512, batch * args.prompt), threads=args.threads,
                    tp=tp)
    root = k.syscalls()
    tid = root.spawn_tenant(args.model)
    for i in range(batch):
        root.spawn(tid, [10 + (i + j) % 300 for j in range(args.prompt)], max_tokens=args.steps * args.rounds + 8,
                   temperature=0, ignore_eos=True)
    k.step()                                 # the prefill of every prompt, in one step
    k.step()                                 # the first decode step (warm-up)
    return k


def measure(k, steps: int) -> dict:
    tp = getattr(k.device, "tp", None)
    calls0, bytes0, secs0 = (tp.calls, tp.bytes, tp.seconds) if tp else (0, 0, 0.0)
    started = time.perf_counter()
    for _ in range(steps):
        k.step()
    wall = (time.perf_counter() - started) / steps
    if tp is None:
        return dict(step_s=wall)
    return dict(step_s=wall, collectives=(tp.calls - calls0) / steps, bytes=(tp.bytes - bytes0) / steps,
                collective_s=(tp.seconds - secs0) / steps)


def _bare_peer(port: int, shapes: list, iters: int) -> None:
    import datetime

    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, False, timeout=datetime.timedelta(seconds=60))
    pg = dist.ProcessGroupGloo(dist.PrefixStore("bare", store), 1, 2, datetime.timedelta(seconds=60))
    for shape in shapes:
        x = torch.ones(shape)
        for _ in range(iters + 5):
            pg.allreduce([x]).wait()


def bare_all_reduce(shapes: list, iters: int = 200) -> dict:
    """Seconds per fp32 all_reduce of each shape between two processes doing nothing else: the
    transport's own cost on this machine now, to hold the in-step figures against."""
    import datetime
    import multiprocessing

    import torch
    import torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False, timeout=datetime.timedelta(seconds=60))
    peer = multiprocessing.get_context("spawn").Process(target=_bare_peer, args=(store.port, shapes, iters))
    peer.start()
    pg = dist.ProcessGroupGloo(dist.PrefixStore("bare", store), 0, 2, datetime.timedelta(seconds=60))
    out = {}
    for shape in shapes:
        x = torch.ones(shape)
        for _ in range(5):
            pg.allreduce([x]).wait()
        started = time.perf_counter()
        for _ in range(iters):
            pg.allreduce([x]).wait()
        out[shape] = (time.perf_counter() - started) / iters
    peer.join()
    return out


def _median(runs: dict, key: str, tp: int) -> float:
    return statistics.median(r[key] for r in runs[tp])


def _hidden(model: str) -> int:
    """The hidden size of the model's residual stream (what each all_reduce carries per token)."""
    k = kernel.boot(device="cpu", frames=4)
    tid = k.syscalls().spawn_tenant(model)
    hidden = k.tenants[tid].program.config.hidden_size        # a benchmark may look inside its own kernel
    k.shutdown()
    return hidden


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--threads", type=int, default=1, help="threads of every rank (default 1)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens of each process (default 16)")
    p.add_argument("--steps", type=int, default=5, help="decode steps timed per round (default 5)")
    p.add_argument("--rounds", type=int, default=4, help="rounds, alternating one rank and tp (default 4)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for batch in args.batches:
        one, split = boot(args, 1, batch), boot(args, args.tp, batch)
        runs = {1: [], args.tp: []}
        for _ in range(args.rounds):
            for tp, k in ((1, one), (args.tp, split)):
                runs[tp].append(measure(k, args.steps))
        one.shutdown(kill=True)
        split.shutdown(kill=True)
        row = dict(batch=batch, one_rank_ms=1e3 * _median(runs, "step_s", 1),
                   tp_ms=1e3 * _median(runs, "step_s", args.tp), collectives=_median(runs, "collectives", args.tp),
                   kib=_median(runs, "bytes", args.tp) / 1024,
                   collective_ms=1e3 * _median(runs, "collective_s", args.tp))
        row["ratio"] = row["tp_ms"] / row["one_rank_ms"]
        row["collective_share"] = row["collective_ms"] / row["tp_ms"]
        rows.append(row)
    hidden = _hidden(args.model)
    bare = bare_all_reduce([(b, hidden) for b in args.batches])
    for row in rows:
        row["bare_all_reduce_ms"] = 1e3 * bare[(row["batch"], hidden)]
    if args.json:
        print(json.dumps(dict(model=args.model, tp=args.tp, threads=args.threads, rows=rows)))
        return
    print(f"{args.model}, tp {args.tp} against one rank, {args.threads} thread(s) per rank, decode steps "
          f"(median of {args.rounds} rounds of {args.steps} steps, interleaved)")
    print("batch  one rank ms  tp ms  tp/one  collectives  KiB/step  in collectives ms (share)  "
          "bare 2-rank all_reduce ms")
    for r in rows:
        print(f"{r['batch']:5d}  {r['one_rank_ms']:11.2f}  {r['tp_ms']:5.2f}  {r['ratio']:6.2f}  "
              f"{r['collectives']:11.0f}  {r['kib']:8.1f}  {r['collective_ms']:8.2f} ({r['collective_share']:.0%})"
              f"  {r['bare_all_reduce_ms']:25.3f}")


if __name__ == "__main__":
    main()
