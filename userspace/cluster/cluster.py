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

from kernel.errors import EINVAL, EIO, ENODEV, KernelPanic, KvosError
from kernel.pagename import chain_names
from userspace.cluster import pids as gpids
from userspace.cluster.replica import Replica
from userspace.cluster.router import Router

log = logging.getLogger("kvosd")

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPORT_SECONDS = 0.25        # how often the replicas' loads (and, for prefix_events, cache events) are read
PREFIX_POLICIES = ("cache_aware", "prefix_events")      # they need the prompt's token ids


class Cluster:
    def __init__(self, replicas: int, boot: dict, router: str = "cache_aware", address: str | None = None,
                 replica_cpus: float | None = None, replica_gpus: float | None = None):
        import ray
        from ray.exceptions import RayActorError
        if not 1 <= replicas <= gpids.MAX_REPLICAS:
            raise KvosError(EINVAL, f"replicas must be in [1, {gpids.MAX_REPLICAS}], got {replicas}")
        self.ray, self.RayActorError = ray, RayActorError
        self.namespaces: dict = {}                           # tid -> (its page namespace, page size)
        options = {"namer": self.page_names} if router == "prefix_events" else {}
        self.router = Router(replicas, router, **options)
        self.router_name = router
        self.started_ray = False
        if not ray.is_initialized():
            local = address is None
            # Local mode: one Ray instance on this machine, as many CPUs as replicas at least (Ray counts
            # them for placement only); its workers import kvos from where this process does. Past this
            # machine (--address), kvos must be installed on every node.
            options = {"runtime_env": {"env_vars": {"PYTHONPATH": os.pathsep.join(
                p for p in (SOURCE_ROOT, os.environ.get("PYTHONPATH")) if p)}}} if local else {}
            try:
                ray.init(address=address, num_cpus=max(replicas, os.cpu_count() or 1) if local else None,
                         include_dashboard=False, log_to_driver=False, **options)
            except ConnectionError as exc:       # an OSError: the daemon would report it as a port it cannot bind
                raise KvosError(ENODEV, f"cannot join the Ray cluster at {address}: {exc}. A cluster started with "
                                        "token authentication (recent Ray's default for `ray start`) needs "
                                        "RAY_AUTH_MODE=token and its token (~/.ray/auth_token or "
                                        "$RAY_AUTH_TOKEN) in this process's environment") from None
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
        self.event_cursor = [0] * replicas                   # the last cache event seen, per replica
        self.stopping = threading.Event()
        try:                                                 # their kernels boot: a bad option fails here
            for i, out in enumerate(ray.get([a.ping.remote() for a in self.actors])):
                assert out == i
        except BaseException:
            for a in self.actors:
                ray.kill(a)
            self.close_ray()
            raise
        self.reporter = threading.Thread(target=self._reports, name="cluster-reports", daemon=True)
        self.reporter.start()
        log.info("%d replicas started on Ray (router %s)", replicas, router)

    def _reports(self) -> None:
        """Every REPORT_SECONDS: each replica's running + waiting to the router (it also counts what
        it sent), and for prefix_events its page-cache events; a replica that does not answer is dead."""
        while not self.stopping.wait(REPORT_SECONDS):
            try:
                live = self.live()
                stats = {r: self.submit(r, None, "schedstat", {}) for r in live}     # all at once
                if self.router_name == "prefix_events":
                    events = {r: self.submit(r, None, "cacheevents", {"since": self.event_cursor[r]}) for r in live}
                for r in live:
                    try:
                        stat = self.collect(r, stats[r])
                        with self.lock:
                            self.router.update_load(r, stat.running, stat.waiting)
                        if self.router_name == "prefix_events":
                            fresh = self.collect(r, events[r])
                            if fresh:
                                self.event_cursor[r] = fresh[-1].seq
                                with self.lock:
                                    self.router.apply_events(r, fresh)
                    except KvosError:         # it died (mark_dead has run)
                        continue
            except Exception:                 # noqa: BLE001 -- Ray itself has gone (close()), or a bug
                if self.stopping.is_set():
                    return
                log.exception("reading the replicas' loads failed")

    def page_names(self, tid, token_ids):
        """prefix_events' namer: the names every replica gives the prompt's full pages (the tenant's
        salt is the same on all of them), and the page size."""
        if tid not in self.namespaces:
            raise KvosError(EINVAL, f"no page namespace known for tenant {tid}")
        namespace, size = self.namespaces[tid]
        return [n.hex() for n in chain_names(namespace, token_ids, size)], size

    # -- calls -----------------------------------------------------------------------------------------
    def live(self) -> list:
        return [r for r in range(self.size) if r not in self.dead]

    def mark_dead(self, replica: int, err) -> None:
        with self.lock:
            if replica in self.dead:
                return
            self.dead[replica] = str(err).splitlines()[0] if str(err) else type(err).__name__
            self.router.mark_dead(replica)
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

    def route(self, handle, tid, prompt) -> int:
        """The replica the router picks for a new process of `tid`. The prefix policies match token
        ids: a prompt given as text or a chat is tokenized first (a round trip to a replica)."""
        if not self.live():
            raise KvosError(EIO, "every replica has died")
        tokens = []
        if self.router_name in PREFIX_POLICIES:
            if isinstance(prompt, list) and all(type(t) is int for t in prompt):
                tokens = prompt
            else:
                tokens = self.call(self.any_replica(), handle.tid, "tokenize", {"tid": tid, "prompt": prompt})
        with self.lock:
            return self.router.route(tid, tokens)

    def started(self, replica: int, tid, local_pids) -> list:
        with self.lock:
            for pid in local_pids:
                self.procs[replica][pid] = tid
                self.router.on_dispatch(replica)
        return [gpids.to_global(replica, pid) for pid in local_pids]

    def reaped(self, replica: int, local_pid: int) -> None:
        with self.lock:
            if self.procs[replica].pop(local_pid, None) is not None and replica not in self.dead:
                self.router.on_finish(replica)

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
        self.stopping.set()
        self.reporter.join(timeout=5)
        for actor in self.actors:
            self.ray.kill(actor)
        self.close_ray()

    def close_ray(self) -> None:
        if self.started_ray:
            self.ray.shutdown()
            self.started_ray = False
