"""cffi build script for the CPU kernels (run by setup.py at install time).

Produces the extension module kernel.ops._kvos_cpu from csrc/cpu/*.c, compiled
against csrc/common. OpenMP is linked as libgomp, the same runtime torch's CPU
build uses, so torch and these kernels share one thread pool once torch is
imported first (kernel/ops/cpu.py does so).
"""
import os
import pathlib
import platform

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
CSRC = HERE.parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "kvos_cpu.h").read_text().split("/* cdef-begin */")[1].split("/* cdef-end */")[0])

_march = os.environ.get("KVOS_MARCH", "native")
_sources = sorted(str(p.relative_to(CSRC.parent)) for p in HERE.glob("*.c"))
ffibuilder.set_source(
    "kernel.ops._kvos_cpu",
    '#include "kvos_cpu.h"',
    sources=_sources,
    include_dirs=[str(HERE.relative_to(CSRC.parent)), str((CSRC / "common").relative_to(CSRC.parent))],
    extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=fast", "-std=c11"]
    + ([f"-march={_march}"] if _march else [])
    # gcc keeps to 256-bit vectors on AVX-512 machines unless told: the kernels want 512.
    + (["-mprefer-vector-width=512"] if _march and platform.machine() in ("x86_64", "AMD64") else []),
    extra_link_args=["-fopenmp"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
