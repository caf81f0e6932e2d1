"""kernel/ops: the one door from Python to compiled code (the MMU kernels).

Each op validates its arguments at the boundary (dtype, device, shapes, index
ranges) and raises KvosError(EINVAL) before touching memory, then dispatches on
the device of its tensors: C through cffi on the CPU, CUDA through CuPy on the
GPU. Both load lazily, so importing kernel/ops needs neither the C extension nor
CuPy. kernel/ops/reference.py holds the plain-torch twin of each op.
"""
from kernel.ops.dispatch import copy_frames, paged_attention, swap_in, swap_out, write_kv
from kernel.ops.panel import NARROW, PANEL, panel_mm, panel_pack, panel_unpack
from kernel.ops.qblocks import QmmWeights, qmm, qmm_pack, qmm_rows, qmm_unpack
from kernel.ops.quant import int4_mm, int4_pack


def set_num_threads(n: int) -> None:
    """Threads for torch's CPU ops and the C kernels alike (KVOS_THREADS sets it at first use)."""
    from kernel.ops import cpu
    cpu.set_num_threads(n)


__all__ = ["write_kv", "paged_attention", "copy_frames", "swap_out", "swap_in", "set_num_threads",
           "int4_pack", "int4_mm", "panel_pack", "panel_unpack", "panel_mm", "qmm_pack", "qmm_unpack", "qmm_rows",
           "qmm",
           "QmmWeights", "PANEL", "NARROW"]
