"""ClusterHandle: a syscall handle whose kernel is N replicas.

It has the methods of kernel.syscalls(...) (generated from the same table, arguments bound the
same way) plus watch() and atomic(), the two in-process extras kvosd's server uses, so the
server, libc and the shell's views take it unchanged. Each syscall goes where its subject is:

- a pid's calls (read, wait, kill, write, fork, nice, pagemap) to the replica the pid names
  (pids.py); a replica that died answers for it here: its processes have exited with EIO;
- spawn and spawn_n where the router says (router.py; it hears of each process started and
  reaped, and of each replica's load); a shm id names one segment per replica, so a
  spawn that attaches one attaches that replica's;
- spawn_tenant, kill_tenant, shmget, shmrm, loopctl and fsck to every replica;
- ps, meminfo, schedstat, dmesg, cacheevents and trace merged (aggregate.py), each row with
  its replica;
- tenantinfo, tokenize, detokenize and uname to any replica (all run the same models).
"""
from __future__ import annotations

import contextlib
import inspect
import secrets

from kernel import results as r
from kernel.errors import EINVAL, EIO, EPERM, ESRCH, KvosError
from kernel.syscalls import SYSCALLS, install_syscall_methods
from userspace.cluster import aggregate
from userspace.cluster import pids as gpids

BY_PID = ("read", "wait", "kill", "write", "fork", "nice", "pagemap")
ANY = ("tenantinfo", "tokenize", "detokenize", "uname")


class ClusterHandle:
    def __init__(self, cluster, as_tenant=None):
        if as_tenant is not None and as_tenant not in cluster.tenants:
            raise KvosError(ESRCH, f"no tenant {as_tenant}")
        self.cluster = cluster
        self._tid = as_tenant

    @property
    def tid(self):
        return self._tid

    @property
    def alive(self) -> bool:
        return self._tid is None or self._tid in self.cluster.tenants

    def atomic(self):
        """In one kernel, no step runs between the calls in this context. Across replicas there is
        no such moment; each spawn_n is still atomic on its replica (spawn then fork)."""
        return contextlib.nullcontext()

    # -- the table ----------------------------------------------------------------------------------
    def _call(self, name: str, args, kwargs):
        sc = SYSCALLS[name]
        try:
            bound = sc.signature.bind(None, None, *args, **kwargs)
        except TypeError as err:
            raise KvosError(EINVAL, f"{name}: {str(err)}") from None
        body = {}
        for pname, value in list(bound.arguments.items())[2:]:
            if sc.signature.parameters[pname].kind is inspect.Parameter.VAR_KEYWORD:
                body.update(value)
            else:
                body[pname] = value
        if self._tid is not None and self._tid not in self.cluster.tenants:
            raise KvosError(ESRCH, f"tenant {self._tid} no longer exists")
        if name in BY_PID:
            return self._by_pid(name, body)
        if name in ANY:
            return self.cluster.call(self.cluster.any_replica(), self._tid, name, body)
        return getattr(self, f"_{name}")(body)

    # -- a process's calls: to its replica ---------------------------------------------------------
    def _by_pid(self, name, body):
        cluster = self.cluster
        gpid = body["pid"]
        replica, local = gpids.split(gpid, cluster.size)
        self._registered(replica, local)
        if replica in cluster.dead:
            return self._dead(replica, local, gpid, name)
        try:
            result = cluster.call(replica, self._tid, name, {**body, "pid": local})
        except KvosError as err:
            if err.errno == ESRCH and name == "wait":        # reaped by another wait, or never there
                cluster.reaped(replica, local)
            if replica in cluster.dead:                       # it died during the call
                return self._dead(replica, local, gpid, name)
            raise
        if name == "fork":
            return cluster.started(replica, self._proc_tid(replica, local), result)
        if name == "wait":
            cluster.reaped(replica, local)
        if isinstance(result, (r.ReadResult, r.ExitStatus)):
            result.pid = gpid
        return result

    def _proc_tid(self, replica, local):
        with self.cluster.lock:
            return self.cluster.procs[replica].get(local, self._tid)

    def _dead(self, replica, local, gpid, name):
        """What a process of a replica that died answers: it exited with EIO (a read sees its turn
        end, a wait reaps it once); nothing else can be done to it."""
        cluster = self.cluster
        with cluster.lock:
            if local not in cluster.procs[replica]:
                raise KvosError(ESRCH, f"no process {gpid}")
            owner = cluster.procs[replica][local]
        if self._tid is not None and owner != self._tid:
            raise KvosError(EPERM, f"process {gpid} belongs to another tenant")
        error = f"{EIO}: replica {replica} died ({cluster.dead[replica]})"
        if name == "read":
            return r.ReadResult(gpid, [], "", "zombie", True, "error")
        if name == "wait":
            cluster.reaped(replica, local)
            return r.ExitStatus(gpid, "error", [], "", 0, error=error)
        if name == "kill":
            return None
        raise cluster.dead_error(replica)

    # -- watches: kvosd's waits without a thread (userspace/daemon/waiting.py) --------------------------
    def watch(self, pid, callback, events=("output", "turn", "exit")):
        """Call callback() once, from a Ray thread, at the next of `events` of process `pid` (or when
        its replica dies). Registration travels to the replica while the caller goes on; the next
        call on that pid waits for it first, so no event between the two is missed."""
        cluster = self.cluster
        replica, local = gpids.split(pid, cluster.size)
        if not set(events) <= {"output", "turn", "exit"} or not events:
            raise KvosError(EINVAL, f"events must be some of output, turn, exit; got {events!r}")
        if replica in cluster.dead:
            callback()
            return _nothing
        actor = cluster.actors[replica]
        wid = next(cluster.watch_ids)
        registration = actor.watch.remote(wid, self._tid, local, list(events))
        fired = actor.fired.remote(wid)
        key = (replica, local)
        with cluster.lock:
            cluster.pending.setdefault(key, []).append(registration)
        cancelled = []

        def done(_future):
            if not cancelled:
                callback()
        fired.future().add_done_callback(done)

        def cancel():
            cancelled.append(True)
            with cluster.lock:
                waiting = cluster.pending.get(key, [])
                if registration in waiting:
                    waiting.remove(registration)
                if not waiting:
                    cluster.pending.pop(key, None)
            if replica not in cluster.dead:
                actor.unwatch.remote(wid)
        return cancel

    def _registered(self, replica, local) -> None:
        """Wait for the watches on this process that are still travelling. A refused one (EAGAIN past
        the tenant's max_blocked, ESRCH, EPERM) is this call's refusal, as an in-process watch()
        raises it at once; waiting.py then cancels it (else a refused watch would wake its waiter
        at once, over and over)."""
        with self.cluster.lock:
            waiting = list(self.cluster.pending.get((replica, local), ()))
        for ref in waiting:
            if replica not in self.cluster.dead:
                self.cluster.collect(replica, ref)

    # -- new processes: where the router says --------------------------------------------------------
    def _spawn(self, body):
        return self._place("spawn", body)[0]

    def _spawn_n(self, body):
        return self._place("spawn_n", body)

    def _place(self, name, body):
        cluster = self.cluster
        tid = body.get("tid")
        shm = body.get("shm")
        while True:
            replica = cluster.route(self, tid, body.get("prompt"))
            args = dict(body)
            if shm is not None:
                args["shm"] = self._local_shm(shm, replica)
            try:
                out = cluster.call(replica, self._tid, name, args)
            except KvosError:
                if replica in cluster.dead:              # it died before it took the work: another one
                    continue
                raise
            return cluster.started(replica, tid, [out] if name == "spawn" else out)

    def _local_shm(self, shmid, replica):
        if isinstance(shmid, bool) or not isinstance(shmid, int):
            raise KvosError(EINVAL, f"shm must be an integer, got {shmid!r}")
        if shmid not in self.cluster.shm:
            raise KvosError(ESRCH, f"no shm segment {shmid}")
        segments = self.cluster.shm[shmid][1]
        if replica not in segments:
            raise KvosError(ESRCH, f"shm segment {shmid} is not on replica {replica}")
        return segments[replica]

    # -- everywhere --------------------------------------------------------------------------------------
    def _all(self, name, body) -> dict:
        """The call on every live replica; the first refusal raised (after the others answered)."""
        out = self.cluster.everywhere(self._tid, name, body)
        if not out:
            raise KvosError(EIO, "every replica has died")
        for value in out.values():
            if isinstance(value, KvosError):
                raise value
        return out

    def _spawn_tenant(self, body):
        """The tenant on every replica, with the same tid everywhere and the same cache salt (made up
        here unless given), so its page names agree across replicas -- and with no other tenant's;
        if one replica refuses, the tenant is removed from those that took it."""
        cluster = self.cluster
        if body.get("prefix_sharing", "tenant") != "global" and body.get("cache_salt") is None:
            body = {**body, "cache_salt": secrets.token_hex(16)}
        out = cluster.everywhere(self._tid, "spawn_tenant", body)
        tids = {v for v in out.values() if not isinstance(v, KvosError)}
        refused = [v for v in out.values() if isinstance(v, KvosError)]
        if refused or len(tids) != 1:
            for replica, tid in out.items():
                if not isinstance(tid, KvosError):
                    with contextlib.suppress(KvosError):
                        cluster.call(replica, self._tid, "kill_tenant", {"tid": tid})
            if refused:
                raise refused[0]
            raise KvosError(EIO, f"the replicas gave the tenant different tids ({sorted(tids)}): they have "
                                 f"drifted apart; the tenant was not started")
        (tid,) = tids
        info = cluster.call(cluster.any_replica(), self._tid, "tenantinfo", {"tid": tid})
        cluster.namespaces[tid] = (bytes.fromhex(info.page_namespace), info.page_size)
        cluster.tenants.add(tid)
        return tid

    def _kill_tenant(self, body):
        cluster = self.cluster
        self._all("kill_tenant", body)
        tid = body["tid"]
        cluster.tenants.discard(tid)
        cluster.namespaces.pop(tid, None)
        for replica, table in enumerate(cluster.procs):
            for pid in [p for p, t in list(table.items()) if t == tid]:
                cluster.reaped(replica, pid)
        with cluster.lock:
            for shmid in [s for s, (owner, _) in cluster.shm.items() if owner == tid]:
                del cluster.shm[shmid]

    def _shmget(self, body):
        out = self.cluster.everywhere(self._tid, "shmget", body)
        refused = [v for v in out.values() if isinstance(v, KvosError)]
        if refused or not out:
            for replica, local in out.items():           # undo it where it was made
                if not isinstance(local, KvosError):
                    with contextlib.suppress(KvosError):
                        self.cluster.call(replica, self._tid, "shmrm", {"shmid": local})
            raise refused[0] if refused else KvosError(EIO, "every replica has died")
        shmid = 1 + secrets.randbelow((1 << 31) - 2)
        while shmid in self.cluster.shm:
            shmid = 1 + secrets.randbelow((1 << 31) - 2)
        self.cluster.shm[shmid] = (body["tid"], out)     # the owner, and each replica's own segment
        return shmid

    def _shmrm(self, body):
        shmid = body["shmid"]
        if isinstance(shmid, bool) or not isinstance(shmid, int) or shmid not in self.cluster.shm:
            return self.cluster.call(self.cluster.any_replica(), self._tid, "shmrm", body)   # its refusal
        for replica, local in self.cluster.shm[shmid][1].items():
            if replica not in self.cluster.dead:
                self.cluster.call(replica, self._tid, "shmrm", {"shmid": local})
        del self.cluster.shm[shmid]

    def _loopctl(self, body):
        return aggregate.loop_status(self._gather("loopctl", body), self.cluster.dead)

    def _fsck(self, body):
        return aggregate.fsck(self._all("fsck", body))

    # -- merged views ------------------------------------------------------------------------------------
    def _gather(self, name, body) -> dict:
        out = self.cluster.everywhere(self._tid, name, body)
        for value in out.values():
            if isinstance(value, KvosError) and value.errno != EIO:
                raise value
        return {replica: value for replica, value in out.items() if not isinstance(value, KvosError)}

    def _ps(self, body):
        return aggregate.ps(self._gather("ps", body))

    def _meminfo(self, body):
        return aggregate.meminfo(self._gather("meminfo", body))

    def _schedstat(self, body):
        return aggregate.schedstat(self._gather("schedstat", body))

    def _dmesg(self, body):
        with self.cluster.lock:
            merged = self.cluster.logs.setdefault(("dmesg", self._tid), aggregate.MergedLog("dmesg"))
        return merged.read(self, body.get("since", 0), body.get("limit"))

    def _cacheevents(self, body):
        """Every replica's page-cache events, each with its replica, numbered by the gateway."""
        if self._tid is not None:
            raise KvosError(EPERM, "cacheevents: only root may call it")
        with self.cluster.lock:
            merged = self.cluster.logs.setdefault(("cacheevents", None), aggregate.MergedLog("cacheevents"))
        return merged.read(self, body.get("since", 0), body.get("limit"))

    def _trace(self, body):
        return aggregate.trace(self, body)

    def __repr__(self):
        who = "root" if self._tid is None else f"tenant {self._tid}"
        return f"ClusterHandle({who}, {self.cluster.size} replicas)"


def _nothing() -> None:
    pass


install_syscall_methods(ClusterHandle)
