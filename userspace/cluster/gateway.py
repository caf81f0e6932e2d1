"""The gateway: kvosd's server (the OpenAI API, /sys, /metrics, /health) over a cluster.

`kvos serve --replicas N [--router POLICY] [--address ADDR]` runs serve(): it binds the port,
starts the replicas on Ray (a local instance, or the cluster at ADDR), and serves kvosd's app
unchanged over a ClusterHandle; the tenants of the config start on every replica. At the end
the replicas' kernels shut down (each runs fsck) and the actors go.
"""
from __future__ import annotations

from userspace.cluster.cluster import Cluster
from userspace.cluster.metrics import ReplicaCollector
from userspace.daemon import listen


def start(config, replicas: int, router: str = "cache_aware", address: str | None = None) -> Cluster:
    return Cluster(replicas, config.boot, router=router, address=address)


def serve(config, replicas: int, router: str = "cache_aware", address: str | None = None, host="127.0.0.1",
          port=8000, log_level="info") -> int:
    """kvosd over N replicas, in the foreground until SIGTERM or SIGINT. -> exit status"""
    started = []

    def boot():
        cluster = start(config, replicas, router, address)
        started.append(cluster)
        return cluster, ReplicaCollector
    try:
        return listen.serve(config, host=host, port=port, log_level=log_level, boot=boot)
    finally:
        for cluster in started:
            cluster.close()


class GatewayThread(listen.ServerThread):
    """The gateway in a thread of this process over a running cluster (tests, embedding); stop()
    shuts the replicas' kernels down but leaves the cluster to its owner (cluster.close())."""

    def __init__(self, config, cluster: Cluster, **kwargs):
        self.cluster = cluster
        super().__init__(config, system=cluster, collector=ReplicaCollector, **kwargs)
