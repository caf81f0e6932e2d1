"""Global ids: which replica a pid (or a cluster shm id) lives on, readable in decimal.

A replica's kernel numbers its processes itself (random 31-bit pids under kvosd, so below
2**31 < 10**10). The gateway shows them as

    global pid = replica * 10**10 + local pid

so replica 0's pids are its own, replica 1's pid 77 is 10000000077, and any pid says at a
glance where it runs. Ids stay below 2**53 (JSON-safe) for up to 900,000 replicas.
"""
from __future__ import annotations

from kernel.argcheck import check_int
from kernel.errors import ESRCH, KvosError

STRIDE = 10 ** 10                 # local ids are below 2**31 < STRIDE
MAX_REPLICAS = 900_000            # STRIDE * MAX_REPLICAS < 2**53


def to_global(replica: int, local: int) -> int:
    return replica * STRIDE + local


def split(pid, replicas: int, name: str = "pid") -> tuple[int, int]:
    """(replica, local pid) of a global pid; EINVAL if it is not an integer, ESRCH if no replica has it."""
    check_int(name, pid)
    replica, local = divmod(pid, STRIDE)
    if pid <= 0 or local == 0 or replica >= replicas:
        raise KvosError(ESRCH, f"no process {pid}" if name == "pid" else f"no {name} {pid}")
    return replica, local
