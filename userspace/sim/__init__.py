"""kvos sim: workloads, a virtual-time driver and the experiments that reproduce the seed
article's claims on the simulated device (docs/claims.md, docs/simulator.md).

    python -m userspace.sim all        # or: kvos sim EXPERIMENT [--json]
"""
