"""kvos past one kernel: replicas (whole kernels in Ray actors) behind a router and one gateway.

replica.py is the Ray actor that boots a kernel; cluster.py starts the replicas and hands out
ClusterHandles (handle.py), which have the methods of a syscall handle, so kvosd's server
serves them unchanged (gateway.py). pids.py says how a global pid names its replica;
aggregate.py merges ps, meminfo, schedstat, dmesg, trace; metrics.py labels /metrics by
replica. docs/cluster-replicas.md is the design.
"""
