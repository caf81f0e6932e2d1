"""The CUDA kernels: they compile for sm_90, compute what the twins compute, and their launcher packs
arguments the way the kernels read them.

Three levels, so that machines without a GPU still check most of it:
- nvcc -arch=sm_90 -c on every csrc/cuda source (skipped only when nvcc is absent);
- the unmodified sources compiled for the CPU under csrc/emu (g++), driven through
  kernel/ops/cuda.py with a stand-in for CuPy's launch: every kernel against the twins;
- on a real GPU (marked cuda; skipped without torch.cuda or CuPy): the same comparisons.
"""
import ctypes
import functools
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from kernel import ops
from kernel.errors import KvosError
from kernel.kvcache import KVView
from kernel.ops import cuda, reference
from tests.test_ops_helpers import fresh_seed, make_batch, relative_error
from tests.test_ops_qmm import bound as qmm_bound
from tests.test_ops_qmm import weights as qmm_weights

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


# ---- nvcc ----

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_every_cuda_source_compiles_for_sm90(tmp_path):
    assert SOURCES, "no CUDA sources found"
    jobs = {src.name: subprocess.Popen(
        ["nvcc", "-arch=sm_90", "-c", f"-I{CSRC / 'common'}", f"-I{CSRC / 'cuda'}", str(src),
         "-o", str(tmp_path / f"{src.stem}.o")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for src in SOURCES}
    failed = {name: job.communicate()[0] for name, job in jobs.items() if job.wait() != 0}
    assert not failed, "nvcc failed:\n" + "\n".join(f"--- {n}\n{log}" for n, log in failed.items())


# ---- the CUDA sources on the CPU (csrc/emu) ----

@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not on the PATH")
    lib_path = tmp_path_factory.mktemp("emu") / "libkvos_emu.so"
    subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas",
                    f"-I{CSRC / 'common'}", f"-I{CSRC / 'cuda'}", f"-I{CSRC / 'emu'}",
                    str(CSRC / "emu" / "kernels_emu.cpp"), "-o", str(lib_path)], check=True)
    lib = ctypes.CDLL(str(lib_path))
    lib.emu_launch.restype = ctypes.c_int
    lib.emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                               ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
    return lib


class EmulatedKernel:
    """Stands in for a cupy RawKernel: packs the arguments as cuLaunchKernel would."""

    def __init__(self, lib, name):
        self.lib, self.name = lib, name
        self.max_dynamic_shared_size_bytes = 48 * 1024

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        assert isinstance(grid, tuple) and isinstance(block, tuple)
        values = [a if isinstance(a, np.ndarray) else np.array(a) for a in args]
        assert all(v.size == 1 for v in values), "kernel arguments are scalars or one packed struct"
        params = (ctypes.c_void_p * len(values))(*[v.ctypes.data for v in values])
        grid = grid + (1, 1)
        rc = self.lib.emu_launch(self.name.encode(), grid[0], grid[1], grid[2], block[0], shared_mem, params)
        assert rc == 0, {1: "unknown kernel", 2: "divergent barrier", 3: "shuffle with exited lanes",
                         4: "launch too large"}.get(rc, rc)


@pytest.fixture
def emulated(emulator, monkeypatch):
    """kernel/ops/cuda.py with CuPy replaced by the emulator; tensors stay on the CPU."""
    class Module:
        def __init__(self, code, options, backend):
            assert code.startswith("// kvos headers") and any(o.startswith("-I") for o in options)

        def compile(self):
            pass

        def get_function(self, name):
            return EmulatedKernel(emulator, name)

    class Device:
        def __init__(self, index):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake = types.ModuleType("cupy")
    fake.RawModule = Module
    fake.cuda = types.SimpleNamespace(Device=Device, ExternalStream=lambda ptr, device: None,
                                      compiler=types.SimpleNamespace(CompileException=RuntimeError))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(cuda, "kernels", cuda._Kernels())
    return cuda


def test_attn_args_layout_matches_the_launcher(emulator):
    offsets = (ctypes.c_size_t * 64)()
    n = emulator.emu_attn_args_layout(offsets)
    want = [cuda.ATTN_ARGS.fields[name][1] for name in cuda.ATTN_ARGS.names] + [cuda.ATTN_ARGS.itemsize]
    assert list(offsets[:n]) == want


def attend(backend, batch):
    """Run backend.paged_attention (ops, or cuda.py directly) on a batch; relative error to the twin."""
    k_cache, v_cache = batch.caches
    out = torch.full_like(batch.q, float("nan"))
    before = batch.snapshot()
    args = (batch.q, k_cache, v_cache, batch.page_table, batch.query_start, batch.context_lens,
            batch.q.shape[2] ** -0.5, out)
    if backend is ops:
        ops.paged_attention(*args)
    else:
        backend.paged_attention(*args, True)
    want = reference.paged_attention(batch.q.float(), k_cache.float(), v_cache.float(), batch.page_table,
                                     batch.query_start, batch.context_lens, batch.q.shape[2] ** -0.5)
    assert torch.equal(batch.pool, before)
    assert not torch.isnan(out).any(), f"unwritten output (seed {batch.seed})"
    return relative_error(out, want)


EMULATED_CASES = [   # q_lens, ctx_lens, heads, kv_heads, head_dim, page_size, partition
    ([1, 1, 1], [5, 40, 1], 9, 3, 64, 16, None),
    ([1, 3, 2, 0], [5, 40, 70, 9], 9, 3, 64, 16, 32),       # several partitions, merged
    ([2, 1], [30, 9], 8, 1, 128, 4, 16),
    ([1, 2], [30, 9], 4, 4, 128, 1, None),
    ([3, 1], [10, 33], 6, 2, 40, 3, None),
    ([1, 1], [20, 7], 16, 1, 64, 16, None),                 # a group wider than one pass of 8
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", EMULATED_CASES, ids=lambda c: f"{c[2]}/{c[3]}d{c[4]}ps{c[5]}p{c[6]}")
def test_emulated_attention_matches_twin(emulated, monkeypatch, dtype, case):
    *shape, partition = case
    if partition:
        monkeypatch.setattr(emulated, "attention_plan", functools.partial(emulated.attention_plan,
                                                                          partition=partition))
    batch = make_batch(*shape, dtype=dtype)
    err = attend(emulated, batch)
    assert err < TOLERANCE[dtype], f"relative error {err:.1e} (seed {batch.seed})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_attention_unaligned_rows(emulated, dtype):
    """Frames padded by one element: no 16-byte loads, the element-wise kernel variant."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    batch = make_batch([2, 1], [20, 35], 9, 3, 64, 16, dtype=dtype, pad_bytes=itemsize)
    assert batch.caches[0].stride(0) * itemsize % 16
    err = attend(emulated, batch)
    assert err < TOLERANCE[dtype], f"relative error {err:.1e} (seed {batch.seed})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_emulated_write_kv_matches_twin(emulated, dtype):
    batch = make_batch([1], [60], 3, 3, 64, 16, dtype=dtype)
    gen = torch.Generator().manual_seed(batch.seed)
    slots = (batch.ours[:, None] * 16 + torch.arange(16)).flatten()
    slots = slots[torch.randperm(len(slots), generator=gen)[:25]].to(torch.int32)
    k, v = (torch.randn(25, 3, 64, generator=gen).to(dtype) for _ in range(2))
    twin = batch.pool.clone()
    reference.write_kv(*KVView(twin, batch.view.shape).layer(batch.layer), k, v, slots)
    emulated.write_kv(*batch.caches, k, v, slots, True)
    assert torch.equal(batch.pool, twin)


@pytest.mark.parametrize("frame_bytes", [48, 20000, 7])
def test_emulated_frame_copies_match_twins(emulated, frame_bytes):
    gen = torch.Generator().manual_seed(fresh_seed())
    pool = torch.randint(0, 256, (9, frame_bytes), dtype=torch.uint8, generator=gen)
    swap = torch.randint(0, 256, (4, frame_bytes), dtype=torch.uint8, generator=gen)
    src, dst = torch.tensor([1, 5, 0], dtype=torch.int32), torch.tensor([7, 2, 3], dtype=torch.int32)
    want = pool.clone()
    reference.copy_frames(want, src, dst)
    emulated.copy_frames(pool, pool, src, dst, True)
    assert torch.equal(pool, want)
    slots = torch.tensor([3, 0, 1], dtype=torch.int32)
    swap_want = swap.clone()
    reference.swap_out(pool, swap_want, src, slots)
    emulated.copy_frames(pool, swap, src, slots, True)
    assert torch.equal(swap, swap_want)


@pytest.mark.parametrize("bits", [4, 8])
def test_emulated_qmm_matches_twin(emulated, bits):
    """csrc/cuda/qmm.cu against reference.qmm, with the float32 bound of tests/test_ops_qmm.py
    (odd n, a missing last block of a pair, strided rows in and out)."""
    gen = torch.Generator().manual_seed(fresh_seed())
    n, k, m = 7, 96, 3
    codes, d, mins = qmm_weights(n, k, bits, gen)
    packed = ops.qmm_pack(codes, d, mins, bits)
    x = torch.randn(m, k + 5, generator=gen)[:, 5:]
    out = torch.full((m, n + 2), 9.0)
    emulated.qmm(x, packed, n, bits, out[:, :n])
    assert bool((out[:, n:] == 9.0).all())
    err = (out[:, :n] - reference.qmm(x, codes, d, mins)).abs()
    assert bool((err <= qmm_bound(x, codes, d, mins)).all()), f"max error {err.max().item():.3g}"


# ---- a real GPU ----

def _gpu_ready():
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed"
    return None


gpu = pytest.mark.skipif(_gpu_ready() is not None, reason=str(_gpu_ready()))


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_attention_and_write_kv_match_twins(dtype):
    batch = make_batch([1, 40, 1, 3], [700, 40, 1, 1300], 9, 3, 64, 16, dtype=dtype, device="cuda")
    err = attend(ops, batch)
    assert err < TOLERANCE[dtype], f"relative error {err:.1e} (seed {batch.seed})"
    k = torch.randn(4, 3, 64, device="cuda").to(dtype)
    slots = (batch.ours[:1] * 16 + torch.arange(4, device="cuda")).to(torch.int32)
    twin = batch.pool.clone()
    reference.write_kv(*KVView(twin, batch.view.shape).layer(1), k, k, slots)
    ops.write_kv(*batch.caches, k, k, slots)
    assert torch.equal(batch.pool, twin)


@pytest.mark.cuda
@gpu
def test_cuda_frame_copies_and_refusals():
    pool = torch.randint(0, 256, (9, 4096), dtype=torch.uint8, device="cuda")
    swap = torch.zeros(4, 4096, dtype=torch.uint8, pin_memory=True)
    src, dst = torch.tensor([1, 5], dtype=torch.int32), torch.tensor([7, 2], dtype=torch.int32)
    want = pool.clone()
    reference.copy_frames(want, src, dst)
    ops.copy_frames(pool, src, dst)
    assert torch.equal(pool, want)
    ops.swap_out(pool, swap, src, torch.tensor([0, 3], dtype=torch.int32))
    torch.cuda.synchronize()
    assert torch.equal(swap[3], pool[5].cpu())
    before = pool.clone()
    with pytest.raises(KvosError):
        ops.copy_frames(pool, src, torch.tensor([7, 7], dtype=torch.int32))
    assert torch.equal(pool, before)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_decode_v2_and_fused_ops_match_twins(dtype):
    """Decode v2 with chunk sizes and a host work list, and the fused layer kernels, on a real GPU."""
    from kernel.ops import cuda_decode, fused
    batch = make_batch([1] * 5, [1, 700, 33, 1300, 4100], 8, 1, 128, 16, dtype=dtype, device="cuda")
    for chunk in (None, 64):
        assert attend(ops, batch) < TOLERANCE[dtype]
        k_cache, v_cache = batch.caches
        out = torch.full_like(batch.q, float("nan"))
        _, used, chunks, _ = cuda_decode.plan(5, 1, 8, 128, 2, batch.page_table.shape[1] * 16, 16, chunk)
        work = torch.from_numpy(cuda_decode.work_list(batch.context_lens.tolist(), used, chunks)).cuda()
        cuda_decode.paged_attention(batch.q, k_cache, v_cache, batch.page_table, batch.query_start,
                                    batch.context_lens, 128 ** -0.5, out, True, work=work, chunk=used)
        want = reference.paged_attention(batch.q.float(), k_cache.float(), v_cache.float(), batch.page_table,
                                         batch.query_start, batch.context_lens, 128 ** -0.5)
        assert relative_error(out, want) < TOLERANCE[dtype]
    gen = torch.Generator().manual_seed(batch.seed)
    residual, delta = (torch.randn(9, 576, generator=gen).to(dtype).cuda() for _ in range(2))
    weight = torch.randn(576, generator=gen).to(dtype).cuda()
    twin_residual = residual.clone()
    want = reference.add_rms_norm(twin_residual, delta, weight, 1e-5)
    got = fused.add_rms_norm(residual, delta, weight, 1e-5)
    assert torch.equal(residual, twin_residual) and relative_error(got, want) < TOLERANCE[dtype]
    gate_up = torch.randn(9, 2 * 1536, generator=gen).to(dtype).cuda()
    assert relative_error(fused.silu_mul(gate_up), reference.silu_mul(gate_up)) < TOLERANCE[dtype]
    q, k, v = (torch.randn(9, h, 128, generator=gen).to(dtype).cuda() for h in (8, 1, 1))
    freqs = torch.rand(50, 64, generator=gen) * 40
    cos, sin = torch.cat((freqs, freqs), -1).cos().to(dtype).cuda(), freqs.sin().to(dtype).cuda()
    positions = torch.randint(0, 50, (9,), generator=gen, dtype=torch.int32).cuda()
    slots = (batch.ours[:9] * 16).to(torch.int32)
    twin_pool, twin_q = batch.pool.clone(), q.clone()
    reference.rope_write_kv(twin_q, k, v, cos, sin, positions, *KVView(twin_pool, batch.view.shape).layer(1), slots)
    fused.rope_write_kv(q, k, v, cos, sin, positions, *batch.caches, slots)
    assert relative_error(q, twin_q) < TOLERANCE[dtype]
    for got_cache, want_cache in zip(batch.caches, KVView(twin_pool, batch.view.shape).layer(1)):
        assert relative_error(got_cache[batch.ours], want_cache[batch.ours]) < TOLERANCE[dtype]


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_qmm_matches_twin(bits):
    gen = torch.Generator().manual_seed(fresh_seed())
    n, k, m = 301, 576, 5
    codes, d, mins = qmm_weights(n, k, bits, gen)
    x = torch.randn(m, k, generator=gen)
    y = ops.qmm(x.cuda(), ops.qmm_pack(codes, d, mins, bits).cuda(), n, bits).cpu()
    err = (y - reference.qmm(x, codes, d, mins)).abs()
    assert bool((err <= qmm_bound(x, codes, d, mins)).all()), f"max error {err.max().item():.3g}"
