"""The syscall table: the one door from userspace into the kernel.

SYSCALLS (kernel/systable.py) maps each name to its handler, in two halves: a
prepare half in the caller's context and a handler in kernel mode (see there).
The handlers live by subject in sysproc.py, systenant.py and sysinfo.py.
SyscallHandle runs a call through both halves; the daemon's HTTP routes, its
OpenAPI and its client are generated from the same table, so every syscall exists
in process and over the wire at once. Userspace holds handles and nothing else of
the kernel; model programs are the one other door (kernel/program.py: the ABI).
"""
from __future__ import annotations

from kernel import sysinfo, sysproc, systenant  # noqa: F401  (each registers its syscalls)
from kernel.argcheck import proc_of, tenant_of
from kernel.errors import EAGAIN, EINVAL, EPERM, ESRCH, KvosError
from kernel.systable import SYSCALLS, Syscall, syscall  # noqa: F401  (the table's public names)
from kernel.watch import watch

# Calls a kernel without a tenant yet can answer (the pool is sized by the first tenant).
_BEFORE_FIRST_TENANT = frozenset({"spawn_tenant", "ps", "meminfo", "schedstat", "dmesg", "trace", "loopctl",
                                  "uname", "fsck"})


class SyscallHandle:
    """kernel.syscalls(as_tenant=None): root, or a handle that sees and touches one tenant's things."""

    def __init__(self, kernel, as_tenant=None):
        self._kernel = kernel
        self._tenant = None
        if as_tenant is not None:
            with kernel.lock:
                self._tenant = tenant_of(kernel, None, as_tenant)

    @property
    def tid(self):
        return None if self._tenant is None else self._tenant.tid

    @property
    def alive(self) -> bool:
        """Root's handle always; a tenant's while its tenant exists (kill_tenant ends it)."""
        return self._tenant is None or self._tenant.alive

    def atomic(self):
        """A context in which no kernel step runs between this handle's syscalls (a loop thread
        waits for it): spawn then fork gives children that share only the prompt, whatever the
        loop does. Blocking calls (wait, read with a timeout) inside it let the loop run."""
        return self._kernel.lock

    def watch(self, pid, callback, events=("output", "turn", "exit")):
        """Call callback() once, from the kernel's thread, at the next of `events` of process `pid`
        ("output": a token; "turn": its turn ended; "exit"): the asynchronous form of read (all
        three) and wait (turn and exit), for the daemon, which awaits an event the callback sets
        instead of holding a thread. The callback must only signal. A watch counts as a blocking
        call of the tenant (EAGAIN beyond max_blocked) until cancel() -- which takes no lock and
        must be called once, whether or not it fired."""
        kernel = self._kernel
        proc = proc_of(kernel, self._tenant, pid)
        if not set(events) <= {"output", "turn", "exit"} or not events:
            raise KvosError(EINVAL, f"events must be some of output, turn, exit; got {events!r}")
        release = kernel.blocking.begin(self._tenant)
        unwatch = watch(proc, callback, events)

        def cancel():
            unwatch()
            release()
        return cancel

    def _call(self, name: str, args, kwargs):
        sc: Syscall = SYSCALLS[name]
        kernel = self._kernel
        if sc.root_only and self._tenant is not None:
            raise KvosError(EPERM, f"{name}: only root may call it")
        if self._tenant is not None and not self._tenant.alive:
            raise KvosError(ESRCH, f"tenant {self._tenant.tid} no longer exists")
        try:
            sc.binder(*args, **kwargs)
        except TypeError as err:
            raise KvosError(EINVAL, f"{name}: {str(err).removeprefix(name + '() ')}") from None
        if kernel.mm is None and name not in _BEFORE_FIRST_TENANT:
            raise KvosError(ESRCH, f"{name}: no tenant exists yet")
        if sc.new_work and not kernel.accepting:
            raise KvosError(EAGAIN, f"{name}: the kernel is shutting down")
        if sc.prepare is not None:               # the caller's half, before any lock is taken
            prepared = sc.prepare(kernel, self._tenant, *args, **kwargs)
            args, kwargs = (kernel, self._tenant), prepared
        else:
            args = (kernel, self._tenant, *args)
        if sc.blocking or not sc.locked:
            result = sc.handler(*args, **kwargs)
        else:
            with kernel.lock:
                if sc.new_work and not kernel.accepting:
                    raise KvosError(EAGAIN, f"{name}: the kernel is shutting down")
                result = sc.handler(*args, **kwargs)
                if sc.new_work:
                    kernel.changed.notify_all()          # a loop thread waiting for work wakes up
        return result if sc.finish is None else sc.finish(result)


def install_syscall_methods(cls) -> None:
    """Give cls one method per syscall, each calling cls._call(name, args, kwargs): the Python
    handle here, the daemon's client over HTTP; both keep the table's names and docs."""
    def method(sc: Syscall):
        def call(self, *args, **kwargs):
            return self._call(sc.name, args, kwargs)
        call.__name__ = sc.name
        call.__doc__ = sc.doc
        return call

    for sc in SYSCALLS.values():
        setattr(cls, sc.name, method(sc))


install_syscall_methods(SyscallHandle)
