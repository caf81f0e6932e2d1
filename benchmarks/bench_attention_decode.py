"""CPU paged attention at decode, alone: one query row a sequence over SmolLM2-135M's shapes (9 query
heads over 3 KV heads of 64 dims, pages of 16 tokens, 30 layers) with the sequences' frames spread at
random over a pool larger than the L3, so each step reads its K/V from memory as a `mixed` run does.

Per cache dtype (float32, bfloat16, int8) and vector path (the isa cap: best, avx2, portable), the
median wall time of a 30-layer step over the rounds, and ns per query-row-token (the step's context
tokens x layers x query heads): the unit docs/performance.md quotes. Paths are interleaved round by
round. For a before/after comparison run the same command with PYTHONPATH on each checkout, in turns.
Run: PYTHONPATH=$PWD python benchmarks/bench_attention_decode.py [--batches 4,16,48] [--caches int8]
     [--caps best,avx2] [--threads 2] [--rounds 7]
"""
import argparse
import statistics
import time

import torch

from kernel import ops
from kernel.kvcache import KVShape, KVView
from kernel.ops import cpu

LAYERS, HEADS, KV_HEADS, HEAD_DIM, PAGE = 30, 9, 3, 64, 16
CACHES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def fill(view: KVView, dtype: torch.dtype, gen: torch.Generator):
    """Random K/V in every layer; an int8 cache gets codes and a float32 scale per row (q8.h's layout)."""
    for layer in range(LAYERS):
        for cache in view.layer(layer):
            if dtype != torch.int8:
                cache.copy_(torch.randn(cache.shape, generator=gen).to(dtype))
                continue
            cache.copy_(torch.randint(-127, 128, cache.shape, generator=gen, dtype=torch.int8))
            scales = torch.as_strided(cache, (*cache.shape[:3], 4), (*cache.stride()[:3], 1),
                                      cache.storage_offset() + HEAD_DIM)
            scales.copy_(torch.tensor([0.01]).view(torch.int8).expand(scales.shape))


def batch(dtype: torch.dtype, seqs: int, gen: torch.Generator):
    """(layers' caches, page table, query starts, context lengths, q): contexts of 200..599 tokens."""
    shape = KVShape(LAYERS, KV_HEADS, HEAD_DIM, dtype)
    ctx = torch.randint(200, 600, (seqs,), generator=gen)
    pages = (-(-ctx // PAGE)).tolist()
    frames = 2 * sum(pages) + 64          # half the pool is someone else's: the frames spread
    pool = torch.zeros(frames, shape.bytes_per_token * PAGE, dtype=torch.uint8)
    view = KVView(pool, shape)
    fill(view, dtype, gen)
    order = torch.randperm(frames, generator=gen).to(torch.int32)
    table = torch.zeros(seqs, max(pages), dtype=torch.int32)
    at = 0
    for s, n in enumerate(pages):
        table[s, :n] = order[at:at + n]
        at += n
    query_start = torch.arange(seqs + 1, dtype=torch.int32)
    q = torch.randn(seqs, HEADS, HEAD_DIM, generator=gen)
    return [view.layer(layer) for layer in range(LAYERS)], table, query_start, ctx.to(torch.int32), q


def make_step(layers, table, query_start, ctx, q):
    """One decode step's attention: a call a layer, unchecked (the batch is well formed)."""
    def step():
        for k, v in layers:
            ops.paged_attention(q, k, v, table, query_start, ctx, 0.125, check=False)
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="4,16,48", help="sequences a step")
    ap.add_argument("--caches", default="float32,bfloat16,int8")
    ap.add_argument("--caps", default="best", help="isa caps to compare, of: best, avx2, portable")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    cpu.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    caps = args.caps.split(",")
    gen = torch.Generator().manual_seed(0)
    print(f"{args.threads} thread(s); median of {args.rounds} rounds; ms a 30-layer step, ns a query-row-token")
    for name in args.caches.split(","):
        for seqs in (int(b) for b in args.batches.split(",")):
            layers, table, query_start, ctx, q = batch(CACHES[name], seqs, gen)
            step = make_step(layers, table, query_start, ctx, q)
            times = {cap: [] for cap in caps}
            for _ in range(args.rounds):
                for cap in caps:
                    before = cpu.set_isa_cap(cap)
                    step()
                    t = time.perf_counter()
                    step()
                    times[cap].append(time.perf_counter() - t)
                    cpu.set_isa_cap(before)
            row_tokens = int(ctx.sum()) * LAYERS * HEADS
            medians = {cap: statistics.median(t) for cap, t in times.items()}
            line = "  ".join(f"{cap} {t * 1e3:6.2f} ms {t / row_tokens * 1e9:5.1f} ns" for cap, t in medians.items())
            print(f"{name:8s} {seqs:3d} sequences: {line}", flush=True)


if __name__ == "__main__":
    main()
