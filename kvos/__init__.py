"""kvos: the public face of the kvos packages.

    import kvos
    k = kvos.boot(device="cpu", memory="256MiB")
    sys = k.syscalls()
    tid = sys.spawn_tenant("smollm2-135m")
    print(kvos.libc.generate(sys, tid, "What is a page table?", max_tokens=32).text)

It re-exports what a user needs and nothing else: boot, the two error types,
the result types the syscalls return, libc, and a daemon Client. The kernel and
userspace packages stay where they are; this module only names their public parts.
"""
from importlib.metadata import PackageNotFoundError, version

from kernel import boot, results
from kernel.errors import ERRNOS, KernelPanic, KvosError
from kernel.results import *  # noqa: F403  (the result types the syscalls return)
from userspace import libc
from userspace.daemon.client import Client

try:
    __version__ = version("kvos")
except PackageNotFoundError:        # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["boot", "KvosError", "KernelPanic", "ERRNOS", "libc", "Client", "__version__", *results.__all__]
