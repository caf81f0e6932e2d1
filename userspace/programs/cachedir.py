"""The user cache folder where model files and their converted forms live.

$KVOS_CACHE_DIR, else $XDG_CACHE_HOME/kvos, else ~/.cache/kvos. Writers put a
file or folder in place with one rename, so a reader never sees half of one.
File digests (sha256) are remembered by (path, size, mtime) so a large model
file is hashed once, not at every load.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("KVOS_CACHE_DIR"):
        return Path(os.environ["KVOS_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "kvos"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 hex of a file, from the memo when its size and mtime are unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    memo_path = cache_dir() / "digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_file(path)
    memo[str(path)] = {"stamp": stamp, "sha256": digest}
    try:
        write_atomic(memo_path, json.dumps(memo).encode())
    except OSError:
        pass    # a read-only cache only costs a re-hash next time
    return digest


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place. Callers write one only after reading `final` failed
    (absent, stale or damaged), so a folder already there is moved aside and removed, not kept: a
    rename cannot replace a non-empty folder, and keeping it would mean converting on every load. Two
    processes converting at once each publish a whole folder; the last one stays."""
    old = final.with_name(f".{final.name}.{os.getpid()}.old")
    if final.is_dir():
        try:
            os.replace(final, old)
        except OSError:
            pass        # gone meanwhile (another process moved it): publish below
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
