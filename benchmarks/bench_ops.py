"""Benchmark of the CPU MMU kernels (make bench-ops): paged attention, write_kv, chunked prefill.

Compares the C kernels with torch baselines on the same machine in the same run: the
gather-then-SDPA twin, SDPA over an already-contiguous cache (the price of paging), the
machine's read bandwidth (a large torch sum) and its fp32 matmul rate. Prints ratios
against the targets of issue 3. Times are medians of repeats, in milliseconds.
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from kernel import ops
from kernel.kvcache import KVShape, KVView
from kernel.ops import reference


def timed(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


CLOCK = time.perf_counter


def race(contenders, repeats):
    """Median time of each contender, timed in interleaved rounds so that every one of
    them sees the same machine (this one is shared: other jobs come and go)."""
    for fn in contenders.values():
        fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0 = CLOCK()
            fn()
            times[name].append(CLOCK() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bandwidth_probe(mib=1024):
    """A torch sum over 1 GiB (far past the caches): its time gives the read bandwidth."""
    x = torch.ones(mib * 2**20 // 4)
    return x.numel() * 4, x.sum


def matmul_flops(n=2048, repeats=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / timed(lambda: a @ b, repeats)


class PagedBatch:
    """A batch laid out as kvos lays it out: frames of a shared pool in shuffled order."""

    def __init__(self, q_lens, ctx_lens, heads, kv_heads, head_dim, page_size, layers=2):
        shape = KVShape(layers, kv_heads, head_dim, torch.float32)
        pages = [-(-c // page_size) for c in ctx_lens]
        num_frames = sum(pages) + 8
        self.pool = torch.empty(num_frames, shape.bytes_per_token * page_size, dtype=torch.uint8)
        self.pool.view(torch.float32).normal_()
        self.k_cache, self.v_cache = KVView(self.pool, shape).layer(0)
        order = torch.randperm(num_frames).to(torch.int32)
        self.page_table = torch.zeros(len(ctx_lens), max(pages), dtype=torch.int32)
        at = 0
        for s, n in enumerate(pages):
            self.page_table[s, :n] = order[at:at + n]
            at += n
        self.query_start = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        self.context_lens = torch.tensor(ctx_lens, dtype=torch.int32)
        self.q = torch.randn(int(self.query_start[-1]), heads, head_dim)
        self.out = torch.empty_like(self.q)
        self.scale = head_dim ** -0.5
        self.kv_heads, self.group = kv_heads, heads // kv_heads
        # The same context, contiguous per sequence: (1, kv_heads, ctx, head_dim).
        self.k_contig, self.v_contig = ([
            reference.gather_context(cache, self.page_table[s], c).transpose(0, 1)[None].contiguous()
            for s, c in enumerate(ctx_lens)] for cache in (self.k_cache, self.v_cache))

    @property
    def kv_bytes(self):
        return int(self.context_lens.sum()) * self.kv_heads * self.q.shape[2] * 4 * 2

    def c_kernel(self):
        return ops.paged_attention(self.q, self.k_cache, self.v_cache, self.page_table, self.query_start,
                                   self.context_lens, self.scale, self.out)

    def _mask(self, s, q_len, ctx):
        q_pos = torch.arange(ctx - q_len, ctx)[:, None]
        return torch.arange(ctx)[None, :] <= q_pos

    def gather_sdpa_loop(self):
        """Twin, per sequence: gather its pages (index_select), then SDPA."""
        qs, ctx = self.query_start.tolist(), self.context_lens.tolist()
        for s, c in enumerate(ctx):
            k = reference.gather_context(self.k_cache, self.page_table[s], c).transpose(0, 1)[None]
            v = reference.gather_context(self.v_cache, self.page_table[s], c).transpose(0, 1)[None]
            q = self.q[qs[s]:qs[s + 1]].transpose(0, 1)[None]
            mask = None if q.shape[2] == 1 else self._mask(s, q.shape[2], c)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
            self.out[qs[s]:qs[s + 1]] = o[0].transpose(0, 1)

    def gather_sdpa_padded(self):
        """Twin for decode, batched: gather every page table at once, one masked SDPA."""
        b, p = self.page_table.shape
        ps = self.k_cache.shape[1]
        k = self.k_cache[self.page_table.long()].reshape(b, p * ps, self.kv_heads, -1).transpose(1, 2)
        v = self.v_cache[self.page_table.long()].reshape(b, p * ps, self.kv_heads, -1).transpose(1, 2)
        mask = (torch.arange(p * ps)[None, :] < self.context_lens[:, None])[:, None, None, :]
        o = F.scaled_dot_product_attention(self.q[:, :, None], k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        self.out.copy_(o[:, :, 0])

    def contiguous_sdpa(self):
        """SDPA over a cache that is already contiguous per sequence: no paging at all."""
        qs = self.query_start.tolist()
        for s, (k, v) in enumerate(zip(self.k_contig, self.v_contig)):
            q = self.q[qs[s]:qs[s + 1]].transpose(0, 1)[None]
            mask = None if q.shape[2] == 1 else self._mask(s, q.shape[2], k.shape[2])
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
            self.out[qs[s]:qs[s + 1]] = o[0].transpose(0, 1)


def check_close(batch):
    batch.c_kernel()
    got = batch.out.clone()
    batch.contiguous_sdpa()
    err = ((got - batch.out).abs().max() / batch.out.abs().max()).item()
    assert err < 1e-4, f"C kernel and SDPA disagree: relative error {err:.2e}"


def row(name, ms, note=""):
    print(f"  {name:<44} {ms * 1e3:9.2f} ms  {note}")


def bench_decode(repeats, ctx_lens, title):
    b = PagedBatch([1] * len(ctx_lens), ctx_lens, 9, 3, 64, 16)
    check_close(b)
    probe_bytes, probe = bandwidth_probe()
    t = race({"c": b.c_kernel, "loop": b.gather_sdpa_loop, "padded": b.gather_sdpa_padded,
              "contig": b.contiguous_sdpa, "probe": probe}, repeats)
    bandwidth = probe_bytes / t["probe"]
    achieved = b.kv_bytes / t["c"]
    print(f"\n{title}: {len(ctx_lens)} sequences, context {min(ctx_lens)}..{max(ctx_lens)} "
          f"(mean {sum(ctx_lens) / len(ctx_lens):.0f}), 9/3 heads, head 64, page 16, fp32; "
          f"K/V read {b.kv_bytes / 2**20:.0f} MiB")
    row("C paged_attention", t["c"],
        f"{achieved / 1e9:.1f} GB/s = {achieved / bandwidth:.2f} of the read bandwidth ({bandwidth / 1e9:.1f} GB/s)")
    row("twin: gather + SDPA, per sequence", t["loop"])
    row("twin: gather + SDPA, padded batch", t["padded"])
    row("torch SDPA over a contiguous cache", t["contig"])
    twin = min(t["loop"], t["padded"])
    print(f"  C vs gather+SDPA twin (best of two): {twin / t['c']:5.2f}x faster   (target >= 3x)")
    print(f"  C vs contiguous SDPA (price of paging): {t['contig'] / t['c']:5.2f}x   (target >= 0.9x)")


def bench_prefill(repeats, flops_peak):
    chunk, ctx, seqs = 256, 1024, 4
    b = PagedBatch([chunk] * seqs, [ctx] * seqs, 9, 3, 64, 16)
    check_close(b)
    t = race({"c": b.c_kernel, "loop": b.gather_sdpa_loop, "contig": b.contiguous_sdpa}, repeats)
    # Causal work: query i of a chunk attends to ctx - chunk + i + 1 tokens; QK and PV are 2 flops each.
    flops = seqs * 9 * sum(ctx - chunk + i + 1 for i in range(chunk)) * 64 * 4
    print(f"\nchunked prefill: {seqs} sequences x {chunk}-token chunks over {ctx} context, 9/3 heads, head 64")
    row("C paged_attention", t["c"],
        f"{flops / t['c'] / 1e9:.0f} GFLOP/s = {flops / t['c'] / flops_peak:.2f} of torch's fp32 matmul rate")
    row("twin: gather + SDPA, per sequence", t["loop"])
    row("torch SDPA over a contiguous cache", t["contig"])
    print(f"  C vs gather+SDPA twin: {t['loop'] / t['c']:5.2f}x faster;  "
          f"vs contiguous SDPA: {t['contig'] / t['c']:5.2f}x")


def bench_write_kv(repeats, tokens):
    b = PagedBatch([1], [tokens], 9, 3, 64, 16)
    slots = (b.page_table[0].long()[:, None] * 16 + torch.arange(16)).flatten()[:tokens].to(torch.int32)
    k, v = torch.randn(tokens, 3, 64), torch.randn(tokens, 3, 64)
    t = race({"c": lambda: ops.write_kv(b.k_cache, b.v_cache, k, v, slots),
              "twin": lambda: reference.write_kv(b.k_cache, b.v_cache, k, v, slots)}, repeats)
    row(f"C write_kv, {tokens} tokens", t["c"], f"twin {t['twin'] * 1e3:.3f} ms: {t['twin'] / t['c']:.1f}x")


def bench_call_overhead(repeats):
    """A one-sequence decode step of one layer: what a call costs beyond its arithmetic."""
    b = PagedBatch([1], [16], 9, 3, 64, 16)
    t = race({"c": b.c_kernel}, repeats * 50)
    row("C paged_attention, 1 sequence x 16 tokens", t["c"], "(per-call cost: checks, cffi, dispatch)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("KVOS_THREADS", "2")))
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process's CPU clock, not the wall clock: with --threads 1, "
                             "comparisons that hold while other jobs share the machine")
    args = parser.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    ops.set_num_threads(args.threads)
    torch.manual_seed(0)
    flops_peak = matmul_flops()
    print(f"kvos bench-ops: {args.threads} threads, torch {torch.__version__}, median of {args.repeats} "
          f"interleaved rounds of {'CPU' if args.cpu_time else 'wall'} time; "
          f"fp32 matmul {flops_peak / 1e9:.0f} GFLOP/s (2048^3); load average {os.getloadavg()[0]:.1f}")
    gen = torch.Generator().manual_seed(1)
    ragged = torch.randint(512, 2049, (64,), generator=gen).tolist()
    bench_decode(args.repeats, ragged, "decode, ragged")
    bench_decode(args.repeats, [1280] * 64, "decode, equal lengths")
    bench_prefill(args.repeats, flops_peak)
    print("\nwrite_kv (SmolLM2 layer: 3 kv heads, head 64, page 16, fp32) and per-call cost")
    bench_write_kv(args.repeats * 5, 64)
    bench_write_kv(args.repeats * 5, 1024)
    bench_call_overhead(args.repeats)


if __name__ == "__main__":
    main()
