"""The cluster: N replicas (Ray actors, each a whole kernel), the router, and what the gateway
remembers to route calls and to answer for a replica that died.

Cluster(replicas, boot, router) starts Ray (a local instance, or joins `address`), starts the
replicas and waits for their kernels to boot. cluster.syscalls(as_tenant) gives a ClusterHandle
(handle.py), cluster.shutdown() stops every kernel (fsck each): the two things kvosd asks of a
booted kernel, so its server runs over a cluster unchanged (gateway.py).

The gateway keeps, per replica, the processes it started there and has not reaped (local pid ->
tid): that is each replica's load for the router, and what lets it say, once a replica is gone,
which pids existed there (they exit with EIO) and which never did (ESRCH).
"""
from __future__ import annotations

import itertools
import logging
import os
import threading

from kernel.errors import EINVAL, EIO, KernelPanic, KvosError
from userspace.cluster import pids as gpids
from userspace.cluster.replica import Replica

log = logging.getLogger("kvosd")

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROUTERS = ("round_robin",)          # the stand-in's; router.py's policies once merged


def make_router(policy: str):
    from userspace.cluster.standin_router import RoundRobin
    if policy not in ROUTERS:
        raise KvosError(EINVAL, f"router must be one of {', '.join(ROUTERS)}, got {policy!r}")
    return RoundRobin()


class Cluster:
    def __init__(self, replicas: int, boot: dict, router: str = "round_robin", address: str | None = None,
                 replica_cpus: float | None = None, replica_gpus: float | None = None):
        import ray
        from ray.exceptions import RayActorError
        if not 1 <= replicas <= gpids.MAX_REPLICAS:
            raise KvosError(EINVAL, f"replicas must be in [1, {gpids.MAX_REPLICAS}], got {replicas}")
        self.ray, self.RayActorError = ray, RayActorError
        self.router = make_router(router)
        self.router_name = router
        self.started_ray = False
        if not ray.is_initialized():
            local = address is None
            # Local mode: one Ray instance on this machine, as many CPUs as replicas at least (Ray counts
            # them for placement only). Workers import kvos from this process's path.
            env = {"PYTHONPATH": os.pathsep.join(p for p in (SOURCE_ROOT, os.environ.get("PYTHONPATH")) if p)}
            ray.init(address=address, num_cpus=max(replicas, os.cpu_count() or 1) if local else None,
                     include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
            self.started_ray = True
        gpu = str(boot.get("device", "cpu")).startswith("cuda")
        options = {"num_cpus": 1 if replica_cpus is None else replica_cpus,
                   "num_gpus": (1 if gpu else 0) if replica_gpus is None else replica_gpus,
                   "max_concurrency": 1000, "max_restarts": 0}
        actor = ray.remote(Replica)
        self.actors = [actor.options(**options).remote(i, boot) for i in range(replicas)]
        self.size = replicas
        self.dead: dict = {}                                 # replica -> why it is gone
        self.procs = [dict() for _ in range(replicas)]       # replica -> {local pid: tid}, not yet reaped
        self.tenants: set = set()
        self.shm: dict = {}                                  # cluster shmid -> {replica: local shmid}
        self.logs: dict = {}                                 # tid -> MergedLog (aggregate.py)
        self.lock = threading.RLock()
        self.pending: dict = {}                              # (replica, local pid) -> [watch registrations]
        self.watch_ids = itertools.count(1)
        self.shm_ids = itertools.count(1)
        self.turn = itertools.count()
        try:                                                 # their kernels boot: a bad option fails here
            for i, out in enumerate(ray.get([a.ping.remote() for a in self.actors])):
                assert out == i
        except BaseException:
            self.close_ray()
            raise
        log.info("%d replicas started on Ray (router %s)", replicas, router)

    # -- calls -----------------------------------------------------------------------------------------
    def live(self) -> list:
        return [r for r in range(self.size) if r not in self.dead]

    def mark_dead(self, replica: int, err) -> None:
        with self.lock:
            if replica in self.dead:
                return
            self.dead[replica] = str(err).splitlines()[0] if str(err) else type(err).__name__
        log.error("replica %d is gone (%s); its processes exit with EIO, new work goes to the others",
                  replica, self.dead[replica])

    def dead_error(self, replica: int) -> KvosError:
        return KvosError(EIO, f"replica {replica} died ({self.dead.get(replica, 'gone')})")

    def submit(self, replica: int, tid, name: str, kwargs: dict):
        """Start one syscall on a replica -> its ObjectRef (collect() it)."""
        return self.actors[replica].call.remote(tid, name, kwargs)

    def collect(self, replica: int, ref):
        """The result of a submitted call, its error raised; EIO if the replica died."""
        try:
            out = self.ray.get(ref)
        except self.RayActorError as err:
            self.mark_dead(replica, err)
            raise self.dead_error(replica) from None
        if out[0] == "ok":
            return out[1]
        if out[0] == "panic":
            raise KernelPanic(f"replica {replica}: {out[1]}")
        raise KvosError(out[1], out[2])

    def call(self, replica: int, tid, name: str, kwargs: dict):
        if replica in self.dead:
            raise self.dead_error(replica)
        return self.collect(replica, self.submit(replica, tid, name, kwargs))

    def everywhere(self, tid, name: str, kwargs: dict) -> dict:
        """The call on every live replica at once -> {replica: result or KvosError}."""
        refs = {r: self.submit(r, tid, name, kwargs) for r in self.live()}
        out = {}
        for r, ref in refs.items():
            try:
                out[r] = self.collect(r, ref)
            except KvosError as err:
                out[r] = err
        return out

    def any_replica(self) -> int:
        """A live replica, taking turns (tokenize, tenantinfo, uname: any replica answers the same)."""
        live = self.live()
        if not live:
            raise KvosError(EIO, "every replica has died")
        return live[next(self.turn) % len(live)]

    def route(self, tid, prompt) -> int:
        """The replica the router picks for a new process of `tid`."""
        live = self.live()
        if not live:
            raise KvosError(EIO, "every replica has died")
        with self.lock:
            loads = {r: len(self.procs[r]) for r in live}
        return self.router.choose(tid, prompt, live, loads)

    def started(self, replica: int, tid, local_pids) -> list:
        with self.lock:
            for pid in local_pids:
                self.procs[replica][pid] = tid
        return [gpids.to_global(replica, pid) for pid in local_pids]

    def reaped(self, replica: int, local_pid: int) -> None:
        with self.lock:
            self.procs[replica].pop(local_pid, None)

    # -- what kvosd asks of a kernel ------------------------------------------------------------------
    def syscalls(self, as_tenant=None):
        from userspace.cluster.handle import ClusterHandle
        return ClusterHandle(self, as_tenant)

    def shutdown(self, kill: bool = False, timeout: float | None = None) -> dict:
        """Stop every live replica's kernel (each frees everything and runs fsck). -> {replica: report}
        Raises KernelPanic if one found its memory broken. The actors stay (meminfo still answers,
        as a kernel's does after shutdown) until close()."""
        refs = {r: self.actors[r].shutdown.remote(kill, timeout) for r in self.live()}
        reports = {}
        for r, ref in refs.items():
            try:
                reports[r] = self.ray.get(ref)
            except self.RayActorError as err:
                self.mark_dead(r, err)
        broken = {r: rep["fsck"] for r, rep in reports.items() if rep["fsck"] != "clean"}
        if broken:
            raise KernelPanic(f"replicas at shutdown: {broken}")
        return reports

    def close(self) -> None:
        """End the actors (and the Ray instance, if this cluster started it)."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.close_ray()

    def close_ray(self) -> None:
        if self.started_ray:
            self.ray.shutdown()
            self.started_ray = False
