"""kvosd against clients that send what they should not: every error in its route's shape, bodies
over the cap, JSON nested too deep, loose types, half-sent requests, too many connections, keys of
a killed tenant, and TLS. Each daemon runs in this process (ServerThread) on tiny-llama.
"""
import http.client
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

from kernel.errors import E2BIG, EAGAIN, EINVAL, ENOENT, EPERM, KvosError
from userspace.daemon.client import Client
from userspace.daemon.config import DaemonConfig, TenantSpec
from userspace.daemon.listen import ServerThread, check_tls, exposure_warning

ROOT, ALICE, BOB, CAROL = "root-key-limits", "alice-key-limits", "bob-key-limits", "carol-key-limits"
BIG = 10 * 1000 * 1000          # a 10 MB prompt


def config(**overrides):
    tenants = [TenantSpec("alice", "tiny-llama", ALICE), TenantSpec("bob", "tiny-llama", BOB),
               TenantSpec("carol", "tiny-llama", CAROL)]
    return DaemonConfig(boot=dict(device="cpu", memory="8MiB", swap="4MiB", threads=1), tenants=tenants,
                        root_key=ROOT, **overrides)


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


@pytest.fixture(scope="module")
def server(one_thread):
    srv = ServerThread(config(header_timeout=1.0))
    yield srv
    report = srv.stop(kill=True)
    assert report["fsck"] == "clean" and report["frames_mapped"] == 0


def address(srv):
    host, port = srv.url.split("://")[1].rsplit(":", 1)
    return host, int(port)


def call(srv, method, path, body=None, key=ALICE, raw=None, headers=None):
    """(status, headers, decoded JSON) of one request on its own connection."""
    conn = http.client.HTTPConnection(*address(srv), timeout=30)
    sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    conn.request(method, path, body=raw if raw is not None else (None if body is None else json.dumps(body)),
                 headers=sent)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.headers, json.loads(data)


def assert_errno(answer, path, errno):
    """The error is in the route's shape: OpenAI's under /v1, {errno, code, message} elsewhere."""
    if path.startswith("/v1"):
        assert set(answer) == {"error"} and answer["error"]["code"] == errno and answer["error"]["message"], answer
    else:
        assert set(answer) == {"errno", "code", "message"} and answer["errno"] == errno, answer
        assert answer["code"] == KvosError(errno, "").code


def test_unknown_routes_and_wrong_methods_answer_in_the_routes_shape(server):
    for path in ("/nowhere", "/sys/no_such_syscall", "/v1/embeddings", "/v1"):
        status, _, answer = call(server, "GET", path)
        assert status == 404, (path, answer)
        assert_errno(answer, path, ENOENT)
    for method, path, allowed in (("GET", "/sys/ps", "POST"), ("DELETE", "/v1/completions", "POST"),
                                  ("POST", "/healthz", "GET"), ("PUT", "/v1/models", "GET")):
        status, headers, answer = call(server, method, path, body={})
        assert status == 405 and allowed in headers["Allow"], (method, path, answer)
        assert_errno(answer, path, EINVAL)


def test_json_nested_too_deep_or_not_strict_is_400(server):
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in ("/sys/spawn", "/sys/ps", "/v1/completions", "/v1/chat/completions"):
        status, _, answer = call(server, "POST", path, raw=deep)
        assert status == 400, (path, answer)
        assert_errno(answer, path, EINVAL)
        assert "nested deeper than 64" in json.dumps(answer)
    nested_prompt = {"tid": 1, "prompt": json.loads("[" * 70 + "]" * 70)}
    status, _, answer = call(server, "POST", "/sys/spawn", nested_prompt)
    assert status == 400 and "nested deeper" in answer["message"]
    for raw, reason in ((b'{"tid": 1, "prompt": "hi", "temperature": NaN}', "NaN"),
                        (b'{"tid": 1, "prompt": "\\ud800"}', "lone surrogate"),
                        (b'{"tid": 1, "prompt": "hi", "seed": ' + b"9" * 5000 + b"}", "not valid JSON"),
                        (b'\xff\xfe{', "not valid JSON")):
        status, _, answer = call(server, "POST", "/sys/spawn", raw=raw)
        assert status == 400 and reason in answer["message"], answer


def test_openai_request_types_are_strict(server):
    chat = {"model": "alice", "messages": [{"role": "user", "content": "hi"}]}
    for field, value in (("max_tokens", True), ("stream", "yes"), ("n", 2.0), ("temperature", True),
                         ("seed", "7"), ("stream_options", {"include_usage": "true"}), ("presence_penalty", False)):
        status, _, answer = call(server, "POST", "/v1/chat/completions", {**chat, field: value})
        assert status == 400 and answer["error"]["code"] == EINVAL, (field, answer)
        assert field in answer["error"]["message"], (field, answer)
    status, _, answer = call(server, "POST", "/v1/chat/completions", {**chat, "temperature": 1, "max_tokens": 2,
                                                                      "top_p": 1, "presence_penalty": 0})
    assert status == 200 and answer["choices"][0]["finish_reason"] in ("length", "stop"), answer


def _stream(srv, out):
    """Bob streams a long completion; out["at"] gets the arrival time of each chunk."""
    conn = http.client.HTTPConnection(*address(srv), timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({
        "model": "bob", "prompt": "Keep going", "max_tokens": 2000, "ignore_eos": True, "stream": True}),
        headers={"Authorization": f"Bearer {BOB}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    out["status"] = resp.status
    out["conn"] = conn
    while not out.get("stop"):
        line = resp.fp.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            out.setdefault("at", []).append(time.monotonic())
    conn.sock.close()
    conn.close()


def _chunked(size):
    piece = b"x" * 65536
    yield b'{"tid": 1, "prompt": "'
    for _ in range(size // len(piece)):
        yield piece
    yield b'"}'


def test_a_body_over_the_cap_is_413_at_once_while_another_tenant_streams(server):
    out = {}
    streamer = threading.Thread(target=_stream, args=(server, out))
    streamer.start()
    deadline = time.monotonic() + 30
    while len(out.get("at", [])) < 5:
        assert time.monotonic() < deadline and streamer.is_alive(), out
        time.sleep(0.01)
    began = time.monotonic()
    for path, body in (("/v1/completions", {"model": "alice", "prompt": "x" * BIG}),
                       ("/sys/spawn", {"tid": 1, "prompt": "x" * BIG})):
        started = time.monotonic()
        status, _, answer = call(server, "POST", path, body)
        assert status == 413 and time.monotonic() - started < 5, (path, answer)
        assert_errno(answer, path, E2BIG)
        assert "4,194,304 bytes" in json.dumps(answer)
    # a body sent in chunks, with no Content-Length, is cut off once it passes the cap
    conn = http.client.HTTPConnection(*address(server), timeout=30)
    conn.request("POST", "/sys/spawn", body=_chunked(BIG), encode_chunked=True,
                 headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["errno"] == E2BIG
    conn.close()
    ended = time.monotonic()
    time.sleep(0.3)
    out["stop"] = True
    streamer.join(30)
    at = out["at"]
    assert out["status"] == 200
    assert any(began <= t <= ended for t in at) or ended - began < 0.5, "the stream stalled meanwhile"
    assert at[-1] > ended and max(b - a for a, b in zip(at, at[1:])) < 2.0, "the stream stalled"
    root = Client(server.url, ROOT)
    deadline = time.monotonic() + 10
    while root.ps() and time.monotonic() < deadline:        # the stream's process is killed and reaped
        time.sleep(0.02)
    assert not root.ps()
    root.close()


def test_a_half_sent_request_is_closed_after_the_header_timeout(server):
    host, port = address(server)
    half = socket.create_connection((host, port))
    half.sendall(b"GET /heal")                             # half a request line, never finished
    silent = socket.create_connection((host, port))       # connects, sends nothing
    started = time.monotonic()
    assert call(server, "GET", "/healthz", key=None)[0] == 200     # others are served meanwhile
    # a keep-alive connection that starts its second request and stalls
    again = http.client.HTTPConnection(host, port, timeout=10)
    again.request("GET", "/healthz")
    assert again.getresponse().read()
    again.sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    for sock in (half, silent, again.sock):
        sock.settimeout(10)
        assert sock.recv(1024) == b""                      # closed by the daemon
    assert time.monotonic() - started < 5
    for sock in (half, silent):
        sock.close()
    again.close()
    assert call(server, "GET", "/healthz", key=None)[0] == 200


def test_a_head_over_the_size_limit_is_431_and_garbage_is_400(server):
    status, headers, answer = call(server, "GET", "/healthz", key=None, headers={"X-Padding": "p" * 20_000})
    assert status == 431 and answer["errno"] == E2BIG and headers["Content-Type"] == "application/json"
    host, port = address(server)
    for sent, status in ((b"GET /healthz HTTP/1.1\r\nX-Padding: " + b"p" * 20_000, 431),   # never finished
                         (b"NOT HTTP AT ALL\r\n\r\n", 400)):
        with socket.create_connection((host, port)) as sock:
            sock.sendall(sent)
            sock.settimeout(10)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status), reply
        assert json.loads(body)["errno"] == (E2BIG if status == 431 else EINVAL)


def test_keys_die_with_their_tenant(server):
    carol = Client(server.url, CAROL)
    tid = carol.tid
    pid = carol.spawn(tid, "hello", max_tokens=200, ignore_eos=True)
    Client(server.url, ROOT).kill_tenant(tid)
    for method, path, body in (("GET", "/whoami", None), ("POST", "/sys/ps", {}), ("POST", "/sys/wait", {"pid": pid}),
                               ("GET", "/v1/models", None), ("GET", "/sys", None),
                               ("POST", "/v1/completions", {"model": "carol", "prompt": "hi"})):
        status, headers, answer = call(server, method, path, body, key=CAROL)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer", (path, answer)
        assert_errno(answer, path, EPERM)
        assert "no longer exists" in json.dumps(answer)
    assert call(server, "GET", "/whoami", key=ALICE)[2]["name"] == "alice"    # other keys live on


def test_past_the_connection_limit_a_new_connection_gets_503(one_thread):
    srv = ServerThread(config(max_connections=3, header_timeout=5.0))
    try:
        host, port = address(srv)
        held = [socket.create_connection((host, port)) for _ in range(3)]
        time.sleep(0.2)
        status, headers, answer = call(srv, "GET", "/whoami")
        assert status == 503 and answer["errno"] == EAGAIN and "--max-connections" in answer["message"]
        assert headers["Connection"] == "close"
        for sock in held:
            sock.close()
        time.sleep(0.2)
        assert call(srv, "GET", "/whoami")[0] == 200
    finally:
        assert srv.stop()["fsck"] == "clean"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(one_thread, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    srv = ServerThread(config(ssl_keyfile=str(key), ssl_certfile=str(cert)))
    try:
        assert srv.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection(*address(srv), context=context, timeout=30)
        conn.request("GET", "/whoami", headers={"Authorization": f"Bearer {ALICE}"})
        assert json.loads(conn.getresponse().read())["name"] == "alice"
        conn.close()
        with pytest.raises(ssl.SSLError), socket.create_connection(address(srv)) as raw:
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")      # untrusted cert
    finally:
        srv.stop()
    for keyfile, certfile, errno in ((str(key), None, EINVAL), (None, str(tmp_path / "missing.pem"), ENOENT),
                                     (str(cert), str(cert), EINVAL)):
        with pytest.raises(KvosError) as refused:
            check_tls(config(ssl_keyfile=keyfile, ssl_certfile=certfile))
        assert refused.value.errno == errno


def test_the_exposure_warning_is_for_addresses_beyond_loopback():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert exposure_warning(host, 8000) is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "kvos.example"):
        banner = exposure_warning(host, 8000)
        assert "WITHOUT TLS" in banner and len(banner.splitlines()) >= 4 and "--ssl-certfile" in banner


def test_openapi_documents_what_every_route_answers(server):
    status, _, spec = call(server, "GET", "/openapi.json", key=None)
    assert status == 200 and spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            answers = op["responses"]
            assert {"200", "400", "413", "431", "500", "503"} <= set(answers), (path, method)
            vllm_shaped = ("/tokenize", "/detokenize", "/tokenizer_info")         # vLLM's routes outside /v1
            error = "OpenAIError" if path.startswith("/v1") or path in vllm_shaped else "Errno"
            assert error in json.dumps(answers["400"]), (path, method)
            assert ("401" in answers) == (path not in ("/health", "/healthz")) == ("security" in op), (path, method)
    spawn = spec["paths"]["/sys/spawn"]["post"]
    assert spawn["responses"]["200"]["content"]["application/json"]["schema"]["properties"]["result"] == \
        {"type": ["integer"]}
    wait = spec["paths"]["/sys/wait"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert {"pid", "reason", "tokens", "text"} <= set(wait["properties"]["result"]["required"])
    assert spawn["requestBody"]["content"]["application/json"]["example"] == {"tid": 1, "prompt": "Hello"}
    assert "text/event-stream" in spec["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]


def test_a_bug_in_kvosd_is_a_500_in_the_routes_shape(server, monkeypatch):
    def broken():
        raise RuntimeError("a bug")
    monkeypatch.setattr(server.daemon.metrics, "render", broken)
    status, _, answer = call(server, "GET", "/metrics", key=ROOT)
    assert status == 500 and answer["errno"] == "EIO" and "RuntimeError" in answer["message"]
    assert call(server, "GET", "/healthz", key=None)[0] == 200
