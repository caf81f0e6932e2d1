"""What drawing a token costs: kernel/sampling.py's sample() per row, csrc/cpu/draw.c against its twin.

PYTHONPATH=. python3 benchmarks/bench_sampling.py [--vocab 49152] [--rows 1,8,64,256] [--threads 1]

For each batch size and set of parameters: the whole sample() call per row (the generators' uniforms,
the checks, the C draw) and the twin (kernel/ops/reference.py draw_tokens, batched torch: what CUDA
rows run) on the same rows, best of 5, and their ratio (copied into a tree from before draw.c, it
times that tree's sample() alone). Two kinds of rows: "peaked" (a few likely
tokens over a normal spread, as a model's rows mostly are: nuclei of a few hundred tokens) and "flat"
(standard normal logits: top-p 0.9 keeps tens of thousands of tokens, the C kernel's worst case).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel import ops  # noqa: E402
from kernel.ops import reference  # noqa: E402
from kernel.sampling import SamplingParams, make_generator, sample  # noqa: E402

PARAMS = {"greedy": dict(temperature=0.0), "T 0.8": dict(temperature=0.8),
          "T 0.8, top_p 0.9": dict(temperature=0.8, top_p=0.9),
          "T 0.7, top_k 40, top_p 0.95": dict(temperature=0.7, top_k=40, top_p=0.95)}


def best_of(fn, rounds=5):
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def rows_of(kind, rows, vocab):
    g = torch.Generator().manual_seed(0)
    if kind == "flat":
        return torch.randn(rows, vocab, generator=g)
    x = torch.randn(rows, vocab, generator=g) * 3.0
    x[:, : vocab // 100] += 8.0
    return x


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rows", default="1,8,64,256")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ops.set_num_threads(args.threads)
    print(f"sample() per row, vocab {args.vocab}, {args.threads} thread(s), best of 5 (us a row)")
    print(f"{'rows':>5} {'logits':<7} {'params':<28} {'sample()':>10} {'twin':>10} {'twin / C':>9}")
    for rows in (int(r) for r in args.rows.split(",")):
        for kind in ("peaked", "flat"):
            x = rows_of(kind, rows, args.vocab)
            for name, kw in PARAMS.items():
                params = [SamplingParams(**kw)] * rows
                gens = [make_generator(i) for i in range(rows)]
                ours = best_of(lambda x=x, params=params, gens=gens: sample(x, params, gens)) / rows
                if kw["temperature"] == 0:
                    print(f"{rows:5d} {kind:<7} {name:<28} {ours * 1e6:10.1f} {'':>10} {'':>9}")
                    continue
                if not hasattr(reference, "draw_tokens"):       # a tree from before draw.c (an A/B run)
                    print(f"{rows:5d} {kind:<7} {name:<28} {ours * 1e6:10.1f}")
                    continue
                p = params[0]
                per_row = (torch.full((rows,), p.temperature), torch.full((rows,), p.top_k, dtype=torch.int32),
                           torch.full((rows,), p.top_p, dtype=torch.float64),
                           torch.log(torch.full((rows,), p.min_p)), torch.rand(rows, dtype=torch.float64))
                twin = best_of(lambda x=x, per_row=per_row: reference.draw_tokens(x, *per_row)) / rows
                print(f"{rows:5d} {kind:<7} {name:<28} {ours * 1e6:10.1f} {twin * 1e6:10.1f} {twin / ours:8.1f}x")


if __name__ == "__main__":
    main()
