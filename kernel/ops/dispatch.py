"""Interim dispatch: frame copies through the C kernel, the rest through the torch twins.

The MMU-kernels issue replaces this file with validated C and CUDA paths.
"""
import torch

from kernel.ops import reference


def _c_lib():
    from kernel.ops import _kvos_cpu
    return _kvos_cpu


def copy_frames(pool, src, dst):
    if pool.device.type != "cpu":
        return reference.copy_frames(pool, src, dst)
    m = _c_lib()
    src, dst = src.to(torch.int32).contiguous(), dst.to(torch.int32).contiguous()
    m.lib.kvos_copy_frames(
        m.ffi.cast("const uint8_t *", pool.data_ptr()), m.ffi.cast("uint8_t *", pool.data_ptr()),
        pool.stride(0), m.ffi.cast("const int32_t *", src.data_ptr()),
        m.ffi.cast("const int32_t *", dst.data_ptr()), src.numel())


swap_out = reference.swap_out
swap_in = reference.swap_in
write_kv = reference.write_kv
paged_attention = reference.paged_attention
