"""kvos past one kernel: replicas behind a router (docs/cluster.md).

router.py is pure Python (no Ray, no kernel objects): it decides which replica a
request goes to, from what it routed and from what replicas report. The Ray
replicas and the gateway that use it live beside it; `kvos sim cluster`
(userspace/sim/cluster.py) drives it in front of simulated kernels.
"""
from userspace.cluster.router import POLICIES, Decision, Router

__all__ = ["Router", "Decision", "POLICIES"]
