"""kvos past one kernel: replicas behind a router (docs/cluster.md, docs/cluster-replicas.md).

router.py is pure Python (no Ray, no kernel objects): it decides which replica a
request goes to, from what it routed and from what replicas report; `kvos sim cluster`
(userspace/sim/cluster.py) drives it in front of simulated kernels.

The real replicas: replica.py is the Ray actor that boots a kernel; cluster.py starts the
replicas and hands out ClusterHandles (handle.py), which have the methods of a syscall handle,
so kvosd's server serves them unchanged (gateway.py). pids.py says how a global pid names its
replica; aggregate.py merges ps, meminfo, schedstat, dmesg, trace; metrics.py labels /metrics by
replica.
"""
from userspace.cluster.router import POLICIES, Decision, Router

__all__ = ["Router", "Decision", "POLICIES"]
