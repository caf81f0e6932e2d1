"""The two error channels of kvos.

KvosError: a request the kernel refuses (bad argument, no such pid, no room).
It carries an errno-style code and a one-line reason; the call that raised it
changed nothing. KernelPanic: an invariant of the kernel is broken; this is a
bug in kvos, never the caller's fault.
"""
import errno as _errno

EINVAL = "EINVAL"   # bad argument
ESRCH = "ESRCH"     # no such process, tenant or segment
ENOMEM = "ENOMEM"   # the request can never fit
EPERM = "EPERM"     # a tenant touching what is not its own
EAGAIN = "EAGAIN"   # a limit is reached for now (process count, queue length)
EBUSY = "EBUSY"     # the object is in use (an attached shm segment)
ENOENT = "ENOENT"   # no such model or file
EIO = "EIO"         # a model file is corrupt or a device failed
ENODEV = "ENODEV"   # the device is not available here
E2BIG = "E2BIG"     # a request beyond a configured limit (prompt or output length)

ERRNOS = (EINVAL, ESRCH, ENOMEM, EPERM, EAGAIN, EBUSY, ENOENT, EIO, ENODEV, E2BIG)


class KvosError(Exception):
    """A refused request: `errno` is one of ERRNOS, `reason` says why in one line."""

    def __init__(self, errno: str, reason: str):
        if errno not in ERRNOS:
            raise KernelPanic(f"KvosError: unknown errno {errno!r}")
        super().__init__(f"{errno}: {reason}")
        self.errno = errno
        self.reason = reason

    @property
    def code(self) -> int:
        """The numeric POSIX value of the errno, for exit statuses and HTTP bodies."""
        return getattr(_errno, self.errno)

    def to_dict(self) -> dict:
        return {"errno": self.errno, "code": self.code, "message": self.reason}


class KernelPanic(RuntimeError):
    """A broken kernel invariant ("function: what broke")."""
