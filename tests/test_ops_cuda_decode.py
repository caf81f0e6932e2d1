"""Paged decode attention v2 (csrc/cuda/attention_v2.cu, kernel/ops/cuda_decode.py) in the CPU
emulation of CUDA against the torch twin, its argument and shared-memory layouts against the C
structs, its work lists, and the dispatch between v1 and v2. (nvcc -arch=sm_90 compiles it in
test_ops_cuda.py, with every other source.)"""
import ctypes

import numpy as np
import pytest
import torch

from kernel.errors import KvosError
from kernel.ops import cuda, cuda_decode, reference
from tests import test_ops_cuda as base
from tests.test_ops_helpers import fresh_seed, make_batch, relative_error

emulator, emulated = base.emulator, base.emulated   # the fixtures: g++ build of csrc/emu, CuPy stand-in
TOLERANCE = base.TOLERANCE

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_v2(batch, *, chunk=None, with_work=False, fn=None):
    """v2 on a decode batch (or `fn`); the relative error to the twin. Checks that the pool is
    untouched and every output element written."""
    k_cache, v_cache = batch.caches
    out = torch.full_like(batch.q, float("nan"))
    before = batch.snapshot()
    scale = batch.q.shape[2] ** -0.5
    args = (batch.q, k_cache, v_cache, batch.page_table, batch.query_start, batch.context_lens, scale, out, True)
    if fn is not None:
        fn(*args)
    else:
        work = None
        if with_work:
            capacity = batch.page_table.shape[1] * k_cache.shape[1]
            _, chunk, chunks, _ = cuda_decode.plan(batch.q.shape[0], k_cache.shape[2], 1, k_cache.shape[3], 4,
                                                   capacity, k_cache.shape[1], chunk)
            work = torch.from_numpy(cuda_decode.work_list(batch.context_lens.tolist(), chunk, chunks))
        cuda_decode.paged_attention(*args, work=work, chunk=chunk)
    want = reference.paged_attention(batch.q.float(), k_cache.float(), v_cache.float(), batch.page_table,
                                     batch.query_start, batch.context_lens, scale)
    assert torch.equal(batch.pool, before)
    assert not torch.isnan(out).any(), f"unwritten output (seed {batch.seed})"
    return relative_error(out, want)


DECODE_CASES = [   # ctx_lens, heads, kv_heads, head_dim, page_size, chunk
    ([1, 45, 17, 100], 9, 3, 64, 16, None),        # SmolLM2's group; one chunk a row
    ([1, 45, 17, 100], 9, 3, 64, 16, 32),          # several chunks, merged; lengths off the chunk
    ([70, 1, 33], 8, 1, 128, 4, 64),               # LLaMA-2-70B-like 8/1
    ([130, 5], 32, 8, 128, 16, None),              # 32/8: four heads a block, four warps
    ([37, 64, 1], 4, 4, 64, 1, 32),                # no grouping; page size 1
    ([150, 9], 4, 4, 128, 7, 96),                  # page size not dividing the chunk
    ([10, 33], 6, 2, 40, 3, 32),                   # head 40: a ragged last slice of d, 16-byte rows or not
    ([40, 3], 2, 1, 256, 16, None),                # the head-256 instantiation
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"{c[1]}/{c[2]}d{c[3]}ps{c[4]}c{c[5]}")
def test_v2_matches_twin(emulated, dtype, case):
    ctx, heads, kv_heads, head_dim, page_size, chunk = case
    batch = make_batch([1] * len(ctx), ctx, heads, kv_heads, head_dim, page_size, dtype=dtype)
    err = run_v2(batch, chunk=chunk)
    assert err < TOLERANCE[dtype], f"relative error {err:.1e} (seed {batch.seed})"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_v2_with_a_host_work_list(emulated, dtype):
    """The compact list of live items (padding rows of -1 after them) gives what the dense grid gives."""
    batch = make_batch([1] * 4, [90, 1, 33, 64], 9, 3, 64, 16, dtype=dtype, spare_frames=40)
    batch.page_table = torch.cat([batch.page_table, batch.page_table[:, :1].expand(-1, 3)], 1).contiguous()
    err = run_v2(batch, chunk=32, with_work=True)
    assert err < TOLERANCE[dtype], f"relative error {err:.1e} (seed {batch.seed})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_v2_unaligned_rows_and_wide_groups(emulated, dtype):
    """Frames padded by one element (element copies, no cp.async); a group of 16 (two head blocks)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    batch = make_batch([1, 1], [40, 21], 16, 1, 64, 16, dtype=dtype, pad_bytes=itemsize)
    assert batch.caches[0].stride(0) * itemsize % 16
    err = run_v2(batch, chunk=32)
    assert err < TOLERANCE[dtype], f"relative error {err:.1e} (seed {batch.seed})"


def test_v2_follows_causal_rows_of_a_mixed_batch(emulated):
    """v2 is only dispatched for decode, but it is correct on prefill rows too (each row's own length)."""
    batch = make_batch([3, 0, 1], [40, 5, 9], 9, 3, 64, 16)
    err = run_v2(batch, chunk=32)
    assert err < TOLERANCE[torch.float32], f"relative error {err:.1e} (seed {batch.seed})"


def test_dispatch_takes_v2_for_decode_and_v1_otherwise(emulated, monkeypatch):
    taken = []
    real_v2, real_v1 = cuda_decode.paged_attention, cuda.paged_attention_v1
    monkeypatch.setattr(cuda_decode, "paged_attention", lambda *a, **k: taken.append("v2") or real_v2(*a, **k))
    monkeypatch.setattr(cuda, "paged_attention_v1", lambda *a, **k: taken.append("v1") or real_v1(*a, **k))
    for q_lens, want in (([1, 1], "v2"), ([2, 1], "v1")):
        batch = make_batch(q_lens, [20, 7], 9, 3, 64, 16)
        err = run_v2(batch, fn=cuda.paged_attention)
        assert err < TOLERANCE[torch.float32] and taken[-1] == want
    monkeypatch.setattr(cuda, "DECODE_KERNEL", "v1")
    run_v2(make_batch([1, 1], [20, 7], 9, 3, 64, 16), fn=cuda.paged_attention)
    assert taken[-1] == "v1"


def test_v1_still_serves_decode(emulated):
    batch = make_batch([1, 1, 1], [5, 600, 1], 8, 1, 128, 16, dtype=torch.float16)
    err = run_v2(batch, fn=cuda.paged_attention_v1)
    assert err < TOLERANCE[torch.float16], f"relative error {err:.1e} (seed {batch.seed})"


def test_bad_work_list_is_refused_before_launch(emulated):
    batch = make_batch([1, 1], [20, 7], 9, 3, 64, 16)
    k_cache, v_cache = batch.caches
    out = torch.full_like(batch.q, float("nan"))
    args = (batch.q, k_cache, v_cache, batch.page_table, batch.query_start, batch.context_lens, 0.125, out, True)
    for work, chunk in ((torch.zeros(3, 2, dtype=torch.int32), 32), (torch.zeros(2, 2, dtype=torch.int64), 32),
                        (torch.zeros(2, 2, dtype=torch.int32), None)):
        with pytest.raises(KvosError) as e:
            cuda_decode.paged_attention(*args, work=work, chunk=chunk)
        assert e.value.errno == "EINVAL"
        assert torch.isnan(out).all()


def test_attn_v2_args_and_shared_layout_match_the_kernel(emulator):
    offsets = (ctypes.c_size_t * 8)()
    n = emulator.emu_attn_v2_args_layout(offsets)
    dt = cuda_decode.ATTN_V2_ARGS
    assert list(offsets[:n]) == [dt.fields["a"][1], dt.fields["work"][1], dt.itemsize]
    emulator.emu_v2_layout.argtypes = [ctypes.c_int64] * 5 + [ctypes.POINTER(ctypes.c_int64)]
    got = (ctypes.c_int64 * 6)()
    for warps, head_dim, itemsize, chunk, page_size in ((4, 64, 2, 512, 16), (1, 40, 4, 96, 7), (3, 256, 4, 64, 1)):
        emulator.emu_v2_layout(warps, head_dim, itemsize, chunk, page_size, got)
        want = cuda_decode.layout(warps, head_dim, itemsize, chunk, page_size)
        assert list(got) == [want[k] for k in ("frames", "q", "off", "p", "ring", "total")]


def test_work_list_holds_each_live_item_once_longest_rows_first():
    rng = np.random.default_rng(fresh_seed())
    lens = rng.integers(1, 300, size=9)
    chunk, chunks = 32, 10
    items = cuda_decode.work_list(lens, chunk, chunks)
    assert items.shape == (9 * chunks, 2) and items.dtype == np.int32
    live = items[items[:, 0] >= 0]
    want = {(r, c) for r, n in enumerate(lens) for c in range(-(-int(n) // chunk))}
    assert sorted(map(tuple, live.tolist())) == sorted(want)
    assert (items[len(live):] == -1).all()
    firsts = [r for r, c in live.tolist() if c == 0]
    assert [-(-lens[r] // chunk) for r in firsts] == sorted((-(-lens[r] // chunk) for r in firsts), reverse=True)


def test_plan_shrinks_chunks_for_small_batches_and_fits_shared_memory():
    warps, chunk, chunks, smem = cuda_decode.plan(64, 3, 3, 64, 2, 512, 16)   # SmolLM2 64 x 512
    assert chunk < 512 and chunks == -(-512 // chunk) and warps >= 1
    warps, chunk, chunks, smem = cuda_decode.plan(256, 32, 1, 128, 2, 4096, 16)   # LLaMA-7B 256 x 4096
    assert chunk == 512 and chunks == 8 and smem <= cuda_decode.SMEM_BUDGET
    warps, chunk, _, smem = cuda_decode.plan(8, 1, 8, 256, 4, 4096, 16)   # fp32, head 256: one warp's ring
    assert warps == 1 and smem == cuda_decode.layout(1, 256, 4, chunk, 16)["total"]


def test_the_gpu_benchmark_runs_in_emulation(emulated, monkeypatch):
    """benchmarks/gpu_attention.py's correctness section and one table row, on a tiny shape, with the
    CUDA events replaced: a GPU session's minutes are not spent finding a Python error."""
    import importlib
    import sys
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench, gpu_check = importlib.import_module("gpu_attention"), sys.modules["gpu_check"]
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(gpu_check, "event_time", lambda fn: (fn(), 1e-3)[1])
    monkeypatch.setattr(gpu_check, "FAILURES", [])
    monkeypatch.setattr(bench, "FAILURES", gpu_check.FAILURES)
    monkeypatch.setattr(bench, "CORRECTNESS_SHAPES", [(9, 3, 64)])
    monkeypatch.setitem(bench.SHAPES, "tiny", (9, 3, 64, 3, 200))
    assert bench.parse_args(["--shapes", "tiny", "--variant", "w2=warps:2,chunk:64"]).variants == [
        ("w2", {"warps": 2, "chunk": 64})]
    bench.check_v2(torch.device("cpu"), torch.float16, torch.Generator().manual_seed(fresh_seed()))
    results, kv_bytes = bench.time_shape(torch.device("cpu"), torch.float16, "tiny", 16,
                                         [bench.Variant("w2", warps=2, chunk=64)], False, torch.Generator())
    assert set(results) == {"SDPA contiguous", "v1", "v2", "v2 +work", "v2 w2"}
    assert kv_bytes == 2 * 3 * 200 * 3 * 64 * 2
    assert not gpu_check.FAILURES, gpu_check.FAILURES


def test_the_emulator_defers_cp_async_copies_to_their_wait(emulator):  # noqa: F811
    """The model the v2 tests rely on: a stage read before its wait holds stale bytes (NaN), one read
    after it holds the copy, and a thread that never waits is reported (5)."""
    src = np.arange(4 * 8, dtype=np.float32)

    def probe(wait_first, wait_last):
        out = np.zeros(8, dtype=np.float32)
        values = [np.array(out.ctypes.data, dtype=np.uint64), np.array(src.ctypes.data, dtype=np.uint64),
                  np.array(wait_first, dtype=np.int32), np.array(wait_last, dtype=np.int32)]
        params = (ctypes.c_void_p * 4)(*[v.ctypes.data for v in values])
        return emulator.emu_launch(b"emu_probe_cp_async", 1, 1, 1, 8, 4 * 4 * 8, params), out

    rc, out = probe(1, 1)
    assert rc == 0 and out.tolist() == src[::4].tolist()
    rc, out = probe(0, 1)
    assert rc == 0 and np.isnan(out).all()
    rc, _ = probe(0, 0)
    assert rc == 5
