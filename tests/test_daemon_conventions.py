"""kvosd as `vllm serve` users expect it: an open API without a key (loopback only), --api-key and
$KVOS_API_KEY, /health while loading, /tokenize, /detokenize and /tokenizer_info, max_model_len, and its log:
startup, loading, one line per request, the kernel's warnings, as text or JSON lines."""
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import time

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kernel.errors import EINVAL, KvosError
from tests.test_daemon_process import REPO, Kvosd
from userspace.daemon import logs
from userspace.daemon.auth import check_exposure
from userspace.daemon.config import DaemonConfig, TenantSpec, default_specs
from userspace.daemon.listen import ServerThread
from userspace.shell.main import main as shell_main

ROOT, ALICE = "root-key-conventions", "alice-key-conventions"
BOOT = dict(device="cpu", memory="8MiB", swap="4MiB", threads=1)
pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


def call(url, method, path, body=None, key=None):
    """(status, headers, body: decoded JSON, or the text when it is not JSON)."""
    conn = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=30)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    resp = conn.getresponse()
    data = resp.read().decode()
    conn.close()
    try:
        return resp.status, resp.headers, json.loads(data)
    except ValueError:
        return resp.status, resp.headers, data


def scrape(url, key=None) -> dict:
    """{(family, sample name, labels as a tuple): value}"""
    status, _, text = call(url, "GET", "/metrics", key=key)
    assert status == 200, text
    return {(f.name, s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture(scope="module")
def open_server(one_thread):
    """One tenant and no key: the open API, on loopback."""
    srv = ServerThread(DaemonConfig(boot=BOOT, tenants=[TenantSpec("tiny-llama", "tiny-llama", None)],
                                    root_key=ROOT))
    yield srv
    assert srv.stop()["fsck"] == "clean"


@pytest.fixture(scope="module")
def keyed_server(one_thread):
    srv = ServerThread(DaemonConfig(boot=BOOT, tenants=[TenantSpec("alice", "tiny-llama", ALICE),
                                                        TenantSpec("bob", "tiny-llama", "bob-key-conventions")],
                                    root_key=ROOT))
    yield srv
    assert srv.stop()["fsck"] == "clean"


def test_the_open_api_needs_no_key_and_keeps_root(open_server):
    url = open_server.url
    with openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0) as client:     # any key will do
        reply = client.completions.create(model="tiny-llama", prompt="hello", max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
        (model,) = client.models.list().data
        assert model.id == "tiny-llama" and model.max_model_len == 2048           # vLLM's field
    status, _, who = call(url, "GET", "/whoami")
    assert status == 200 and who["name"] == "tiny-llama" and not who["root"]
    assert call(url, "GET", "/whoami", key=ROOT)[2]["root"]                    # the root key still counts
    assert call(url, "POST", "/sys/fsck")[0] == 403                           # root-only stays root's
    families = {name for name, _, _ in scrape(url)}                           # open: the whole scrape
    assert {"kvos_frames", "kvos_steps", "kvos_request_duration_seconds"} <= families


def test_an_open_api_beyond_loopback_is_refused_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.delenv("KVOS_API_KEY", raising=False)
    open_config = DaemonConfig(boot=BOOT, tenants=[TenantSpec("m", "tiny-llama", None)], root_key=ROOT)
    for host in ("127.0.0.1", "::1", "localhost"):
        check_exposure(host, open_config)
    for host in ("0.0.0.0", "192.168.1.5", "kvos.example"):
        with pytest.raises(KvosError) as err:
            check_exposure(host, open_config)
        assert err.value.errno == EINVAL and "--api-key" in err.value.reason and "--allow-open" in err.value.reason
        check_exposure(host, DaemonConfig(boot=BOOT, tenants=open_config.tenants, root_key=ROOT, allow_open=True))
        check_exposure(host, DaemonConfig(boot=BOOT, tenants=[TenantSpec("m", "tiny-llama", ALICE)], root_key=ROOT))
    assert shell_main(["serve", "--model", "tiny-llama", "--host", "0.0.0.0", "--port", "0"]) == 22    # EINVAL
    tenants = tmp_path / "t.json"
    tenants.write_text(json.dumps({"tenants": [{"model": "tiny-llama", "key": ALICE}]}))
    assert shell_main(["serve", "--tenants", str(tenants), "--api-key", "other-key-x"]) == 22


def test_api_key_flag_and_environment(monkeypatch):
    monkeypatch.delenv("KVOS_API_KEY", raising=False)
    assert default_specs("tiny-llama", {})[0][0].key is None                   # no key: open
    assert default_specs("tiny-llama", {}, api_key="flag-key-123")[0][0].key == "flag-key-123"
    monkeypatch.setenv("KVOS_API_KEY", "env-key-1234")
    assert default_specs("tiny-llama", {})[0][0].key == "env-key-1234"
    assert default_specs("tiny-llama", {}, api_key="flag-key-123")[0][0].key == "flag-key-123"   # the flag wins
    assert default_specs("org/My-Model@v2", {})[0][0].name == "My-Model-v2"   # a hub id's tenant name


def test_health_is_503_while_loading_then_200(one_thread):
    srv = ServerThread(DaemonConfig(boot=BOOT, tenants=[TenantSpec("alice", "tiny-llama", ALICE)], root_key=ROOT),
                       load=False)
    try:
        status, _, body = call(srv.url, "GET", "/health")
        assert status == 503 and body == {"status": "loading"}
        assert call(srv.url, "GET", "/healthz")[2]["status"] == "loading"
        status, headers, body = call(srv.url, "GET", "/v1/models", key=ALICE)
        assert status == 503 and "loading" in body["error"]["message"] and headers["Retry-After"] == "1"
        srv.daemon.load()
        status, headers, body = call(srv.url, "GET", "/health")
        assert status == 200 and body == ""                                   # as vLLM's: an empty 200
        assert call(srv.url, "GET", "/healthz")[2]["status"] == "ok"
        srv.daemon.begin_drain()
        assert call(srv.url, "GET", "/health")[:3:2] == (503, {"status": "draining", "error": None})
    finally:
        srv.stop()


def test_tokenize_and_detokenize_as_vllm(keyed_server):
    url, root = keyed_server.url, keyed_server.daemon.root
    tid = next(t.tid for t in root.schedstat().tenants if t.name == "alice")
    status, _, body = call(url, "POST", "/tokenize", {"model": "alice", "prompt": "what is paging?"}, key=ALICE)
    assert status == 200 and set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["tokens"] == root.tokenize(tid, "what is paging?") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == root.tenantinfo(tid).max_context and body["token_strs"] is None
    chat = [{"role": "user", "content": "hi"}]
    status, _, body = call(url, "POST", "/tokenize", {"messages": chat}, key=ALICE)         # model may be left out
    assert status == 200 and body["tokens"] == root.tokenize(tid, chat)
    plain = call(url, "POST", "/tokenize", {"messages": chat, "add_generation_prompt": False}, key=ALICE)[2]
    assert plain["tokens"] == root.tokenize(tid, chat, add_generation_prompt=False) != body["tokens"]
    status, _, back = call(url, "POST", "/detokenize", {"model": "alice", "tokens": body["tokens"]}, key=ALICE)
    assert status == 200 and back == {"prompt": root.detokenize(tid, body["tokens"])}
    for bad, field in (({"prompt": "x", "add_special_tokens": True}, "add_special_tokens"),
                       ({"prompt": "x", "return_token_strs": True}, "return_token_strs"),
                       ({"prompt": "x", "colour": 1}, "colour"), ({"prompt": 7}, "prompt")):
        status, _, err = call(url, "POST", "/tokenize", bad, key=ALICE)
        assert status == 400 and field in err["error"]["message"] and err["error"]["code"] == "EINVAL", err
    assert call(url, "POST", "/tokenize", {"model": "bob", "prompt": "x"}, key=ALICE)[0] == 404
    assert call(url, "POST", "/detokenize", {"tokens": [10 ** 9]}, key=ALICE)[0] == 400
    assert call(url, "POST", "/tokenize", {"prompt": "x"})[0] == 401
    assert call(url, "POST", "/tokenize", {"prompt": "x"}, key=ROOT)[0] == 400       # root: which model?
    assert call(url, "POST", "/tokenize", {"model": "bob", "prompt": "x"}, key=ROOT)[0] == 200


def test_tokenizer_info_as_vllm(keyed_server):
    """What an evaluation harness's remote tokenizer reads: the special tokens' text, which /tokenize
    turns back into the model's own ids, and the chat template."""
    url, root = keyed_server.url, keyed_server.daemon.root
    tid = next(t.tid for t in root.schedstat().tenants if t.name == "alice")
    info = root.tenantinfo(tid)
    status, _, body = call(url, "GET", "/tokenizer_info", key=ALICE)
    assert status == 200, body
    assert body["eos_token"] == "<|im_end|>" and body["bos_token"] == "<|im_start|>" and body["unk_token"] is None
    assert body["chat_template"] == info.chat_template and "{%" in body["chat_template"]
    assert body["model_max_length"] == info.max_context and body["model"] == "alice"
    eos = call(url, "POST", "/tokenize", {"prompt": body["eos_token"]}, key=ALICE)[2]["tokens"]
    assert eos == info.eos_token_ids[:1]
    assert call(url, "GET", "/tokenizer_info?model=alice", key=ALICE)[2] == body
    assert call(url, "GET", "/tokenizer_info?model=bob", key=ALICE)[0] == 404
    assert call(url, "GET", "/tokenizer_info?colour=1", key=ALICE)[0] == 400
    assert call(url, "GET", "/tokenizer_info")[0] == 401
    assert call(url, "GET", "/tokenizer_info", key=ROOT)[0] == 400                 # root: which model?
    assert call(url, "GET", "/tokenizer_info?model=bob", key=ROOT)[0] == 200


def test_request_metrics_and_the_request_log_line(keyed_server, caplog):
    url = keyed_server.url
    with caplog.at_level(logging.INFO, logger="kvosd.requests"), \
            openai.OpenAI(base_url=url + "/v1", api_key=ALICE, max_retries=0) as client:
        client.completions.create(model="alice", prompt="hello", max_tokens=5, n=2, temperature=0)
        list(client.chat.completions.create(model="alice", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    # a streamed request is logged as its response closes, which may be just after the client read [DONE]
    deadline = time.monotonic() + 10
    while len([r for r in caplog.records if r.name == "kvosd.requests"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    (done, streamed) = [r for r in caplog.records if r.name == "kvosd.requests"]
    assert done.getMessage() == "/v1/completions" and done.tenant == "alice" and len(done.pids) == 2
    assert done.finish_reason == ["length", "length"] and done.completion_tokens == 10 and done.prompt_tokens > 0
    assert 0 < done.ttft <= done.duration and done.outcome == "ok"
    assert streamed.getMessage() == "/v1/chat/completions" and streamed.completion_tokens == 3
    samples = scrape(url, ROOT)
    count = ("kvos_request_duration_seconds", "kvos_request_duration_seconds_count")
    assert samples[(*count, (("endpoint", "completions"), ("tenant", "alice")))] == 1
    assert samples[(*count, (("endpoint", "chat"), ("tenant", "alice")))] == 1
    reasons = ("kvos_finish_reasons", "kvos_finish_reasons_total")
    assert samples[(*reasons, (("endpoint", "completions"), ("finish_reason", "length"), ("tenant", "alice")))] == 2
    bob = scrape(url, "bob-key-conventions")                  # a tenant key: its own series only
    assert not any(dict(labels).get("tenant") == "alice" for _, _, labels in bob)
    assert any(name == "kvos_request_duration_seconds" for name, _, _ in scrape(url, ALICE))


def test_log_formats():
    record = logging.LogRecord("kvosd.requests", logging.INFO, __file__, 1, "%s", ("/v1/completions",), None)
    record.tenant, record.pids, record.ttft = "alice", [3, 4], 0.0123456
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["level"] == "info" and line["logger"] == "kvosd.requests" and line["message"] == "/v1/completions"
    assert line["tenant"] == "alice" and line["pids"] == [3, 4] and line["time"].endswith("+00:00")
    text = logs.TextFormatter().format(record)
    assert text.endswith("INFO kvosd.requests: /v1/completions tenant=alice pids=3,4 ttft=0.012"), text


def test_kvos_serve_logs_json_lines_and_takes_the_key_from_the_environment(tmp_path):
    """As VLLM_API_KEY: $KVOS_API_KEY keys the API. The log: startup, loading, each request, the kernel's
    warnings (here preemptions: the KV memory holds 10 pages, four requests want 28), one JSON object a line."""
    daemon = Kvosd(tmp_path, "--model", "tiny-llama", "--memory", "240KiB", "--swap", "0", "--log-format", "json",
                   env={"KVOS_API_KEY": "env-key-conventions", "KVOS_ROOT_KEY": ROOT})
    try:
        assert call(daemon.url, "GET", "/health")[0] == 200
        assert call(daemon.url, "GET", "/v1/models")[0] == 401
        with openai.OpenAI(base_url=daemon.url + "/v1", api_key="env-key-conventions", max_retries=0) as client:
            reply = client.completions.create(model="tiny-llama", prompt=["a", "b", "c", "d"], max_tokens=100,
                                              temperature=0, extra_body={"ignore_eos": True})
        assert [c.finish_reason for c in reply.choices] == ["length"] * 4

        def lines():
            return [json.loads(line) for line in daemon.log]       # every line is one JSON object
        deadline = time.monotonic() + 15
        while not any(x["logger"] == "kvosd.kernel" for x in lines()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()
    found = lines()
    messages = [x["message"] for x in found if x["logger"] == "kvosd"]
    assert any(m.startswith("listening on http://127.0.0.1:") for m in messages), messages
    assert any(m.startswith("loading tiny-llama for tenant tiny-llama") for m in messages), messages
    assert any(m.startswith("tenant tiny-llama ready in") for m in messages), messages
    assert any(m.startswith("serving tiny-llama at") for m in messages) and "stopped; fsck clean" in messages[-1]
    (request,) = [x for x in found if x["logger"] == "kvosd.requests"]
    assert request["tenant"] == "tiny-llama" and request["completion_tokens"] == 400 and len(request["pids"]) == 4
    assert request["finish_reason"] == ["length"] * 4 and 0 < request["ttft"] < request["duration"]
    kernel = [x for x in found if x["logger"] == "kvosd.kernel"]
    assert kernel and all(x["level"] in ("warning", "error") for x in kernel)              # info: debug only
    assert any(x["event"] == "preempt" and x["pid"] in request["pids"] for x in kernel), kernel


def test_a_model_that_does_not_load_is_logged_and_is_the_exit_status(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "KVOS_ROOT_KEY": ROOT,
           "XDG_RUNTIME_DIR": str(tmp_path), "KVOS_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "kvos", "serve", "--model", "kvos-test/not-cached", "--port", "0",
                          "--memory", "1MiB", "--log-format", "json"], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr                                        # ENOENT
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    (error,) = [x for x in lines if x["level"] == "error"]
    assert error["message"].startswith("the models did not load: ENOENT: kvos-test/not-cached is not in the hub")
    assert any(x["message"].startswith("listening on") for x in lines)         # the port was bound first
