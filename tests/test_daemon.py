"""kvosd in this process (uvicorn in a thread, loopback, tiny-llama): the syscalls over HTTP,
the OpenAI API through the official client, keys, disconnects, metrics and shutdown.

Outputs over HTTP are compared with an in-process kernel running the same model greedily.
"""
import http.client
import json
import threading
import time

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import kernel
from kernel.errors import E2BIG, EAGAIN, EINVAL, ENOMEM, EPERM, ESRCH, KvosError
from kernel.results import (
    ExitStatus,
    MemInfo,
    PageEntry,
    PageMap,
    ProcInfo,
    ReadResult,
    SchedStat,
    TenantSched,
    TokenLogprob,
    TopLogprob,
)
from kernel.syscalls import SYSCALLS
from userspace import libc
from userspace.daemon import wire
from userspace.daemon.client import Client, DaemonUnreachable
from userspace.daemon.config import DaemonConfig, TenantSpec
from userspace.daemon.listen import ServerThread

ROOT, ALICE, BOB = "root-key-for-tests", "alice-key-for-tests", "bob-key-for-tests"
TINY = "tiny-llama"
PROMPT_IDS = [1, 57, 120, 33, 250, 91, 400]


def boot_options():
    return dict(device="cpu", memory="8MiB", swap="4MiB", threads=1)


def config(**overrides):
    tenants = [TenantSpec("alice", TINY, ALICE),
               TenantSpec("bob", TINY, BOB, {"max_procs": 3, "max_new_tokens": 64})]
    return DaemonConfig(boot=boot_options(), tenants=tenants, root_key=ROOT, **overrides)


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


@pytest.fixture(scope="module")
def server(one_thread):
    srv = ServerThread(config())
    yield srv
    report = srv.stop()
    assert report["fsck"] == "clean" and report["frames_mapped"] == 0 and report["swap_used"] == 0


@pytest.fixture(scope="module")
def local(one_thread):
    """The same model in an in-process kernel: (root handle, tid)."""
    k = kernel.boot(**boot_options())
    root = k.syscalls()
    return root, root.spawn_tenant(TINY)


def clean_reference(local, prompt, limit, run=None):
    """The in-process greedy result for prompt, cut to the longest output whose text ends on a whole
    character, and that length. The kernel's detokenizer holds a trailing partial character back for
    good, so the text of an output that ends mid-character depends on when it was read; the tiny
    model's random tokens often do. Cut there, every path must give the same text."""
    lroot, ltid = local
    run = run or (lambda n: lroot.wait(lroot.spawn(ltid, prompt, max_tokens=n, temperature=0)))
    program = lroot._kernel.tenants[ltid].program
    tokens = run(limit).tokens
    n = len(tokens)
    while n > 1 and program.decode(tokens[:n]).endswith("\ufffd"):
        n -= 1
    status = run(n)
    assert status.tokens == tokens[:n] and not status.text.endswith("\ufffd")
    return n, status


@pytest.fixture
def root(server):
    with Client(server.url, ROOT) as client:
        yield client


@pytest.fixture
def alice(server):
    with Client(server.url, ALICE) as client:
        yield client


@pytest.fixture
def bob(server):
    with Client(server.url, BOB) as client:
        yield client


_openai_clients = []


@pytest.fixture(autouse=True)
def close_openai_clients():
    yield
    while _openai_clients:
        _openai_clients.pop().close()


def oai(server, key=ALICE):
    """The official client, unmodified (no retries: a refusal must show as it is)."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    _openai_clients.append(client)
    return client


def http_call(server, method, path, body=None, key=None, raw=None):
    """(status, decoded JSON) of one request; raw: bytes to send as the body instead of JSON."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=raw if raw is not None else (None if body is None else json.dumps(body)),
                 headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else None


def wait_until(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def assert_idle(root):
    """No process left of any test, and no frame mapped: what each test must leave behind."""
    assert wait_until(lambda: not root.ps() and root.meminfo().mapped == 0), (root.ps(), root.meminfo())


# -- the syscall table over HTTP -------------------------------------------------------------------------
def test_every_syscall_has_a_route_a_client_method_and_a_result_type(server):
    assert set(wire.RESULTS) == set(SYSCALLS)
    status, spec = http_call(server, "GET", "/openapi.json")
    assert status == 200
    for name, sc in SYSCALLS.items():
        op = spec["paths"][f"/sys/{name}"]["post"]
        assert op["summary"] == " ".join(sc.doc.split("\n\n")[0].split())
        assert callable(getattr(Client, name)) and getattr(Client, name).__doc__ == sc.doc
    spawn_schema = spec["paths"]["/sys/spawn"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert spawn_schema["required"] == ["tid", "prompt"] and spawn_schema["additionalProperties"] is True
    assert "ChatRequest" in spec["components"]["schemas"] and "/v1/chat/completions" in spec["paths"]
    status, table = http_call(server, "GET", "/sys", key=ALICE)
    assert status == 200 and [p["name"] for p in table["spawn"]["params"]][:2] == ["tid", "prompt"]
    assert table["wait"]["blocking"] and table["spawn_tenant"]["root_only"]


def test_client_returns_what_the_local_handle_returns(server, local, alice, root):
    lroot, ltid = local
    tid = alice.tid
    assert tid == 1 and root.tid is None
    expected = lroot.wait(lroot.spawn(ltid, PROMPT_IDS, max_tokens=24, temperature=0))
    got = alice.wait(alice.spawn(tid, PROMPT_IDS, max_tokens=24, temperature=0))
    assert isinstance(got, ExitStatus)
    assert (got.tokens, got.text, got.reason, got.prompt_tokens) == \
           (expected.tokens, expected.text, expected.reason, expected.prompt_tokens)

    # An interactive process: read, pagemap, write, the /proc views, wait -- side by side.
    pid, lpid = alice.spawn(tid, PROMPT_IDS, max_tokens=20, temperature=0, interactive=True, logprobs=2), \
        lroot.spawn(ltid, PROMPT_IDS, max_tokens=20, temperature=0, interactive=True, logprobs=2)
    reads, lreads = [], []
    for handle, p, out in ((alice, pid, reads), (lroot, lpid, lreads)):
        while not out or not out[-1].turn_done:
            out.append(handle.read(p, timeout=5.0))
    assert all(isinstance(r, ReadResult) for r in reads)
    assert sum((r.tokens for r in reads), []) == sum((r.tokens for r in lreads), [])
    assert sum((r.logprobs for r in reads), []) == sum((r.logprobs for r in lreads), [])
    assert isinstance(reads[-1].logprobs[0], TokenLogprob) and isinstance(reads[-1].logprobs[0].top[1], TopLogprob)
    pm, lpm = alice.pagemap(pid), lroot.pagemap(lpid)
    assert isinstance(pm, PageMap) and all(isinstance(e, PageEntry) for e in pm.pages)
    assert [e.tokens for e in pm.pages] == [e.tokens for e in lpm.pages] and pm.pages[0].flags == lpm.pages[0].flags
    (info,) = [p for p in alice.ps() if p.pid == pid]
    assert isinstance(info, ProcInfo) and info.state == "sleeping" and info.pages == len(pm.pages)
    assert alice.nice(pid, 3) == lroot.nice(lpid, 3) == 3
    alice.write(pid, [33, 44])
    lroot.write(lpid, [33, 44])
    status, lstatus = alice.wait(pid), lroot.wait(lpid)
    assert status.tokens == lstatus.tokens and status.reason == lstatus.reason
    mem = root.meminfo()
    assert isinstance(mem, MemInfo) and mem.cgroups["alice"].name == "alice" and 0 <= mem.utilization <= 1
    stat = root.schedstat()
    assert isinstance(stat, SchedStat) and all(isinstance(t, TenantSched) for t in stat.tenants)
    assert stat.recent_steps[-1].batch_size >= 1
    assert [e.event for e in alice.dmesg() if e.pid == pid][0] == "spawn"
    assert alice.dmesg(since=10**9) == []
    assert_idle(root)


def test_libc_runs_on_a_client(server, local, alice, root):
    lroot, ltid = local
    question = [{"role": "user", "content": "What is the capital of France?"}]
    expected = libc.chat(lroot, ltid, question, temperature=0, max_tokens=16)
    got = libc.chat(alice, alice.tid, question, temperature=0, max_tokens=16)
    assert (got.tokens, got.text) == (expected.tokens, expected.text)
    n, expected = clean_reference(local, "Once upon a time", 16)
    pieces = list(libc.stream(alice, alice.tid, "Once upon a time", temperature=0, max_tokens=n))
    assert "".join(pieces) == expected.text
    with libc.Chat(alice, alice.tid, system="Be brief.", temperature=0, max_tokens=8) as remote, \
            libc.Chat(lroot, ltid, system="Be brief.", temperature=0, max_tokens=8) as here:
        for line in ("Hello!", "And then?"):
            assert isinstance(remote.send(line), str)
            here.send(line)
        pid = remote.pid
        assert [p.state for p in alice.ps() if p.pid == pid] == ["sleeping"]     # its pages stay
        assert remote.close().tokens == here.close().tokens
    # parallel_sample is one spawn_n over HTTP: seeded samples equal the in-process ones
    prompt = [{"role": "user", "content": "Name a colour."}]
    remote = libc.parallel_sample(alice, alice.tid, prompt, 3, max_tokens=6, seed=11, ignore_eos=True)
    here = libc.parallel_sample(lroot, ltid, prompt, 3, max_tokens=6, seed=11, ignore_eos=True)
    assert [s.tokens for s in remote] == [s.tokens for s in here] and len(remote) == 3
    assert_idle(root)


# -- the OpenAI API ------------------------------------------------------------------------------------------
def test_openai_chat_matches_in_process_chat(server, local, root):
    lroot, ltid = local
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fox."}]
    n, expected = clean_reference(local, messages, 24,
                                  lambda n: libc.chat(lroot, ltid, messages, temperature=0, max_tokens=n))
    client = oai(server)
    reply = client.chat.completions.create(model="alice", messages=messages, temperature=0, max_tokens=n,
                                           extra_body={"return_token_ids": True})
    assert reply.object == "chat.completion" and len(reply.choices) == 1
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].token_ids == expected.tokens
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == len(expected.tokens)
    assert reply.usage.total_tokens == expected.prompt_tokens + len(expected.tokens)

    chunks = list(client.chat.completions.create(model="tiny-llama", messages=messages, temperature=0,
                                                 max_tokens=n, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"return_token_ids": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert sum((c.choices[0].token_ids for c in chunks[1:] if c.choices), []) == expected.tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
           [expected.reason]
    assert chunks[-1].usage.completion_tokens == len(expected.tokens) and chunks[-1].choices == []
    assert_idle(root)


def test_openai_n_choices_by_fork(server, local, root):
    client = oai(server)
    ask = dict(model="alice", messages=[{"role": "user", "content": "Tell a story."}], n=3, temperature=1.0,
               seed=7, max_tokens=8)
    first = client.chat.completions.create(**ask)
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert len(set(texts)) > 1                      # each fork draws from its own generator
    again = client.chat.completions.create(**ask)
    # The seed reproduces the parent (choice 0); fork() derives the others' seeds from the parent's pid.
    assert again.choices[0].message.content == texts[0]
    lengths = [8 if c.finish_reason == "length" else None for c in first.choices]
    if all(lengths):
        assert first.usage.completion_tokens == 24
    assert 3 <= first.usage.completion_tokens <= 24

    streamed = list(client.chat.completions.create(**{**ask, "temperature": 0}, stream=True))
    by_choice, finished = {}, {}
    for chunk in streamed:
        for c in chunk.choices:
            by_choice.setdefault(c.index, []).append(c.delta.content or "")
            finished[c.index] = c.finish_reason or finished.get(c.index)
    greedy = client.chat.completions.create(**{**ask, "temperature": 0, "n": 1}).choices[0]
    assert ["".join(by_choice[i]) for i in range(3)] == [greedy.message.content] * 3
    assert finished == {i: greedy.finish_reason for i in range(3)}

    several = client.completions.create(model="alice", prompt=["Once upon", PROMPT_IDS], n=2, max_tokens=5,
                                        temperature=0)
    assert len(several.choices) == 4 and several.choices[0].text == several.choices[1].text
    lroot, ltid = local
    text_prompt = lroot.wait(lroot.spawn(ltid, "Once upon", max_tokens=1)).prompt_tokens
    assert several.usage.prompt_tokens == text_prompt + len(PROMPT_IDS)      # each prompt once, not per choice
    assert_idle(root)


def test_openai_completions_equal_in_process_greedy(server, local, root):
    client = oai(server)
    for prompt in (PROMPT_IDS, "The scheduler runs decodes first"):
        n, expected = clean_reference(local, prompt, 24)
        got = client.completions.create(model="alice", prompt=prompt, max_tokens=n, temperature=0,
                                        extra_body={"return_token_ids": True})
        assert got.choices[0].token_ids == expected.tokens
        assert got.choices[0].text == expected.text and got.choices[0].finish_reason == expected.reason
        assert got.usage.prompt_tokens == expected.prompt_tokens
        assert got.usage.completion_tokens == len(expected.tokens)
        streamed = list(client.completions.create(model="alice", prompt=prompt, max_tokens=n, temperature=0,
                                                  stream=True, extra_body={"return_token_ids": True}))
        assert "".join(c.choices[0].text for c in streamed) == expected.text
        assert sum((c.choices[0].token_ids for c in streamed), []) == expected.tokens
    echoed = client.completions.create(model="alice", prompt="Hello", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("Hello")
    n, reference = clean_reference(local, "Once upon a time", 40)
    text = reference.text
    stop = next((text[i:i + 3] for i in range(4, len(text) - 3)
                 if text[i:i + 3].strip() and "\ufffd" not in text[i:i + 3]), None)
    if stop is not None:
        got = client.completions.create(model="alice", prompt="Once upon a time", max_tokens=n, temperature=0,
                                        stop=[stop])
        assert got.choices[0].finish_reason == "stop"
        assert got.choices[0].text == text[:text.index(stop)]
    models = client.models.list()
    assert [m.id for m in models.data] == ["alice"]
    assert sorted(m.id for m in oai(server, ROOT).models.list().data) == ["alice", "bob"]
    assert_idle(root)


def test_32_concurrent_streams_while_ps_watches(server, local, root, bob):
    # 32 prompts whose greedy outputs are at least 48 tokens before a clean cut: each process lives
    # long enough for ps to see it (at 24 tokens a loaded CI machine once fit no ps call inside the
    # run). One batched in-process run gives every reference.
    lroot, ltid = local
    program = lroot._kernel.tenants[ltid].program
    candidates = [f"Request {i}: once upon a time" for i in range(64)]
    references = []
    for prompt, status in zip(candidates, libc.generate_many(lroot, ltid, candidates, max_tokens=64,
                                                             temperature=0, ignore_eos=True)):
        n = len(status.tokens)
        while n > 1 and program.decode(status.tokens[:n]).endswith("\ufffd"):
            n -= 1
        if n >= 48:
            references.append((prompt, n, program.decode(status.tokens[:n]), status.tokens[:n]))
    assert len(references) >= 32
    references = references[:32]
    outputs, pids, errors = [None] * 32, [None] * 32, []
    start = threading.Barrier(33)

    def one(i):
        try:
            client = oai(server)
            start.wait()
            pieces, tokens = [], []
            prompt, n = references[i][:2]
            for chunk in client.completions.create(model="alice", prompt=prompt, max_tokens=n, temperature=0,
                                                   stream=True, extra_body={"return_token_ids": True,
                                                                            "ignore_eos": True}):
                pids[i] = int(chunk.id.rsplit("-", 1)[1])
                pieces.append(chunk.choices[0].text)
                tokens += chunk.choices[0].token_ids
            outputs[i] = ("".join(pieces), tokens)
        except Exception as exc:           # noqa: BLE001 -- reported below with its request
            errors.append((i, exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    start.wait()
    seen, most_at_once, bob_saw = set(), 0, set()
    while any(t.is_alive() for t in threads):
        procs = [p for p in root.ps() if p.tenant == "alice"]
        seen |= {p.pid for p in procs}
        most_at_once = max(most_at_once, sum(p.state != "zombie" for p in procs))
        bob_saw |= {p.pid for p in bob.ps()}
    for t in threads:
        t.join()
    assert not errors, errors
    assert outputs == [(text, tokens) for _, _, text, tokens in references]
    assert set(pids) <= seen, "ps did not show every request's process"
    assert most_at_once >= 8
    assert not bob_saw & set(pids)
    assert_idle(root)


# -- keys and refusals -------------------------------------------------------------------------------------
def test_a_tenant_key_cannot_touch_another_tenants_processes(server, alice, bob, root):
    pid = alice.spawn(alice.tid, "Hello", max_tokens=2, interactive=True)
    assert alice.read(pid, timeout=5.0) is not None
    assert pid not in [p.pid for p in bob.ps()]
    for call in (lambda: bob.kill(pid), lambda: bob.pagemap(pid), lambda: bob.nice(pid, 1),
                 lambda: bob.spawn(alice.tid, "hi"), lambda: bob.spawn_tenant(TINY)):
        with pytest.raises(KvosError) as refused:
            call()
        assert refused.value.errno == EPERM
    status, body = http_call(server, "POST", "/sys/kill", {"pid": pid}, key=BOB)
    assert status == 403 and body["errno"] == EPERM and body["code"] == 1 and "another tenant" in body["message"]
    assert pid in [p.pid for p in alice.ps()]
    assert alice.wait(pid).reason in ("length", "stop")


def test_no_key_or_a_wrong_key_gets_401(server):
    for path, method in (("/sys/ps", "POST"), ("/v1/models", "GET"), ("/metrics", "GET"), ("/whoami", "GET")):
        for key in (None, "not-a-key-we-gave"):
            status, body = http_call(server, method, path, key=key)
            assert status == 401, (path, key)
    with pytest.raises(openai.AuthenticationError):
        oai(server, key="wrong-key-123").models.list()
    with pytest.raises(KvosError) as refused, Client(server.url) as keyless:
        keyless.ps()
    assert refused.value.errno == EPERM and "bearer" in refused.value.reason
    status, body = http_call(server, "GET", "/healthz")
    assert status == 200 and body["status"] == "ok"


def test_malformed_requests_get_400_and_the_daemon_keeps_serving(server, alice, root):
    cases = [
        ("/sys/spawn", b"{not json", "not valid JSON"),
        ("/sys/spawn", b"[1, 2]", "must be a JSON object"),
        ("/sys/spawn", json.dumps({"tid": 1}).encode(), "missing 1 required positional argument: 'prompt'"),
        ("/sys/spawn", json.dumps({"tid": 1, "prompt": "hi", "temprature": 1}).encode(), "unknown sampling key"),
        ("/sys/spawn", json.dumps({"tid": 1, "prompt": ""}).encode(), "prompt is empty"),
        ("/sys/kill", json.dumps({"pid": "seven"}).encode(), "pid must be an integer"),
    ]
    for path, raw, reason in cases:
        status, body = http_call(server, "POST", path, key=ALICE, raw=raw)
        assert status == 400 and body["errno"] == EINVAL and reason in body["message"], (raw, body)
    chat = "/v1/chat/completions"
    for body, reason in (({"model": "alice"}, "messages"),
                         ({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
                          "temperature"),
                         ({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "suffix": "x"},
                          "suffix is not supported"),
                         ({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1},
                          "unknown field 'frobnicate'"),
                         ({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
                          "max_tokens")):
        status, answer = http_call(server, "POST", chat, body, key=ALICE)
        assert status == 400 and reason in answer["error"]["message"], (body, answer)
        assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["code"] == EINVAL
    status, answer = http_call(server, "POST", chat, raw=b"{{", key=ALICE)
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        oai(server).chat.completions.create(model="alice", messages=[], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        oai(server).chat.completions.create(model="bob", messages=[{"role": "user", "content": "hi"}])
    assert alice.wait(alice.spawn(alice.tid, "still here?", max_tokens=3)).reason in ("length", "stop")
    assert_idle(root)


def test_errnos_map_to_http_statuses(server, alice, bob, root):
    def refused(errno, status, path, body, key=ALICE):
        code, answer = http_call(server, "POST", path, body, key=key)
        assert (code, answer["errno"]) == (status, errno), answer

    refused(ESRCH, 404, "/sys/wait", {"pid": 10**6})
    refused(ENOMEM, 413, "/sys/spawn", {"tid": 1, "prompt": [5] * 3000})
    refused(E2BIG, 413, "/sys/spawn", {"tid": 2, "prompt": "hi", "max_tokens": 65}, key=BOB)
    pids = [bob.spawn(bob.tid, "hi", max_tokens=1, interactive=True) for _ in range(3)]
    refused(EAGAIN, 429, "/sys/spawn", {"tid": 2, "prompt": "hi", "max_tokens": 1}, key=BOB)
    refused(EPERM, 403, "/sys/spawn_tenant", {"model": TINY}, key=BOB)
    for pid in pids:
        bob.kill(pid)
        assert bob.wait(pid).reason == "killed"
    with pytest.raises(openai.APIStatusError) as too_big:
        oai(server).completions.create(model="alice", prompt=[5] * 3000, max_tokens=2)
    assert too_big.value.status_code == 413
    assert_idle(root)


# -- clients that go away --------------------------------------------------------------------------------------
def _open_stream(server, body, key=ALICE):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    return conn, conn.getresponse()


def test_a_client_that_disconnects_mid_stream_frees_its_frames(server, root):
    assert_idle(root)
    baseline = root.meminfo()
    conn, resp = _open_stream(server, {"model": "alice", "prompt": "Once upon a time", "max_tokens": 2000,
                                       "ignore_eos": True, "temperature": 0, "stream": True, "n": 2})
    assert resp.status == 200
    pids = [int(p) for p in resp.getheader("X-Kvos-Pids").split(",")]
    events = 0
    while events < 6:
        if resp.fp.readline().startswith(b"data: "):
            events += 1
    running = {p.pid: p for p in root.ps()}
    assert set(pids) <= set(running) and all(running[p].pages > 0 for p in pids)
    assert root.meminfo().mapped > baseline.mapped
    conn.sock.close()                     # the client goes away mid-stream
    conn.close()
    assert wait_until(lambda: not {p.pid for p in root.ps()} & set(pids)), "its processes were not ended"
    after = root.meminfo()
    assert after.mapped == baseline.mapped and after.free + after.cached == after.total
    assert any(e.event == "exit" and "killed" in e.message and e.pid == pids[0] for e in root.dmesg())


def test_a_non_streaming_client_that_disconnects_frees_its_frames(server, root):
    assert_idle(root)
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "alice", "prompt": "Hi", "max_tokens": 2000,
                                                             "ignore_eos": True}),
                 headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"})
    assert wait_until(lambda: any(p.pages > 0 for p in root.ps()))
    conn.sock.close()
    conn.close()
    assert_idle(root)


def _start_beam_search(server, n):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "alice", "prompt": "Hi", "max_tokens": 2000,
                                                             "n": n, "use_beam_search": True, "ignore_eos": True}),
                 headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"})
    return conn


def test_a_beam_search_whose_client_disconnects_kills_its_beams(server, root):
    assert_idle(root)
    conn = _start_beam_search(server, 3)
    assert wait_until(lambda: len([p for p in root.ps() if p.pages > 0]) >= 3)     # forked beams
    conn.sock.close()
    conn.close()
    assert_idle(root)


def test_a_tenant_runs_at_most_four_beam_searches_at_once(server, root):
    """Each holds a worker thread: a fifth is EAGAIN (429), and others' calls are not kept waiting."""
    assert_idle(root)
    conns = [_start_beam_search(server, 1) for _ in range(4)]
    assert wait_until(lambda: len(root.ps()) >= 4)
    status, reply = http_call(server, "POST", "/v1/completions", {"model": "alice", "prompt": "Hi", "max_tokens": 4,
                                                                  "use_beam_search": True}, key=ALICE)
    assert status == 429 and "at most 4 beam searches at once" in reply["error"]["message"], reply
    status, reply = http_call(server, "POST", "/v1/completions", {"model": "bob", "prompt": "Hi", "max_tokens": 4,
                                                                  "use_beam_search": True}, key=BOB)
    assert status == 200 and len(reply["choices"]) == 1, reply
    for conn in conns:
        conn.sock.close()
        conn.close()
    assert_idle(root)


# -- metrics ---------------------------------------------------------------------------------------------------
def test_metrics_parse_and_carry_the_families(server, root):
    list(oai(server).completions.create(model="alice", prompt="Metrics, please", max_tokens=12, stream=True))
    oai(server).completions.create(model="alice", prompt="Fork me", max_tokens=12, n=2)
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)      # a tenant scrapes its own series only
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {ALICE}"})
    resp = conn.getresponse()
    assert resp.status == 200
    own = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
    conn.close()
    labels = {s.labels.get("tenant") for f in own.values() for s in f.samples} - {None}
    assert labels == {"alice"} and "kvos_frames" not in own and "kvos_preemptions" not in own
    assert "kvos_processes" in own and "kvos_time_to_first_token_seconds" in own
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {ROOT}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
    conn.close()
    for name in ("kvos_processes", "kvos_frames", "kvos_tenant_frames", "kvos_tokens_per_second",
                 "kvos_generated_tokens", "kvos_preemptions", "kvos_swap_outs", "kvos_swap_ins",
                 "kvos_swapped_out_pages", "kvos_page_cache_hit_rate", "kvos_page_cache_hits", "kvos_cow_faults",
                 "kvos_time_to_first_token_seconds", "kvos_time_between_tokens_seconds", "kvos_requests"):
        assert name in families, name
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    stat, mem = root.schedstat(), root.meminfo()
    assert value[("kvos_preemptions_total", ())] == stat.preemptions
    assert value[("kvos_cow_faults_total", ())] == mem.cow_faults
    assert value[("kvos_generated_tokens_total", ())] >= 36
    assert value[("kvos_frames", (("state", "total"),))] == mem.total
    assert ("kvos_processes", (("state", "running"), ("tenant", "bob"))) in value
    assert value[("kvos_time_to_first_token_seconds_count", (("tenant", "alice"),))] >= 3
    assert value[("kvos_time_between_tokens_seconds_count", (("tenant", "alice"),))] >= 11
    assert value[("kvos_requests_total", (("endpoint", "completions"), ("outcome", "ok"), ("tenant", "alice")))] >= 2
    assert 0.0 <= value[("kvos_page_cache_hit_rate", ())] <= 1.0


# -- shutdown ----------------------------------------------------------------------------------------------------
def _stream_in_thread(srv, max_tokens, out):
    def run():
        pieces, reasons = [], []
        try:
            for chunk in oai(srv).completions.create(model="alice", prompt="Shut down soon", max_tokens=max_tokens,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True}):
                pieces.append(chunk.choices[0].text)
                reasons.append(chunk.choices[0].finish_reason)
            out["reasons"] = [r for r in reasons if r]
        except Exception as exc:          # noqa: BLE001 -- the test asserts on it
            out["error"] = exc
        out["text"] = "".join(pieces)
    t = threading.Thread(target=run)
    t.start()
    return t


def test_shutdown_finishes_running_streams_and_fsck_is_clean(one_thread):
    srv = ServerThread(config())
    out = {}
    t = _stream_in_thread(srv, 200, out)
    assert wait_until(lambda: srv.daemon.root.ps() or out), out
    report = srv.stop(kill=False)
    t.join(30)
    assert out.get("reasons") == ["length"], out
    assert report == {**report, "fsck": "clean", "frames_mapped": 0, "swap_used": 0}
    with pytest.raises(DaemonUnreachable), Client(srv.url, ROOT) as late:
        late.ps()


def test_shutdown_with_kill_ends_streams_at_once(one_thread):
    srv = ServerThread(config(kill_on_shutdown=True))
    out = {}
    t = _stream_in_thread(srv, 2000, out)
    assert wait_until(lambda: any(p.generated_tokens > 2 for p in srv.daemon.root.ps()) or out), out
    started = time.monotonic()
    report = srv.stop()
    t.join(30)
    assert time.monotonic() - started < 10
    assert out.get("reasons") == ["killed"], out
    assert report["fsck"] == "clean" and report["frames_mapped"] == 0


def test_a_draining_daemon_refuses_new_work_with_503(one_thread):
    srv = ServerThread(config())
    srv.daemon.begin_drain(kill=False)
    for path, body in (("/sys/spawn", {"tid": 1, "prompt": "hi"}),
                       ("/sys/spawn_n", {"tid": 1, "prompt": "hi", "n": 2})):
        status, answer = http_call(srv, "POST", path, body, key=ALICE)
        assert status == 503 and answer["errno"] == EAGAIN and "shutting down" in answer["message"], path
    # the daemon refuses exactly what the table marks as new work (sysapi reads Syscall.new_work)
    assert {n for n, sc in SYSCALLS.items() if sc.new_work} == {"spawn_tenant", "spawn", "spawn_n", "fork",
                                                                  "write", "shmget"}
    with pytest.raises(openai.APIStatusError) as refused:
        oai(srv).completions.create(model="alice", prompt="hi", max_tokens=2)
    assert refused.value.status_code == 503
    assert http_call(srv, "GET", "/healthz")[1]["status"] == "draining"
    assert http_call(srv, "POST", "/sys/ps", key=ROOT)[0] == 200      # looking is still allowed
    assert srv.stop()["fsck"] == "clean"
