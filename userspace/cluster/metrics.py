"""/metrics over a cluster: the kernel's families of each replica, every sample labelled `replica`.

One scrape asks the gateway once (ps, meminfo, schedstat: merged answers that keep each
replica's own under `replicas`), runs kvosd's KernelCollector over each replica's part, adds the
label, and joins the families of the same name. The gateway's own series (time to first token,
requests) are the gateway's, not a replica's: they carry no replica label.
"""
from __future__ import annotations

from userspace.daemon.metrics import KernelCollector


class _OneReplica:
    """The three calls KernelCollector makes, answered from one replica's share of merged answers."""

    def __init__(self, replica, procs, mem, sched):
        self.replica, self._procs, self._mem, self._sched = replica, procs, mem, sched

    def ps(self):
        return [p for p in self._procs if p.replica == self.replica]

    def meminfo(self):
        return self._mem.replicas[self.replica]

    def schedstat(self):
        return self._sched.replicas[self.replica]


class ReplicaCollector:
    def __init__(self, handle, tenant: str | None = None):
        self.handle, self.tenant = handle, tenant

    def collect(self):
        procs, mem, sched = self.handle.ps(), self.handle.meminfo(), self.handle.schedstat()
        families: dict = {}
        for replica in sorted(mem.replicas or {}):
            if replica not in (sched.replicas or {}):
                continue
            view = _OneReplica(replica, procs, mem, sched)
            for family in KernelCollector(view, self.tenant).collect():
                samples = [s._replace(labels={**s.labels, "replica": str(replica)}) for s in family.samples]
                have = families.get(family.name)
                if have is None:
                    family.samples = samples
                    families[family.name] = family
                else:
                    have.samples.extend(samples)
        yield from families.values()
