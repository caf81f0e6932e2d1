"""The Responses API (/v1/responses) through the unmodified openai client against kvosd on tiny-llama:
the same text as the kernel's own interactive process, streamed or not; stored responses continued by
fork (branches), read back, deleted and evicted; text.format; logprobs; clear 400s; every frame back.
Function tools are in test_daemon_responses_tools.py."""
import json

import openai
import pytest

import kernel
from tests.helpers.schemas import PERSON, assert_valid
from tests.kernel_helpers import turn_text
from userspace.daemon.config import DaemonConfig, TenantSpec
from userspace.daemon.listen import ServerThread
from userspace.daemon.openai_response_store import STORED_PER_TENANT

KEY, ROOT, SMALL = "responses-key-for-tests", "responses-root-for-tests", "responses-small-for-tests"
MODEL = "tiny-llama"
pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py
GREEDY = dict(temperature=0, max_output_tokens=10)


@pytest.fixture(scope="module")
def server(one_thread):
    srv = ServerThread(DaemonConfig(boot=dict(device="cpu", memory="8MiB", threads=1), root_key=ROOT,
                                    tenants=[TenantSpec(MODEL, MODEL, KEY),
                                             TenantSpec("small", MODEL, SMALL, {"max_procs": 4})]))
    yield srv
    report = srv.stop()
    assert report["fsck"] == "clean" and report["frames_mapped"] == 0


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def local():
    """The same model in a kernel of this process: what each response must say."""
    k = kernel.boot(memory="8MiB", threads=1)
    root = k.syscalls()
    return root, root.spawn_tenant(MODEL)


def turns(local, *messages, **params):
    """The texts of an interactive process given each message list in turn (spawn, then write)."""
    root, tid = local
    pid, out = None, []
    for batch in messages:
        if pid is None:
            pid = root.spawn(tid, list(batch), interactive=True, **params)
        else:
            root.write(pid, list(batch))
        out.append(turn_text(root, pid))
    root.wait(pid)
    return out


def user(text):
    return [{"role": "user", "content": text}]


def test_a_response_says_what_the_kernel_says_streamed_or_not(client, local):
    (want,) = turns(local, [{"role": "system", "content": "Be brief."}] + user("Hello"), max_tokens=10,
                    temperature=0)
    r = client.responses.create(model=MODEL, input="Hello", instructions="Be brief.", store=False, **GREEDY)
    assert r.output_text == want and r.status in ("completed", "incomplete")
    assert r.usage.output_tokens <= 10 and r.usage.input_tokens > 0
    events = list(client.responses.create(model=MODEL, input="Hello", instructions="Be brief.", store=False,
                                          stream=True, **GREEDY))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want
    assert events[-1].response.output_text == want
    assert [e.sequence_number for e in events] == list(range(len(events)))
    parts = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}]
    assert client.responses.create(model=MODEL, input=parts, instructions="Be brief.", store=False,
                                   **GREEDY).output_text == want


def test_previous_response_id_continues_by_fork_and_branches(client, local, server):
    first, second = turns(local, user("Hi"), user("And then?"), max_tokens=10, temperature=0)
    r1 = client.responses.create(model=MODEL, input="Hi", **GREEDY)
    assert r1.output_text == first and r1.store
    r2 = client.responses.create(model=MODEL, input="And then?", previous_response_id=r1.id, **GREEDY)
    assert r2.output_text == second and r2.previous_response_id == r1.id
    assert r2.usage.input_tokens_details.cached_tokens > 0             # the first turn was not computed again
    again = client.responses.create(model=MODEL, input="And then?", previous_response_id=r1.id, **GREEDY)
    assert again.output_text == second and again.id != r2.id           # a branch of the same response
    assert client.responses.retrieve(r2.id).output_text == second
    client.responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r1.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="More", previous_response_id=r1.id, **GREEDY)
    for r in (r2, again):
        client.responses.delete(r.id)
    assert server.daemon.root.meminfo().mapped == 0 and not server.daemon.root.ps()


def test_a_tenant_keeps_its_latest_responses(client, server):
    ids = [client.responses.create(model=MODEL, input=f"Number {i}", **GREEDY).id
           for i in range(STORED_PER_TENANT + 2)]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[0])                  # the oldest went, and its process with it
    assert client.responses.retrieve(ids[-1]).id == ids[-1]
    assert len(server.daemon.root.ps()) == STORED_PER_TENANT
    for rid in ids[2:]:
        client.responses.delete(rid)
    assert not server.daemon.root.ps()


def test_stored_responses_take_at_most_half_a_tenant_s_processes(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=SMALL, max_retries=0) as small:
        ids = [small.responses.create(model="small", input=f"Hi {i}", **GREEDY).id for i in range(3)]
        with pytest.raises(openai.NotFoundError):
            small.responses.retrieve(ids[0])
        assert [small.responses.retrieve(r).id for r in ids[1:]] == ids[1:]
        assert small.responses.create(model="small", input="Not stored", store=False, **GREEDY).output_text
        for rid in ids[1:]:
            small.responses.delete(rid)
    assert not server.daemon.root.ps()


def test_text_format_json_schema(client):
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    r = client.responses.create(model=MODEL, input="A person", text=fmt, temperature=0, max_output_tokens=96,
                                store=False)
    assert r.status == "completed"
    assert_valid(PERSON, json.loads(r.output_text))


@pytest.mark.parametrize("body, reason", [
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "the chat template of tiny-llama takes no"),
    ({"tools": [{"type": "web_search_preview"}]}, "tools.0.type 'web_search_preview' is not supported"),
    ({"tools": [{"type": "function", "name": "f g"}]}, "tools.0.name must be"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
     "not among the tools"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"reasoning": {"effort": "low"}}, "reasoning is not supported"),
    ({"include": ["file_search_call.results"]}, "include 'file_search_call.results' is not supported"),
    ({"top_logprobs": 21}, "top_logprobs must be in [0, 20]"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input.0.type"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0.call_id must be"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "only text parts"),
    ({"text": {"format": {"type": "xml"}}}, "response_format.type must be"),
    ({"previous_response_id": "resp_nope"}, "no stored response"),
])
def test_what_it_cannot_serve_is_a_400_or_404_naming_it(client, body, reason):
    with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as err:
        client.responses.create(model=MODEL, **{"input": "Hi", "max_output_tokens": 2, **body})
    assert reason in err.value.body["message"], err.value.body


def test_a_continuation_keeps_its_first_turn_s_parameters(client):
    r1 = client.responses.create(model=MODEL, input="Hi", **GREEDY)
    for change, reason in (({"temperature": 0.5}, "temperature differs"), ({"instructions": "x"}, "instructions")):
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model=MODEL, input="More", previous_response_id=r1.id, **{**GREEDY, **change})
        assert reason in err.value.body["message"]
    client.responses.delete(r1.id)


def test_a_client_that_leaves_mid_stream_ends_its_process(server):
    """The loop is paused as the stream opens, so the turn cannot end before the client leaves."""
    import http.client
    import time
    root = server.daemon.root
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    root.loopctl("pause")
    try:
        conn.request("POST", "/v1/responses", body=json.dumps({"model": MODEL, "input": "Tell a long story",
                                                               "max_output_tokens": 200, "stream": True}),
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        line = b""
        while not line.startswith(b"event: response."):          # past the chunk-size line
            line = resp.fp.readline()
            assert line, "the stream ended at once"
        assert line == b"event: response.created\n"
        pid = int(resp.getheader("X-Kvos-Pids"))
        assert any(p.pid == pid for p in root.ps())
        conn.sock.close()
        conn.close()
        deadline = time.monotonic() + 10
        while any(p.pid == pid for p in root.ps()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(p.pid == pid for p in root.ps()) and root.meminfo().mapped == 0
    finally:
        root.loopctl("resume")


def test_a_killed_response_is_cancelled(client, server):
    """Someone kills the process before its turn ends (the loop paused meanwhile): the response comes
    back cancelled, and nothing is stored."""
    import threading
    import time
    root = server.daemon.root
    before = {p.pid for p in root.ps()}
    root.loopctl("pause")
    killed = []

    def kill_it():
        deadline = time.monotonic() + 10
        while not killed and time.monotonic() < deadline:
            for p in root.ps():
                if p.pid not in before:
                    root.kill(p.pid)
                    killed.append(p.pid)
            time.sleep(0.002)
        root.loopctl("resume")
    killer = threading.Thread(target=kill_it)
    killer.start()
    try:
        r = client.responses.create(model=MODEL, input="Tell a long story", max_output_tokens=50, store=True,
                                    temperature=0)
    finally:
        killer.join()
    assert killed and r.status == "cancelled"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)                      # nothing left to continue
    assert {p.pid for p in root.ps()} == before


def test_any_sequence_of_stored_responses_keeps_one_process_each(server, client):
    """hypothesis: creates (stored or not), continuations of any stored response, deletes and reads, in
    any order, against a model of the store (newest 16 kept). After every request the tenant's
    processes are exactly the stored responses' and each of those reads back; at the end, nothing."""
    import hypothesis.strategies as st
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import (
        RuleBasedStateMachine,
        initialize,
        invariant,
        precondition,
        rule,
        run_state_machine_as_test,
    )
    root = server.daemon.root
    SHORT = {**GREEDY, "max_output_tokens": 3}     # one conversation's parameters: continuations repeat them

    class Store(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.kept = []                      # stored response ids, oldest first
            self.gone = []                      # ids deleted or evicted

        def _stored(self, rid):
            self.kept.append(rid)
            while len(self.kept) > STORED_PER_TENANT:
                self.gone.append(self.kept.pop(0))

        @initialize()
        def fill_the_store(self):                  # one more than it keeps: every sequence evicts
            for i in range(STORED_PER_TENANT + 1):
                r = client.responses.create(model=MODEL, input=f"Hi {i}", **SHORT)
                self._stored(r.id)

        @rule(store=st.booleans(), word=st.sampled_from(["Hi", "Why?", "Go on"]))
        def create(self, store, word):
            r = client.responses.create(model=MODEL, input=word, store=store, **SHORT)
            if store:
                self._stored(r.id)

        @precondition(lambda self: self.kept)
        @rule(pick=st.integers(0, 100), store=st.booleans())
        def continue_one(self, pick, store):
            rid = self.kept[pick % len(self.kept)]
            r = client.responses.create(model=MODEL, input="More", previous_response_id=rid, store=store, **SHORT)
            assert r.previous_response_id == rid
            if store:
                self._stored(r.id)

        @precondition(lambda self: self.kept)
        @rule(pick=st.integers(0, 100))
        def delete(self, pick):
            rid = self.kept.pop(pick % len(self.kept))
            client.responses.delete(rid)
            self.gone.append(rid)

        @precondition(lambda self: self.gone)
        @rule(pick=st.integers(0, 100))
        def a_gone_one_is_404(self, pick):
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(self.gone[pick % len(self.gone)])

        @invariant()
        def one_sleeping_process_per_stored_response(self):
            assert len(root.ps()) == len(self.kept)
            assert all(client.responses.retrieve(rid).id == rid for rid in self.kept[-2:])

        def teardown(self):
            for rid in self.kept:
                client.responses.delete(rid)
            assert not root.ps() and root.meminfo().mapped == 0

    run_state_machine_as_test(Store, settings=settings(max_examples=8, stateful_step_count=40, deadline=None,
                                                       suppress_health_check=list(HealthCheck)))


def test_logprobs_equal_the_kernel_s_streamed_or_not(client, local):
    """include message.output_text.logprobs (and top_logprobs): the text's tokens with their logprobs
    and the most likely beside each, as the kernel's own process reports them, whole or in deltas; a
    continuation keeps them; with tools they are a 400."""
    root, tid = local
    pid = root.spawn(tid, user("Hello"), max_tokens=10, temperature=0, logprobs=2)
    entries, done = [], False
    while not done:
        r = root.read(pid, timeout=30)
        entries, done = entries + r.logprobs, r.turn_done
    root.wait(pid)
    want = [(e.text, round(e.logprob, 5), [t.text for t in e.top]) for e in entries]
    kw = dict(model=MODEL, input="Hello", include=["message.output_text.logprobs"], top_logprobs=2, **GREEDY)
    r1 = client.responses.create(**kw)
    got = r1.output[0].content[0].logprobs
    assert [(e.token, round(e.logprob, 5), [t.token for t in e.top_logprobs]) for e in got] == want
    assert b"".join(bytes(e.bytes) for e in got).decode(errors="replace") == r1.output_text
    events = list(client.responses.create(**{**kw, "store": False}, stream=True))
    streamed = [e for ev in events if ev.type == "response.output_text.delta" for e in ev.logprobs]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(t, lp) for t, lp, _ in want]
    done = next(ev for ev in events if ev.type == "response.output_text.done")
    assert len(done.logprobs) == len(want)
    r2 = client.responses.create(**{**kw, "input": "More"}, previous_response_id=r1.id)
    assert len(r2.output[0].content[0].logprobs) == r2.usage.output_tokens
    with pytest.raises(openai.BadRequestError, match="include differs"):
        client.responses.create(model=MODEL, input="More", previous_response_id=r1.id, top_logprobs=2, **GREEDY)
    plain = client.responses.create(model=MODEL, input="Hello", store=False, **GREEDY)
    assert plain.output[0].content[0].logprobs == []
    for rid in (r1.id, r2.id):
        client.responses.delete(rid)
