"""Client: the syscall handle over HTTP, for code that talks to a running kvosd.

Client(url, key) has the methods of kernel.syscalls(...) -- generated from the
same table, binding arguments as the local handle does -- and returns the same
dataclasses, raising KvosError with the server's errno. libc and the shell's
views take either. Each thread keeps its own keep-alive connection.
"""
from __future__ import annotations

import http.client
import inspect
import json
import threading
import time
from urllib.parse import urlsplit

from kernel.errors import EINVAL, EIO, ERRNOS, KernelPanic, KvosError
from kernel.syscalls import SYSCALLS, install_syscall_methods
from userspace.daemon import wire

IDLE_RECONNECT = 20.0        # seconds; the daemon keeps idle connections 30 s


class DaemonUnreachable(ConnectionError):
    """Nothing answers at the URL (no daemon running, wrong port), or the connection broke."""


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", key: str | None = None, timeout: float = 60.0):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise KvosError(EINVAL, f"not an http(s) URL: {url!r}")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self.key = key
        self.timeout = timeout               # for calls that do not wait; waiting calls add their own
        self._conn_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._host, self._port = parts.hostname, parts.port
        self._local = threading.local()
        self._conns: set = set()             # every thread's connection, so close() reaches them all
        self._conns_lock = threading.Lock()
        self._whoami = None

    # -- who this key is ----------------------------------------------------------------------------
    @property
    def tid(self):
        """The tenant this key acts as, None for root (as SyscallHandle.tid)."""
        return self.whoami()["tid"]

    def whoami(self) -> dict:
        if self._whoami is None:
            self._whoami = self.request("GET", "/whoami")
        return self._whoami

    # -- calls ----------------------------------------------------------------------------------------------
    def _call(self, name: str, args, kwargs):
        sc = SYSCALLS[name]
        signature = sc.signature
        try:
            bound = signature.bind(None, None, *args, **kwargs)
        except TypeError as err:
            raise KvosError(EINVAL, f"{name}: {err}") from None
        body = {}
        for pname, value in list(bound.arguments.items())[2:]:
            if signature.parameters[pname].kind is inspect.Parameter.VAR_KEYWORD:
                body.update(value)
            else:
                body[pname] = value
        timeout = self.timeout
        if sc.blocking:                  # the server may wait this long before it answers
            waits = body.get("timeout", 0.0 if name == "read" else None)
            timeout = None if waits is None else self.timeout + float(waits)
        return wire.rebuild(name, self.request("POST", f"/sys/{name}", body, timeout)["result"])

    def request(self, method: str, path: str, body=None, timeout: float | None = -1):
        """One HTTP exchange -> the decoded JSON answer; errors as KvosError / KernelPanic."""
        if timeout == -1:
            timeout = self.timeout
        try:
            data = None if body is None else json.dumps(body).encode()
        except (TypeError, ValueError) as err:
            raise KvosError(EINVAL, f"{path}: arguments are not JSON: {err}") from None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        for attempt in (0, 1):
            conn, reused = self._connection(timeout)
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as err:
                self._drop()
                if reused and attempt == 0:      # the daemon closed an idle connection: once more, fresh
                    continue
                raise DaemonUnreachable(f"kvosd at {self.url}: connection lost ({err})") from None
            except TimeoutError:
                self._drop()
                raise DaemonUnreachable(f"kvosd at {self.url}: no answer within {timeout} s") from None
            except OSError as err:
                self._drop()
                raise DaemonUnreachable(f"kvosd at {self.url}: {err.strerror or err}") from None
            self._local.used_at = time.monotonic()
            return _decode(resp.status, payload)

    def _connection(self, timeout):
        conn = getattr(self._local, "conn", None)
        idle = time.monotonic() - getattr(self._local, "used_at", 0.0)
        if conn is not None and idle > IDLE_RECONNECT:
            self._drop()
            conn = None
        reused = conn is not None
        if conn is None:
            conn = self._local.conn = self._conn_class(self._host, self._port, timeout=timeout)
            with self._conns_lock:
                self._conns.add(conn)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn, reused

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            with self._conns_lock:
                self._conns.discard(conn)
        self._local.conn = None

    def close(self) -> None:
        """Close the connections of every thread that used this client."""
        with self._conns_lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            conn.close()
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"Client({self.url!r})"


def _decode(status: int, payload: bytes):
    try:
        body = json.loads(payload) if payload else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if 200 <= status < 300 and body is not None:
        return body
    if isinstance(body, dict) and body.get("panic"):
        raise KernelPanic(body.get("message", "kernel panic"))
    if isinstance(body, dict) and body.get("errno") in ERRNOS:
        raise KvosError(body["errno"], body.get("message", ""))
    text = payload[:200].decode("utf-8", "replace")
    raise KvosError(EIO, f"kvosd answered HTTP {status}: {text}")


install_syscall_methods(Client)
