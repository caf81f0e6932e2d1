"""The CPU path of kernel/ops: calls into the C kernels of csrc/cpu through cffi.

The extension is loaded on first use, after torch, so that both link the one libgomp
and share its threads; KVOS_THREADS (if set) then sizes both. Arguments arrive here
already checked for shape, dtype and device (dispatch.py); index ranges are checked
by the C pre-pass when check is true, before any write.
"""
import os

import torch  # first: the extension must find torch's libgomp already loaded

from kernel.errors import ENODEV, ENOMEM, KvosError
from kernel.ops import validate

_ext = None


def _load():
    global _ext
    if _ext is None:
        try:
            from kernel.ops import _kvos_cpu
        except ImportError as e:
            raise KvosError(ENODEV, f"the C kernels are not built ({e}): run `make install` "
                                    "or `pip install -e .`") from None
        _ext = _kvos_cpu
        threads = os.environ.get("KVOS_THREADS")
        if threads:
            set_num_threads(int(threads))
    return _ext


def set_num_threads(n: int) -> None:
    """Threads for torch's CPU ops and for the C kernels alike (one OpenMP pool)."""
    if n < 1:
        validate.fail(f"thread count must be at least 1, not {n}")
    torch.set_num_threads(n)
    _load().lib.kvos_set_num_threads(n)


def num_threads() -> int:
    return _load().lib.kvos_num_threads()


ISA_CAPS = {"best": 0, "avx2": 1, "portable": 2}


def set_isa_cap(cap: str) -> str:
    """The most the C kernels' vector paths may ask of this CPU, for the whole process: "best"
    (the default), "avx2" or "portable". Returns the previous cap. The tests use it to run every
    path the machine can run against the same twins; a faster CPU never needs it."""
    if cap not in ISA_CAPS:
        validate.fail(f"the ISA cap is one of {list(ISA_CAPS)}, not {cap!r}")
    lib = _load().lib
    before = {v: k for k, v in ISA_CAPS.items()}[lib.kvos_isa_cap()]
    lib.kvos_set_isa_cap(ISA_CAPS[cap])
    return before


def cpu_has_avx2() -> bool:
    """AVX2 with FMA and F16C (the AVX2 paths' needs), whatever the cap."""
    before = set_isa_cap("avx2")
    try:
        return bool(_load().lib.kvos_cpu_avx2())
    finally:
        set_isa_cap(before)


def vector_paths() -> dict:
    """Which code the C kernels run on this CPU under the current cap (for a benchmark's record)."""
    lib = _load().lib
    vector = "avx512" if lib.kvos_cpu_avx512() else "avx2" if lib.kvos_cpu_avx2() else "portable"
    qmm = ("amx on batched calls, vnni below" if lib.kvos_qmm_has_amx()     # (the rows: qmm.c's AMX_MIN_ROWS)
           else "vnni" if lib.kvos_qmm_has_vnni() else "avx2" if lib.kvos_qmm_has_avx2() else "portable")
    return {"qmm": qmm, "panel_mm": vector, "panel_bf16": "vdpbf16ps" if lib.kvos_panel_bf16_has_dp() else "portable",
            "attention": vector}


_CACHE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}    # kvos_cpu.h's KVOS_CACHE_*


def cache_kind(dtype) -> int:
    """The C kernels' name for what a cache holds (dispatch.py has checked the dtype)."""
    return _CACHE_KINDS[dtype]


def _ptr(t):
    return _ext.ffi.cast("void *", t.data_ptr())


def _raise(rc, bad, describe):
    """Turn a C return code into the KvosError its checked twin in validate.py raises."""
    if rc == _ext.lib.KVOS_E_NOMEM:
        raise KvosError(ENOMEM, "the C kernel could not allocate its scratch memory")
    describe(rc, int(bad[0]), int(bad[1]))
    raise AssertionError(f"kvos C kernel returned unknown code {rc}")  # pragma: no cover


def write_kv(k_cache, v_cache, k, v, slot_mapping, check):
    lib = _load().lib
    num_frames, page_size, kv_heads, head_dim = k_cache.shape
    bad = _ext.ffi.new("int64_t[2]")
    rc = lib.kvos_write_kv(
        _ptr(k_cache), _ptr(v_cache), cache_kind(k_cache.dtype), num_frames, page_size,
        *k_cache.stride()[:3],
        _ptr(k), _ptr(v), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        _ptr(slot_mapping), k.shape[0], kv_heads, head_dim, int(check), bad)
    if rc:
        _raise(rc, bad, lambda rc, t, slot: validate.bad_slot(t, slot, num_frames * page_size))


_BATCH_RULES = {"KVOS_E_QSTART0": "qstart0", "KVOS_E_QSTART_ORDER": "order", "KVOS_E_QSTART_END": "end",
                "KVOS_E_CONTEXT": "context", "KVOS_E_PAGES": "pages", "KVOS_E_PAGE_ENTRY": "entry"}


def paged_attention(q, k_cache, v_cache, page_table, query_start, context_lens, scale, out, check):
    lib = _load().lib
    num_frames, page_size, kv_heads, head_dim = k_cache.shape
    bad = _ext.ffi.new("int64_t[2]")
    rc = lib.kvos_paged_attention(
        _ptr(out), out.stride(0), out.stride(1), _ptr(q), q.stride(0), q.stride(1),
        _ptr(k_cache), _ptr(v_cache), cache_kind(k_cache.dtype), num_frames, page_size,
        *k_cache.stride()[:3], _ptr(page_table), page_table.stride(0), page_table.shape[1],
        _ptr(query_start), _ptr(context_lens), context_lens.shape[0], q.shape[0], q.shape[1], kv_heads,
        head_dim, scale, int(check), bad)
    if rc:
        rules = {getattr(lib, name): rule for name, rule in _BATCH_RULES.items()}
        _raise(rc, bad, lambda rc, s, p: validate.bad_batch(
            rules[rc], s, p, page_table, query_start, context_lens, q.shape[0], num_frames, page_size))
    return out


def copy_frames(src_pool, dst_pool, src, dst, check, src_name="src", dst_name="dst"):
    """dst_pool[dst[i]] = src_pool[src[i]]; the pools may be one (copy-on-write) or two (swap)."""
    lib = _load().lib
    same_pool = src_pool.data_ptr() == dst_pool.data_ptr()
    bad = _ext.ffi.new("int64_t[2]")
    rc = lib.kvos_copy_frames_checked(
        _ptr(src_pool), _ptr(dst_pool), src_pool.stride(0), _ptr(src), src_pool.shape[0],
        _ptr(dst), dst_pool.shape[0], src.shape[0], int(same_pool), int(check), bad)
    if rc:
        def describe(rc, i, which):
            code = {lib.KVOS_E_INDEX: "src" if which == 0 else "dst", lib.KVOS_E_DUPLICATE: "duplicate",
                    lib.KVOS_E_OVERLAP: "overlap"}[rc]
            validate.bad_frame_list(code, i, src, dst, src_pool.shape[0], dst_pool.shape[0], src_name, dst_name)
        _raise(rc, bad, describe)


_panel_width_checked = False


def panel_mm(out, x, packed, bias, m, k, n, accumulate):
    """out = (accumulate ? out : 0) + x @ W^T + bias, W packed by kernel/ops/panel.py in wide or narrow
    panels (checked there)."""
    global _panel_width_checked
    lib = _load().lib
    if not _panel_width_checked:      # a stale build would misread the packing: once per process
        from kernel.ops.panel import NARROW, PANEL
        if (lib.kvos_panel_width(), lib.kvos_panel_narrow_width()) != (PANEL, NARROW):
            raise AssertionError(f"panel_mm.c packs {lib.kvos_panel_width()} and {lib.kvos_panel_narrow_width()} "
                                 f"columns, panel.py {PANEL} and {NARROW}")
        _panel_width_checked = True
    fn = lib.kvos_panel_mm if packed.shape[2] == lib.kvos_panel_width() else lib.kvos_panel_mm_narrow
    fn(_ptr(out), out.stride(0), _ptr(x), x.stride(0), _ptr(packed),
       _ptr(bias) if bias is not None else _ext.ffi.NULL, m, k, n, int(accumulate))


def panel_bf16_has_dp() -> bool:
    return bool(_load().lib.kvos_panel_bf16_has_dp())


def panel_mm_bf16(out, x, packed, bias, m, k, n, accumulate, path):
    """out = (accumulate ? out : 0) + bf16(x) @ W^T + bias on bf16 panels (checked by kernel/ops/panel.py)."""
    lib = _load().lib
    rc = lib.kvos_panel_mm_bf16(_ptr(out), out.stride(0), _ptr(x), int(x.dtype == torch.bfloat16), x.stride(0),
                                _ptr(packed), _ptr(bias) if bias is not None else _ext.ffi.NULL, m, k, n,
                                int(accumulate), path)
    if rc:      # the only failure: its scratch for x's bf16 pairs
        raise KvosError(ENOMEM, "the C kernel could not allocate its scratch memory")


def qmm_has_vnni() -> bool:
    return bool(_load().lib.kvos_qmm_has_vnni())


def qmm_has_avx2() -> bool:
    return bool(_load().lib.kvos_qmm_has_avx2())


def qmm_has_amx() -> bool:
    return bool(_load().lib.kvos_qmm_has_amx())


_qmm_layout_checked = False


def check_qmm_layout() -> None:
    """A stale build would misread the packing: checked once per process."""
    global _qmm_layout_checked
    if not _qmm_layout_checked:
        from kernel.ops.qblocks import packed_shape
        lib = _load().lib
        if lib.kvos_qmm_record_bytes(4) != packed_shape(1, 32, 4)[2]:
            raise AssertionError(f"qmm.c reads {lib.kvos_qmm_record_bytes(4)}-byte records, qblocks.py packs "
                                 f"{packed_shape(1, 32, 4)[2]}")
        _qmm_layout_checked = True


def qmm(x, packed, n, bits, path, out):
    """out = x @ W^T on packed 4/8-bit blocks (arguments checked by kernel/ops/qblocks.py)."""
    lib = _load().lib
    check_qmm_layout()
    rc = lib.kvos_qmm(_ptr(out), out.stride(0), _ptr(x), x.stride(0), x.shape[0], x.shape[1],
                      _ptr(packed), n, bits, path)
    if rc:      # the only failure: its scratch for the quantized activations
        raise KvosError(ENOMEM, "the C kernel could not allocate its scratch memory")
    return out


def qmm_rows(packed, ids, n, k, bits):
    """Rows ids (int64, in range: checked by kernel/ops/qblocks.py) of the packed W as float32."""
    lib = _load().lib
    check_qmm_layout()
    out = torch.empty(ids.shape[0], k)
    lib.kvos_qmm_rows(_ptr(out), _ptr(packed), n, k, bits, _ext.ffi.cast("int64_t *", ids.data_ptr()), ids.shape[0])
    return out


# ---- the fused layer ops (csrc/cpu/fused.c), float32 rows checked by kernel/ops/fused.py ----

def add_rms_norm(residual, delta, weight, eps, out):
    lib = _load().lib
    lib.kvos_add_rms_norm(_ptr(residual), residual.stride(0), _ptr(delta), delta.stride(0), _ptr(weight),
                          _ptr(out), out.stride(0), residual.shape[0], residual.shape[1], eps)
    return out


def rms_norm(x, weight, eps, out):
    lib = _load().lib
    lib.kvos_rms_norm(_ptr(x), x.stride(0), _ptr(weight), _ptr(out), out.stride(0), x.shape[0], x.shape[1], eps)
    return out


def rope_write_kv(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping, check):
    lib = _load().lib
    num_frames, page_size, kv_heads, head_dim = k_cache.shape
    bad = _ext.ffi.new("int64_t[2]")
    rc = lib.kvos_rope_write_kv(
        _ptr(q), q.stride(0), q.stride(1), q.shape[1], _ptr(k), k.stride(0), k.stride(1),
        _ptr(v), v.stride(0), v.stride(1), _ptr(cos), cos.stride(0), _ptr(sin), sin.stride(0),
        _ptr(positions), cos.shape[0], _ptr(k_cache), _ptr(v_cache), cache_kind(k_cache.dtype),
        num_frames, page_size, *k_cache.stride()[:3], _ptr(slot_mapping), q.shape[0], kv_heads, head_dim,
        int(check), bad)
    if rc:
        def describe(rc, t, value):
            if rc == lib.KVOS_E_POSITION:
                validate.fail(f"positions[{t}] = {value} is outside the RoPE tables' {cos.shape[0]} rows")
            validate.bad_slot(t, value, num_frames * page_size)
        _raise(rc, bad, describe)


def silu_mul(gate_up, out):
    lib = _load().lib
    lib.kvos_silu_mul(_ptr(gate_up), gate_up.stride(0), _ptr(out), out.stride(0), gate_up.shape[0], out.shape[1])
    return out


def draw_tokens(logits, temperature, top_k, top_p, log_min_p, u):
    """csrc/cpu/draw.c on float32 rows with a dense last dimension; the per-row arguments are
    contiguous CPU tensors of the dtypes reference.draw_tokens names (draw.py checked them)."""
    lib = _load().lib
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64)
    f = _ext.ffi.cast
    rc = lib.kvos_draw_tokens(f("float *", logits.data_ptr()), logits.stride(0), rows, vocab,
                              f("float *", temperature.data_ptr()), f("int32_t *", top_k.data_ptr()),
                              f("double *", top_p.data_ptr()), f("float *", log_min_p.data_ptr()),
                              f("double *", u.data_ptr()), f("int64_t *", out.data_ptr()))
    if rc == lib.KVOS_E_NOMEM:
        raise KvosError(ENOMEM, f"draw_tokens: no scratch for {vocab} tokens a thread")
    return out
