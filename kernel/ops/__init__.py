"""kernel/ops: the one door from Python to compiled code (the MMU kernels).

Each op validates its arguments at the boundary (dtype, device, shapes, index
ranges) and raises KvosError(EINVAL) before touching memory, then dispatches on
the device of its tensors: C through cffi on the CPU, CUDA through CuPy on the
GPU. kernel/ops/reference.py holds the plain-torch twin of each op.
"""
from kernel.ops.dispatch import copy_frames, paged_attention, swap_in, swap_out, write_kv

__all__ = ["write_kv", "paged_attention", "copy_frames", "swap_out", "swap_in"]
