"""GPU check of the MMU kernels (make gpu-check; or `PYTHONPATH=. python3 benchmarks/gpu_check.py`).

In one go, on a machine with a CUDA GPU and CuPy: compile csrc/cuda, compare every CUDA op
with its torch twin (fp32, fp16, bf16; several shapes; poisoned outputs), check that bad
arguments are refused before memory is touched, then time paged attention against torch
SDPA over a contiguous cache with CUDA events and print a table. Needs neither cffi nor
the C extension. `--device cpu` runs the same comparisons on the C kernels (a dry run).
Exit status 1 if any check failed. Sized to finish in about a minute on an H200.
"""
import argparse
import importlib
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def import_ops():
    """kernel.ops, even where kernel/__init__.py pulls in packages this machine lacks."""
    try:
        return importlib.import_module("kernel.ops")
    except Exception as e:   # noqa: BLE001  (whatever kernel/__init__.py needs, kernel/ops must not)
        print(f"note: `import kernel` failed ({e}); loading kernel/ops without kernel/__init__.py")
        for name in [m for m in sys.modules if m == "kernel" or m.startswith("kernel.")]:
            del sys.modules[name]
        package = types.ModuleType("kernel")
        package.__path__ = [str(ROOT / "kernel")]
        sys.modules["kernel"] = package
        return importlib.import_module("kernel.ops")


ops = import_ops()
from kernel.errors import KvosError  # noqa: E402
from kernel.kvcache import KVShape, KVView  # noqa: E402
from kernel.ops import reference  # noqa: E402

FAILURES = []
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def section(title, fn, *args):
    print(f"\n== {title}", flush=True)
    t0 = time.perf_counter()
    try:
        fn(*args)
    except Exception:
        FAILURES.append(title)
        traceback.print_exc()
    print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)


def check(name, ok, detail=""):
    print(f"   {'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


class Tenants:
    """A pool whose frames hold random bytes (other tenants, other layers) around our K/V."""

    def __init__(self, device, dtype, kv_heads, head_dim, page_size, num_frames, pad_bytes=0):
        shape = KVShape(2, kv_heads, head_dim, dtype)
        frame_bytes = shape.bytes_per_token * page_size + pad_bytes
        self.pool = torch.randint(0, 256, (num_frames, frame_bytes), dtype=torch.uint8, device=device)
        self.view = KVView(self.pool, shape)
        assert self.view.page_size == page_size
        self.k_cache, self.v_cache = self.view.layer(1)
        for cache in (self.k_cache, self.v_cache):   # real values where we read, not random bits
            cache.copy_(torch.randn(cache.shape, device=device).to(dtype))


def make_batch(device, q_lens, ctx_lens, heads, kv_heads, head_dim, page_size, dtype, gen):
    pages = [-(-c // page_size) for c in ctx_lens]
    num_frames = 2 * sum(pages) + 3
    # An odd head size also pads the frame, so that rows are not 16-byte aligned.
    itemsize = torch.empty((), dtype=dtype).element_size()
    ten = Tenants(device, dtype, kv_heads, head_dim, page_size, num_frames, pad_bytes=itemsize if head_dim % 16 else 0)
    ours = torch.randperm(num_frames, generator=gen)[:sum(pages)]    # the rest: other tenants' frames
    table = torch.zeros(len(ctx_lens), max(pages), dtype=torch.int32)
    at = 0
    for s, n in enumerate(pages):
        table[s, :n] = ours[at:at + n]
        at += n
    query_start = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(query_start[-1]), heads, head_dim, generator=gen).to(dtype)
    return (ten, q.to(device), table.to(device), query_start.to(device),
            torch.tensor(ctx_lens, dtype=torch.int32, device=device))


def compare_attention(device, dtype, gen):
    cases = [  # (q_lens, ctx_lens, heads, kv_heads, head_dim, page_size)
        ([1] * 8, [37, 600, 1, 16, 1100, 257, 64, 999], 9, 3, 64, 16),       # decode, SmolLM2, several partitions
        ([5, 1, 64, 1], [5, 300, 700, 2], 8, 1, 128, 16),                    # mixed prefill + decode, 8/1
        ([1, 3, 17], [40, 3, 530], 4, 4, 128, 1),                            # page size 1
        ([2, 1], [600, 1500], 32, 32, 128, 256),                             # LLaMA-7B shape, page 256
        ([3, 1, 0, 2], [10, 50, 7, 2], 6, 2, 40, 3),                          # odd head size, unaligned rows
    ]
    for q_lens, ctx_lens, heads, kv_heads, head_dim, page_size in cases:
        ten, q, table, qs, cl = make_batch(device, q_lens, ctx_lens, heads, kv_heads, head_dim, page_size, dtype, gen)
        before = ten.pool.clone()
        out = torch.full_like(q, float("nan"))
        ops.paged_attention(q, ten.k_cache, ten.v_cache, table, qs, cl, head_dim ** -0.5, out)
        want = reference.paged_attention(q.float(), ten.k_cache.float(), ten.v_cache.float(), table, qs, cl,
                                         head_dim ** -0.5)
        err = ((out.float() - want).abs().max() / want.abs().max()).item()
        name = (f"paged_attention {str(dtype)[6:]} q={q_lens[:4]} ctx<={max(ctx_lens)} {heads}/{kv_heads} "
                f"d={head_dim} ps={page_size}")
        check(name, not torch.isnan(out).any().item() and err < TOLERANCE[dtype], f"rel err {err:.1e}")
        check("   pool unchanged by attention", torch.equal(before, ten.pool))


def compare_memory_ops(device, dtype, gen):
    ten, q, table, qs, cl = make_batch(device, [1] * 4, [20, 40, 3, 64], 3, 3, 64, 16, dtype, gen)
    num_frames, page_size = ten.k_cache.shape[:2]
    tokens = 50
    slots = torch.randperm(num_frames * page_size, generator=gen)[:tokens].to(torch.int32).to(device)
    k = torch.randn(tokens, 3, 64, generator=gen).to(dtype).to(device)
    v = torch.randn(tokens, 3, 64, generator=gen).to(dtype).to(device)
    twin_pool = ten.pool.clone()
    twin = KVView(twin_pool, ten.view.shape).layer(1)
    ops.write_kv(ten.k_cache, ten.v_cache, k, v, slots)
    reference.write_kv(twin[0], twin[1], k, v, slots)
    check(f"write_kv {str(dtype)[6:]} (other layer and tenants untouched)", torch.equal(ten.pool, twin_pool))

    pool = ten.pool
    frames = torch.randperm(pool.shape[0], generator=gen)[:6].to(torch.int32)
    src, dst = frames[:3], frames[3:]
    want = pool.clone()
    reference.copy_frames(want, src, dst)
    ops.copy_frames(pool, src, dst)
    check("copy_frames", torch.equal(pool, want))

    pin = device.type == "cuda"
    swap = torch.full((8, pool.shape[1]), 7, dtype=torch.uint8, pin_memory=pin)
    swap_want = swap.clone()
    slots = torch.tensor([5, 0, 2], dtype=torch.int32)
    reference.swap_out(pool, swap_want, src, slots)
    ops.swap_out(pool, swap, src, slots)
    if pin:
        torch.cuda.synchronize()
    check("swap_out", torch.equal(swap, swap_want))
    swap[slots.long()] = torch.randint(0, 256, (3, pool.shape[1]), dtype=torch.uint8)
    want = pool.clone()
    reference.swap_in(swap, want, slots, dst)
    ops.swap_in(swap, pool, slots, dst)
    check("swap_in", torch.equal(pool, want))


def check_refusals(device, gen):
    ten, q, table, qs, cl = make_batch(device, [1, 1], [20, 40], 3, 3, 64, 16, torch.float32, gen)
    before = ten.pool.clone()
    k = torch.randn(2, 3, 64, device=device)
    cases = {
        "slot outside the pool": lambda: ops.write_kv(
            ten.k_cache, ten.v_cache, k, k, torch.tensor([0, 10**6], dtype=torch.int32, device=device)),
        "page-table entry out of range": lambda: ops.paged_attention(
            q, ten.k_cache, ten.v_cache, table.masked_fill(table == table[1, 0], 10**6), qs, cl, 0.125),
        "context shorter than q_len": lambda: ops.paged_attention(
            q, ten.k_cache, ten.v_cache, table, qs, cl * 0, 0.125),
        "wrong dtype": lambda: ops.write_kv(ten.k_cache, ten.v_cache, k.double(), k.double(),
                                            torch.tensor([0, 1], dtype=torch.int32, device=device)),
        "repeated destination frame": lambda: ops.copy_frames(
            ten.pool, torch.tensor([1, 2], dtype=torch.int32), torch.tensor([3, 3], dtype=torch.int32)),
    }
    for name, call in cases.items():
        try:
            call()
            check(f"refuses {name}", False, "(no error)")
        except KvosError as e:
            check(f"refuses {name}", e.errno == "EINVAL" and torch.equal(before, ten.pool), f"-> {e.reason}")


def event_time(fn, repeats=10, calls=10):
    """Median GPU time of one call. A spin kernel first fills the queue, so the calls run
    back to back on the GPU and the events measure the device, not Python's launch rate."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(20_000_000)   # ~10 ms at 2 GHz: longer than enqueuing the calls
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def host_time(fn, calls=50):
    """Wall time per call including Python, validation and launch, GPU synchronised."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls


def copy_bandwidth(device):
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / event_time(lambda: y.copy_(x))


def decode_row(device, dtype, heads, kv_heads, head_dim, batch, ctx, page_size=16):
    """kvos over shuffled pages against SDPA over the same context made contiguous."""
    pages = ctx // page_size
    num_frames = batch * pages
    k_cache = torch.randn(num_frames, page_size, kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(num_frames, device=device).to(torch.int32).view(batch, pages)
    qs = torch.arange(batch + 1, dtype=torch.int32, device=device)
    cl = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)
    out = torch.empty_like(q)
    # The same context, contiguous: (batch, kv_heads, ctx, head_dim).
    k_contig = k_cache[table.long()].reshape(batch, ctx, kv_heads, head_dim).transpose(1, 2).contiguous()
    v_contig = v_cache[table.long()].reshape(batch, ctx, kv_heads, head_dim).transpose(1, 2).contiguous()
    q4, scale, gqa = q[:, :, None], head_dim ** -0.5, heads != kv_heads

    def kvos():
        ops.paged_attention(q, k_cache, v_cache, table, qs, cl, scale, out, check=False)

    def sdpa():
        return F.scaled_dot_product_attention(q4, k_contig, v_contig, scale=scale, enable_gqa=gqa)

    t_kvos, t_sdpa = event_time(kvos), event_time(sdpa)
    t_call = host_time(lambda: ops.paged_attention(q, k_cache, v_cache, table, qs, cl, scale, out))
    want = sdpa()[:, :, 0].float()
    err = ((out.float() - want).abs().max() / want.abs().max()).item()
    kv_bytes = 2 * batch * ctx * kv_heads * head_dim * k_cache.element_size()
    return t_kvos, t_sdpa, kv_bytes / t_kvos, t_call, err


def time_decode(device, dtype, gen):
    bandwidth = copy_bandwidth(device)
    print(f"   device copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s")
    rows = []
    for name, heads, kv_heads, head_dim in (("SmolLM2 9/3/64", 9, 3, 64), ("LLaMA-7B 32/32/128", 32, 32, 128)):
        for batch, ctx in ((64, 512), (64, 4096), (256, 512), (256, 4096)):
            t_kvos, t_sdpa, rate, t_call, err = decode_row(device, dtype, heads, kv_heads, head_dim, batch, ctx)
            check(f"   {name} b={batch} ctx={ctx} matches SDPA", err < TOLERANCE[dtype], f"rel err {err:.1e}")
            rows.append((name, batch, ctx, t_kvos, t_sdpa, rate, t_call))
            torch.cuda.empty_cache()
    print("\n   GPU times per call (CUDA events); 'call' = wall time of one checked call, Python included")
    print(f"   {'shape':<20}{'batch':>6}{'ctx':>6}  {'kvos ms':>8}  {'SDPA ms':>8}  {'SDPA/kvos':>9}  {'kvos TB/s':>9}"
          f"  {'call ms':>8}")
    for name, batch, ctx, t_kvos, t_sdpa, rate, t_call in rows:
        print(f"   {name:<20}{batch:>6}{ctx:>6}  {t_kvos * 1e3:8.3f}  {t_sdpa * 1e3:8.3f}  {t_sdpa / t_kvos:9.2f}"
              f"  {rate / 1e12:9.2f}  {t_call * 1e3:8.3f}")


def time_prefill(device, dtype, gen):
    seqs, chunk, ctx, heads, kv_heads, head_dim = 4, 256, 1024, 32, 32, 128
    ten, q, table, qs, cl = make_batch(device, [chunk] * seqs, [ctx] * seqs, heads, kv_heads, head_dim, 16, dtype, gen)
    out = torch.empty_like(q)
    t = event_time(lambda: ops.paged_attention(q, ten.k_cache, ten.v_cache, table, qs, cl, 0.088, out, check=False))
    flops = 4 * seqs * heads * head_dim * sum(ctx - chunk + i + 1 for i in range(chunk))
    print(f"   chunked prefill {seqs} x {chunk} over {ctx}, 32/32/128 {str(dtype)[6:]}: {t * 1e3:.3f} ms, "
          f"{flops / t / 1e12:.1f} TFLOP/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA GPU visible to torch: nothing to check")
            return 1
        import cupy
        print(f"GPU {torch.cuda.get_device_name(device)}, cupy {cupy.__version__}, "
              f"CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}")
        from kernel.ops import cuda as cuda_ops

        def build():
            for name in ("attention.cu", "attention_v2.cu", "write_kv.cu", "frames.cu", "fused.cu"):
                t0 = time.perf_counter()
                cuda_ops.kernels.module(name)
                print(f"   compiled {name} in {time.perf_counter() - t0:.1f} s")
        section("build (CuPy RawModule, NVRTC)", build)
    gen = torch.Generator().manual_seed(int(time.time()))
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device.type == "cuda" else [])
    for dtype in dtypes:
        section(f"paged_attention vs twin, {dtype}", compare_attention, device, dtype, gen)
        section(f"write_kv, copy_frames, swap vs twins, {dtype}", compare_memory_ops, device, dtype, gen)
    section("bad arguments are refused before memory is touched", check_refusals, device, gen)
    if device.type == "cuda":
        section("decode timing: kvos paged attention vs SDPA over a contiguous cache (fp16)",
                time_decode, device, torch.float16, gen)
        section("chunked prefill timing", time_prefill, device, torch.float16, gen)
    print(f"\n{'FAILED: ' + ', '.join(FAILURES) if FAILURES else 'all checks passed'}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
