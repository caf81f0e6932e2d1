"""Paged decode attention on a GPU: v1, v2, SDPA, FlexAttention (python3 benchmarks/gpu_attention.py).

One run, correctness first: v2 against the torch twin in fp32, fp16 and bf16 on ragged batches
(GQA 9/3, 8/1, 32/8, 4/4; heads 64 and 128; context lengths 1 and off the page and chunk sizes;
shuffled pages among another tenant's frames; several chunk sizes; with and without a host work
list). Then one table per shape (LLaMA-7B 32/32/128 at 64 x 4096 and 256 x 4096, SmolLM2 9/3/64
at 256 x 4096, both at 64 x 512): GPU time (CUDA events behind a spin kernel), K/V read
bandwidth in GB/s and as a share of a device-to-device copy timed in the same run, for v1, v2
(dense grid, and with a host-built work list), v2 variants (--variant), SDPA over the same
context made contiguous, and torch's FlexAttention paged path (compiled; its own 128-token pages
over the same memory; --flex-shapes) where this torch has it. Every timed kernel's output is compared first.
Exit status 1 if any check failed. --cpu-dry-run (no GPU): the argument parsing and the
FlexAttention paged construction in eager mode on tiny CPU tensors, against SDPA.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check  # noqa: E402  (imports kernel.ops, even without the C extension)
from gpu_check import FAILURES, TOLERANCE, check, section  # noqa: E402

from kernel.ops import cuda as cuda_ops  # noqa: E402
from kernel.ops import cuda_decode, reference  # noqa: E402

SHAPES = {   # name: (heads, kv_heads, head_dim, batch, ctx); small ones first: a time limit cuts the big ones
    "smollm2-64x512": (9, 3, 64, 64, 512),
    "llama7b-64x512": (32, 32, 128, 64, 512),
    "llama7b-64x4096": (32, 32, 128, 64, 4096),
    "llama7b-256x4096": (32, 32, 128, 256, 4096),
    "smollm2-256x4096": (9, 3, 64, 256, 4096),
}
FLEX_PAGE = 128   # FlexAttention's page = its block mask's KV block; 16-token blocks are below its tiles


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=stages:3,warps:2,chunk:256: another v2 build or plan, timed beside the shipped one")
    ap.add_argument("--flex-shapes", default="llama7b-256x4096,smollm2-256x4096",
                    help="shapes that also time FlexAttention's paged path (each compile takes ~30-60 s); '' for none")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--cpu-dry-run", action="store_true", help="no GPU: check arguments and the Flex path on the CPU")
    args = ap.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in args.shapes if s not in SHAPES]
    args.flex_shapes = [s for s in args.flex_shapes.split(",") if s]
    unknown += [s for s in args.flex_shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}")
    args.variants = [parse_variant(v, ap) for v in args.variant]
    return args


def parse_variant(spec, ap):
    name, _, rest = spec.partition("=")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition(":")
        if key not in ("stages", "warps", "chunk") or not value.isdigit():
            ap.error(f"variant {spec!r}: options are stages:N, warps:N, chunk:N")
        opts[key] = int(value)
    return name, opts


class Variant:
    """A v2 build (-DV2_STAGES) and plan (warps, chunk) of its own: its own compiled modules."""

    def __init__(self, name, stages=None, warps=None, chunk=None):
        self.name, self.stages, self.warps, self.chunk = name, stages, warps, chunk
        self.kernels = cuda_ops._Kernels()
        if stages:
            plain = cuda_ops._Kernels.source

            def source(kernels, file):
                code, options = plain(kernels, file)
                if file != "attention_v2.cu":
                    return code, options
                return f"// V2_STAGES={stages}\n{code}", options + (f"-DV2_STAGES={stages}",)
            self.kernels.source = source.__get__(self.kernels)

    def __call__(self, *args, work=None, chunk=None):
        saved = cuda_ops.kernels, cuda_decode.STAGES, cuda_decode.WARPS_MAX
        cuda_ops.kernels = self.kernels
        cuda_decode.STAGES = self.stages or saved[1]
        cuda_decode.WARPS_MAX = self.warps or saved[2]
        try:
            return cuda_decode.paged_attention(*args, work=work, chunk=chunk or self.chunk)
        finally:
            cuda_ops.kernels, cuda_decode.STAGES, cuda_decode.WARPS_MAX = saved


def host_work(q, k_cache, page_table, context_lens, chunk=None):
    """A host-built work list (what a batch builder holding the lengths would pass) and its chunk."""
    _, page_size, kv_heads, head_dim = k_cache.shape
    sms = cuda_decode._sm_count(q.device.index if q.device.type == "cuda" else None)
    _, chunk, chunks, _ = cuda_decode.plan(q.shape[0], kv_heads, q.shape[1] // kv_heads, head_dim,
                                           k_cache.element_size(), page_table.shape[1] * page_size, page_size,
                                           chunk, sms)
    items = cuda_decode.work_list(context_lens.tolist(), chunk, chunks)
    return torch.from_numpy(items).to(q.device), chunk


# ---- correctness ----

CORRECTNESS_SHAPES = [(9, 3, 64), (8, 1, 128), (32, 8, 128), (4, 4, 64), (4, 4, 128)]


def check_v2(device, dtype, gen):
    for heads, kv_heads, head_dim in CORRECTNESS_SHAPES:
        ctx = [1, 17, 300, 1000, 2049, 4100]
        ten, q, table, qs, cl = gpu_check.make_batch(device, [1] * len(ctx), ctx, heads, kv_heads, head_dim, 16,
                                                     dtype, gen)
        scale = head_dim ** -0.5
        want = reference.paged_attention(q.float(), ten.k_cache.float(), ten.v_cache.float(), table, qs, cl, scale)
        for chunk, with_work in ((None, False), (None, True), (64, False), (96, True), (512, False)):
            out = torch.full_like(q, float("nan"))
            before = ten.pool.clone()
            work, used = host_work(q, ten.k_cache, table, cl, chunk) if with_work else (None, chunk)
            cuda_decode.paged_attention(q, ten.k_cache, ten.v_cache, table, qs, cl, scale, out, True,
                                        work=work, chunk=used)
            torch.cuda.synchronize()
            err = ((out.float() - want).abs().max() / want.abs().max()).item()
            ok = err < TOLERANCE[dtype] and torch.equal(before, ten.pool) and not out.isnan().any()
            check(f"v2 {heads}/{kv_heads}/{head_dim} chunk={chunk or 'auto'}{' +work' if with_work else ''}", ok,
                  f"rel err {err:.1e}")


# ---- timing ----

def flex_paged(k_cache, v_cache, q, batch, ctx, scale, gen, compile_it=True):
    """torch's FlexAttention paged path over the same pool memory read as 128-token pages, with a
    shuffled page table of its own. Returns (run, reference output of the first rows, rows)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    device = q.device
    frames, page_size, kv_heads, head_dim = k_cache.shape
    heads = q.shape[1]
    n_pages = frames * page_size // FLEX_PAGE
    per_seq = -(-ctx // FLEX_PAGE)
    kf = k_cache.reshape(1, n_pages * FLEX_PAGE, kv_heads, head_dim).transpose(1, 2)   # a view: (1, H, N, D)
    vf = v_cache.reshape(1, n_pages * FLEX_PAGE, kv_heads, head_dim).transpose(1, 2)
    table = torch.randperm(n_pages, generator=gen)[:batch * per_seq].view(batch, per_seq).to(device)
    paged = PagedAttention(n_pages, FLEX_PAGE, batch, device=str(device))
    paged.page_table[:, :per_seq] = table
    paged.physical_to_logical.scatter_(1, table.long(), torch.arange(per_seq, device=device).expand(batch, -1).clone())
    logical = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx >= 0, batch, None, 1, ctx, device=str(device),
                                BLOCK_SIZE=FLEX_PAGE)
    block_mask = paged.convert_logical_block_mask(logical, kv_len=torch.full((batch,), ctx, device=device))
    score_mod = paged.get_score_mod(None, kv_len=torch.full((batch,), ctx, device=device))
    attend = torch.compile(flex_attention, dynamic=False) if compile_it else flex_attention
    q4 = q.view(batch, heads, 1, head_dim)

    def run():
        return attend(q4, kf, vf, block_mask=block_mask, score_mod=score_mod, scale=scale, enable_gqa=True)

    rows = min(4, batch)
    want = []
    for b in range(rows):
        pos = (table[b].long()[:, None] * FLEX_PAGE + torch.arange(FLEX_PAGE, device=device)).flatten()[:ctx]
        k, v = kf[0][:, pos][None], vf[0][:, pos][None]
        want.append(F.scaled_dot_product_attention(q4[b:b + 1].float(), k.float(), v.float(), scale=scale,
                                                   enable_gqa=heads != kv_heads))
    return run, torch.cat(want)[:, :, 0], rows


def time_shape(device, dtype, name, page_size, variants, flex, gen):
    heads, kv_heads, head_dim, batch, ctx = SHAPES[name]
    pages = -(-ctx // page_size)
    frames = batch * pages
    frames += -frames % (FLEX_PAGE // page_size) if FLEX_PAGE % page_size == 0 else 0
    k_cache = torch.randn(frames, page_size, kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(frames, device=device)[:batch * pages].to(torch.int32).view(batch, pages)
    qs = torch.arange(batch + 1, dtype=torch.int32, device=device)
    cl = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)
    scale, kv_bytes = head_dim ** -0.5, 2 * batch * ctx * kv_heads * head_dim * k_cache.element_size()
    args = (q, k_cache, v_cache, table, qs, cl, scale)
    work, work_chunk = host_work(q, k_cache, table, cl)

    # The reference: SDPA over the context made contiguous (then freed: 256 x 4096 is 17 GB a copy).
    contig = {name: cache[table.long()].reshape(batch, -1, kv_heads, head_dim)[:, :ctx].transpose(1, 2).contiguous()
              for name, cache in (("k", k_cache), ("v", v_cache))}
    q4, gqa = q[:, :, None], heads != kv_heads

    def sdpa():
        return F.scaled_dot_product_attention(q4, contig["k"], contig["v"], scale=scale, enable_gqa=gqa)
    want = sdpa()[:, :, 0].float()
    results = {"SDPA contiguous": gpu_check.event_time(sdpa)}
    contig.clear()
    torch.cuda.empty_cache()

    contenders = {
        "v1": lambda out: cuda_ops.paged_attention_v1(*args, out, False),
        "v2": lambda out: cuda_decode.paged_attention(*args, out, False),
        "v2 +work": lambda out: cuda_decode.paged_attention(*args, out, False, work=work, chunk=work_chunk),
    }
    for variant in variants:
        contenders[f"v2 {variant.name}"] = lambda out, variant=variant: variant(*args, out, False)
    for label, fn in contenders.items():
        out = torch.full_like(q, float("nan"))
        fn(out)
        torch.cuda.synchronize()
        err = ((out.float() - want).abs().max() / want.abs().max()).item()
        check(f"{name} {label} matches SDPA", err < TOLERANCE[dtype], f"rel err {err:.1e}")
        results[label] = gpu_check.event_time(lambda fn=fn, out=out: fn(out))
    if flex:
        try:
            t0 = time.perf_counter()
            run, flex_want, rows = flex_paged(k_cache, v_cache, q, batch, ctx, scale,
                                              torch.Generator().manual_seed(1))
            got = run()[:rows, :, 0].float()
            err = ((got - flex_want).abs().max() / flex_want.abs().max()).item()
            check(f"{name} FlexAttention paged matches SDPA (first {rows} rows; compiled in "
                  f"{time.perf_counter() - t0:.0f} s)", err < TOLERANCE[dtype], f"rel err {err:.1e}")
            results[f"Flex paged ({FLEX_PAGE})"] = gpu_check.event_time(run)
        except Exception as e:   # noqa: BLE001  (an older or newer torch without this path: say so, go on)
            print(f"   FlexAttention paged: unavailable here ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    del k_cache, v_cache
    torch.cuda.empty_cache()
    return results, kv_bytes


def print_table(name, results, kv_bytes, copy_rate):
    sdpa, v1 = results.get("SDPA contiguous"), results.get("v1")
    print(f"\n   {name} ({kv_bytes / 2**20:.0f} MiB of K/V)")
    print(f"   {'kernel':<20}{'ms':>9}{'GB/s':>9}{'% copy':>8}{'% SDPA':>8}{'v1 / it':>8}")
    for label, t in results.items():
        rate = kv_bytes / t
        print(f"   {label:<20}{t * 1e3:9.3f}{rate / 1e9:9.0f}{100 * rate / copy_rate:8.1f}"
              f"{100 * sdpa / t if sdpa else math.nan:8.1f}{v1 / t if v1 else math.nan:8.2f}")


def cpu_dry_run(args):
    """What can be checked without a GPU: the arguments, and the Flex paged construction (eager)."""
    print(f"shapes {args.shapes}, dtype {args.dtype}, variants {[v[0] for v in args.variants]}")
    gen = torch.Generator().manual_seed(0)
    batch, ctx, heads, kv_heads, head_dim = 3, 300, 4, 2, 16
    frames = batch * -(-ctx // 16) + 8
    frames += -frames % (FLEX_PAGE // 16)
    k_cache = torch.randn(frames, 16, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(frames, 16, kv_heads, head_dim, generator=gen)
    q = torch.randn(batch, heads, head_dim, generator=gen)
    run, want, rows = flex_paged(k_cache, v_cache, q, batch, ctx, head_dim ** -0.5, gen, compile_it=False)
    err = ((run()[:rows, :, 0].float() - want).abs().max() / want.abs().max()).item()
    check("FlexAttention paged (eager, CPU) matches SDPA over its gathered pages", err < 1e-4, f"rel err {err:.1e}")
    return 1 if FAILURES else 0


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_dry_run:
        return cpu_dry_run(args)
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch (--cpu-dry-run checks what can be checked without one)")
        return 1
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(int(time.time()))
    print(f"GPU {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    section("build attention.cu and attention_v2.cu (NVRTC)",
            lambda: [cuda_ops.kernels.module(f) for f in ("attention.cu", "attention_v2.cu")])
    if not args.skip_correctness:
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            section(f"v2 against the twin, {dt}", check_v2, device, dt, gen)
    variants = [Variant(name, **opts) for name, opts in args.variants]
    copy_rate = gpu_check.copy_bandwidth(device)
    print(f"\n   device-to-device copy: {copy_rate / 1e9:.0f} GB/s (read + write)")
    for name in args.shapes:
        holder = {}

        def measure(name=name, holder=holder):
            flex = name in args.flex_shapes
            holder["results"], holder["bytes"] = time_shape(device, dtype, name, args.page_size, variants, flex, gen)
        section(f"{name}, {args.dtype}", measure)
        if holder:
            print_table(name, holder["results"], holder["bytes"], copy_rate)
    print(f"\n{'FAILED: ' + ', '.join(FAILURES) if FAILURES else 'all checks passed'}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
