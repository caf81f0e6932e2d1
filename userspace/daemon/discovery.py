"""Finding a running kvosd: named by a URL, by $KVOS_URL, or the one whose runtime file is here.

connect(url, key) returns a Client. A key comes from the argument, $KVOS_KEY, or the root key a
local daemon leaves in its runtime file (mode 0600: readable by the user who started it).
"""
from __future__ import annotations

import os
from urllib.parse import urlsplit


class NoDaemon(ConnectionError):
    """No kvosd was named and none is running on this machine."""


def local_key(url: str) -> str | None:
    """The root key a live daemon on this machine left for `url`, if there is one we may read."""
    from userspace.daemon import runtime
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    info = runtime.live(runtime.runtime_file(parts.port or (443 if parts.scheme == "https" else 80)))
    return None if info is None else info.get("root_key")


def find_daemon(url: str | None = None) -> tuple[str, str | None]:
    """(url, root key or None) of the kvosd to talk to: `url`, else $KVOS_URL, else the one live
    kvosd whose runtime file is on this machine (stale files, whose daemon is dead, are skipped).
    NoDaemon when there is none; EINVAL when there are several and none was named."""
    from kernel.errors import EINVAL, KvosError
    from userspace.daemon import runtime
    url = url or os.environ.get("KVOS_URL")
    if url:
        url = url if "://" in url else f"http://{url}"
        return url, local_key(url)
    found = runtime.running()
    if len(found) == 1:
        return found[0]["url"], found[0].get("root_key")
    if not found:
        raise NoDaemon(f"no kvosd is running on this machine (no live runtime file in {runtime.runtime_dir()}): "
                       "start one with `kvos serve`, or name one with --url URL (or $KVOS_URL)")
    raise KvosError(EINVAL, f"{len(found)} kvosd are running on this machine "
                            f"({', '.join(info['url'] for info in found)}): choose one with --url")


def connect(url: str | None = None, key: str | None = None):
    """A Client for a running kvosd (find_daemon: url, $KVOS_URL, or the one local daemon); key from
    the argument, $KVOS_KEY, or the local daemon's runtime file (then it acts as root)."""
    from userspace.daemon.client import Client
    url, root_key = find_daemon(url)
    return Client(url, key or os.environ.get("KVOS_KEY") or root_key)
