"""Runtime files: how a kvosd tells local clients where it is and what its root key is.

A daemon on port P writes kvosd-P.json (mode 0600: the root key is in it) into $XDG_RUNTIME_DIR,
else ~/.cache/kvos, and removes it when it stops. A daemon killed with SIGKILL leaves its file
behind: a file whose pid is no longer alive is stale, and clients skip it; the next daemon on
that port removes it. `kvos ps` and friends find the running daemons by scanning these files.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("kvosd")

PREFIX, SUFFIX = "kvosd-", ".json"


def runtime_dir() -> Path:
    return Path(os.environ.get("XDG_RUNTIME_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kvos"))


def runtime_file(port: int) -> Path:
    """Where a daemon on this port leaves its url and root key for local clients (mode 0600)."""
    return runtime_dir() / f"{PREFIX}{port}{SUFFIX}"


def pid_alive(pid) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:           # alive, another user's
        return True
    except OSError:
        return False
    return True


def read(path: Path) -> dict | None:
    """The file's {url, pid, root_key}, or None when it is missing, unreadable or not ours."""
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("url"), str):
        return None
    return info


def live(path: Path) -> dict | None:
    """read(path) if the daemon that wrote it is still running, else None (a stale file)."""
    info = read(path)
    return info if info is not None and pid_alive(info.get("pid")) else None


def running() -> list:
    """Every live local daemon's {url, pid, root_key, port}, by port."""
    found = []
    try:
        paths = sorted(runtime_dir().glob(f"{PREFIX}*{SUFFIX}"))
    except OSError:
        return []
    for path in paths:
        port = path.name[len(PREFIX):-len(SUFFIX)]
        info = live(path)
        if info is not None and port.isdigit():
            found.append({**info, "port": int(port)})
    return sorted(found, key=lambda info: info["port"])


def claim(port: int, url: str, root_key: str) -> Path | None:
    """Write this daemon's file for `port` -> its path, or None if it was not written. A stale file
    (its daemon is dead) is replaced, with a note; a live one is another daemon's (on another
    address, same port): it is left alone and local clients will find that one."""
    path = runtime_file(port)
    old = read(path)
    if old is not None and old.get("pid") != os.getpid():
        if pid_alive(old.get("pid")):
            log.warning("%s belongs to a running kvosd (pid %s, %s); local clients will find that one, "
                        "not this one", path, old.get("pid"), old.get("url"))
            return None
        log.info("removed a stale %s (its kvosd, pid %s, is gone)", path, old.get("pid"))
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"url": url, "pid": os.getpid(), "root_key": root_key}, f)
        os.replace(temp, path)            # readers see the whole file or none of it
    except OSError as err:
        log.warning("could not write %s: %s", path, err.strerror)
        return None
    return path


def release(path: Path | None) -> None:
    """Remove the file this daemon wrote, if it is still this daemon's."""
    if path is None:
        return
    info = read(path)
    if info is not None and info.get("pid") == os.getpid():
        with contextlib.suppress(OSError):
            path.unlink()
