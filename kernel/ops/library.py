"""kvos's compiled ops as torch.library custom ops: torch.ops.kvos.{write_kv, paged_attention, copy_frames}.

dispatch.py checks arguments and then calls these; the dispatcher picks the CPU (C through cffi)
or CUDA (CuPy) kernel by the tensors' device. Each op has a fake (meta) implementation, so that
torch.compile and FakeTensor tracing can treat it as an opaque call, and a schema that names the
tensors it writes. Nothing here reads a device tensor on the host: on CUDA the index checks run
before the call (dispatch.py, or on the host arrays of the batch builder), so an op may sit
inside a captured CUDA graph. On the CPU `check` turns on the C pre-pass, which raises
KvosError(EINVAL) before any write.
"""
import torch

_lib = torch.library.Library("kvos", "DEF")   # noqa: TOR901 (kept for the life of the process)

_lib.define("write_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slot_mapping, "
            "bool check) -> ()")
_lib.define("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table, Tensor query_start, "
            "Tensor context_lens, float scale, Tensor(a!) out, bool check) -> ()")
# One pool (copy-on-write) or two (swap: a device pool and the host swap area): src_pool may be
# dst_pool itself. The names only word the reasons of a refusal.
_lib.define("copy_frames(Tensor src_pool, Tensor(a!) dst_pool, Tensor src, Tensor dst, bool check, "
            "str src_name, str dst_name) -> ()")


def _cpu():
    from kernel.ops import cpu
    return cpu


def _cuda():
    from kernel.ops import cuda
    return cuda


def _write_kv(backend):
    def impl(k_cache, v_cache, k, v, slot_mapping, check):
        backend().write_kv(k_cache, v_cache, k, v, slot_mapping, check)
    return impl


def _paged_attention(backend):
    def impl(q, k_cache, v_cache, page_table, query_start, context_lens, scale, out, check):
        backend().paged_attention(q, k_cache, v_cache, page_table, query_start, context_lens, scale, out, check)
    return impl


def _copy_frames(backend):
    def impl(src_pool, dst_pool, src, dst, check, src_name, dst_name):
        backend().copy_frames(src_pool, dst_pool, src, dst, check, src_name, dst_name)
    return impl


for _key, _backend in (("CPU", _cpu), ("CUDA", _cuda)):
    _lib.impl("write_kv", _write_kv(_backend), _key)
    _lib.impl("paged_attention", _paged_attention(_backend), _key)
    _lib.impl("copy_frames", _copy_frames(_backend), _key)


# Fake implementations: every op writes into tensors it was given and returns nothing, so the
# fake of each is "no new tensor" (shapes were checked by dispatch.py before the call).
@torch.library.register_fake("kvos::write_kv")
def _write_kv_fake(k_cache, v_cache, k, v, slot_mapping, check):
    return None


@torch.library.register_fake("kvos::paged_attention")
def _paged_attention_fake(q, k_cache, v_cache, page_table, query_start, context_lens, scale, out, check):
    return None


@torch.library.register_fake("kvos::copy_frames")
def _copy_frames_fake(src_pool, dst_pool, src, dst, check, src_name, dst_name):
    return None


write_kv = torch.ops.kvos.write_kv.default
paged_attention = torch.ops.kvos.paged_attention.default
copy_frames = torch.ops.kvos.copy_frames.default
