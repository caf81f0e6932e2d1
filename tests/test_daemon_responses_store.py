"""Stored responses read back, through the unmodified openai client against kvosd on tiny-llama:
background responses (answered at once, retrieved until done, the same text as the kernel's own
interactive process, continued by fork; cancelled mid-turn, a kill, with the text they had; failed
with the kernel's error), a stored response's input items a page at a time; the 400s and the 409 that
say why not; every frame back."""
import time

import openai
import pytest

from tests import test_daemon_responses as base
from tests.test_daemon_responses import GREEDY, MODEL, turns, user
from userspace.daemon.config import DaemonConfig, TenantSpec
from userspace.daemon.listen import ServerThread

KEY, ROOT = base.KEY, base.ROOT     # the client fixture is base's: its key
pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py
LONG = dict(temperature=0, max_output_tokens=1500)     # tiny-llama's random weights rarely stop: ~1,500 steps
client, local = base.client, base.local   # the fixtures: the openai client (of this module's server); the model here


@pytest.fixture(scope="module")
def server(one_thread):
    srv = ServerThread(DaemonConfig(boot=dict(device="cpu", memory="8MiB", threads=1), root_key=ROOT,
                                    tenants=[TenantSpec(MODEL, MODEL, KEY)]))
    yield srv
    report = srv.stop()
    assert report["fsck"] == "clean" and report["frames_mapped"] == 0


def settled(client, rid, timeout=60.0):
    """The response once it is no longer queued or in progress."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.responses.retrieve(rid)
        if r.status not in ("queued", "in_progress"):
            return r
        assert time.monotonic() < deadline, f"{rid} still {r.status}"
        time.sleep(0.02)


def test_a_background_response_is_read_back_and_continued(client, local):
    want = turns(local, user("Hello"), user("And then?"), max_tokens=10, temperature=0)
    r = client.responses.create(model=MODEL, input="Hello", background=True, **GREEDY)
    assert r.background is True and r.status in ("queued", "in_progress") and r.output == []
    done = settled(client, r.id)
    assert done.status in ("completed", "incomplete") and done.output_text == want[0]
    assert done.background is True and done.usage.output_tokens <= 10
    nxt = client.responses.create(model=MODEL, input="And then?", previous_response_id=r.id, **GREEDY)
    assert nxt.output_text == want[1]
    assert client.responses.cancel(r.id).status == done.status     # a finished one is answered as it is
    assert client.responses.create(model=MODEL, input="And then?", previous_response_id=r.id,
                                   **GREEDY).output_text == want[1]   # and still continues
    for rid in (r.id, nxt.id):
        client.responses.delete(rid)


def test_a_cancelled_response_keeps_its_text_and_ends_its_process(client, local):
    r = client.responses.create(model=MODEL, input="Tell me everything.", background=True, **LONG)
    cancelled = client.responses.cancel(r.id)
    assert cancelled.status == "cancelled" and cancelled.background is True
    (long_want,) = turns(local, user("Tell me everything."), max_tokens=1500, temperature=0)
    text = cancelled.output_text
    assert len(text) < len(long_want) and long_want.startswith(text)   # cut where the kill came
    assert client.responses.retrieve(r.id).status == "cancelled"
    assert client.responses.cancel(r.id).status == "cancelled"        # a second cancel: the same answer
    with pytest.raises(openai.BadRequestError, match="cancelled: its process has ended"):
        client.responses.create(model=MODEL, input="more", previous_response_id=r.id, **GREEDY)
    client.responses.delete(r.id)


def test_a_background_response_streams_and_keeps_its_events(client, local):
    """background with stream: the events of a stream, kept, so GET with stream=true replays them from
    any sequence number (and follows the live ones); a client that leaves ends its stream, not the turn;
    a cancel ends the stream with the kill."""
    (want,) = turns(local, user("Hello"), max_tokens=10, temperature=0)
    events = list(client.responses.create(model=MODEL, input="Hello", background=True, stream=True, **GREEDY))
    assert events[0].type == "response.created" and events[0].response.status == "queued"
    assert events[1].type == "response.in_progress"
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want
    assert [e.sequence_number for e in events] == list(range(len(events)))
    rid = events[0].response.id
    replay = list(client.responses.retrieve(rid, stream=True))
    assert [e.model_dump() for e in replay] == [e.model_dump() for e in events]
    tail = list(client.responses.retrieve(rid, stream=True, starting_after=3))
    assert [e.model_dump() for e in tail] == [e.model_dump() for e in events[4:]]
    assert client.responses.retrieve(rid).output_text == want
    left = client.responses.create(model=MODEL, input="Tell me everything.", background=True, stream=True,
                                   **LONG)
    first = next(iter(left))
    left.close()                                  # the client goes; the turn goes on
    assert settled(client, first.response.id).status in ("completed", "incomplete")
    live = iter(client.responses.create(model=MODEL, input="Tell me everything.", background=True, stream=True,
                                        **LONG))
    opened = next(live)
    assert client.responses.cancel(opened.response.id).status == "cancelled"
    rest = list(live)
    assert rest[-1].type == "error" and rest[-1].code == "killed"
    for gone in (rid, first.response.id, opened.response.id):
        client.responses.delete(gone)


def test_what_background_refuses(client):
    with pytest.raises(openai.BadRequestError, match="background needs store"):
        client.responses.create(model=MODEL, input="Hi", background=True, store=False, **GREEDY)
    plain = client.responses.create(model=MODEL, input="Hi", **GREEDY)
    with pytest.raises(openai.BadRequestError, match="not created with background"):
        client.responses.cancel(plain.id)
    with pytest.raises(openai.BadRequestError, match="only a background response's events are kept"):
        list(client.responses.retrieve(plain.id, stream=True))
    with pytest.raises(openai.BadRequestError, match="starting_after needs stream=true"):
        client.responses.retrieve(plain.id, starting_after=2)
    running = client.responses.create(model=MODEL, input="Tell me everything.", background=True, **LONG)
    with pytest.raises(openai.ConflictError, match="still in progress"):
        client.responses.create(model=MODEL, input="more", previous_response_id=running.id, **GREEDY)
    client.responses.delete(running.id)            # a running turn deleted: its process killed, its id gone
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(running.id)
    client.responses.delete(plain.id)


def test_a_turn_whose_process_fails_is_failed_with_the_error(one_thread):
    """A pool of 6 frames (96 tokens), no swap: a turn that grows past it is ended by the kernel (ENOMEM)."""
    srv = ServerThread(DaemonConfig(boot=dict(device="cpu", memory=6 * 24576, swap=0, threads=1), root_key=ROOT,
                                    tenants=[TenantSpec(MODEL, MODEL, KEY)]))
    try:
        with openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0) as c:
            r = c.responses.create(model=MODEL, input="Hi", background=True, **LONG)
            failed = settled(c, r.id)
            assert failed.status == "failed" and "ENOMEM" in failed.error.message and failed.output == []
            with pytest.raises(openai.BadRequestError, match="failed: its process has ended"):
                c.responses.create(model=MODEL, input="more", previous_response_id=r.id, **GREEDY)
    finally:
        report = srv.stop()
    assert report["fsck"] == "clean" and report["frames_mapped"] == 0


def test_input_items_list_the_conversation_before_each_reply(client, server):
    first = client.responses.create(model=MODEL, input="Hello", instructions="Be brief.", **GREEDY)
    (item,) = client.responses.input_items.list(first.id).data        # the instructions are no item
    assert (item.type, item.role, item.content[0].type, item.content[0].text) == ("message", "user", "input_text",
                                                                                "Hello")
    said = [{"role": "assistant", "content": "Earlier."}, {"role": "user", "content": [
        {"type": "input_text", "text": "And then?"}]}]
    nxt = client.responses.create(model=MODEL, input=said, previous_response_id=first.id, **GREEDY)
    asc = client.responses.input_items.list(nxt.id, order="asc").data
    assert [i.id for i in asc] == [item.id, first.output[0].id] + [i.id for i in asc[2:]] and len(asc) == 4
    assert [(i.role, i.content[0].type, i.content[0].text) for i in asc] == [
        ("user", "input_text", "Hello"), ("assistant", "output_text", first.output_text),
        ("assistant", "output_text", "Earlier."), ("user", "input_text", "And then?")]
    desc = client.responses.input_items.list(nxt.id).data                 # newest first, by default
    assert [i.id for i in desc] == [i.id for i in asc][::-1]
    page = client.responses.input_items.list(nxt.id, order="asc", limit=1, after=asc[0].id)
    assert [i.id for i in page.data] == [asc[1].id] and page.has_more
    assert not client.responses.input_items.list(nxt.id, order="asc", limit=2, after=asc[1].id).has_more
    assert len(client.responses.input_items.list(nxt.id, include=["message.output_text.logprobs"]).data) == 4
    for query, reason in (({"limit": 0}, "limit"), ({"after": "msg_nope"}, "no item 'msg_nope'"),
                          ({"include": ["reasoning.encrypted_content"]}, "not supported"),
                          ({"before": asc[0].id}, "unknown query parameter 'before'")):
        with pytest.raises(openai.BadRequestError, match=reason):
            client.responses.input_items.list(nxt.id, extra_query=query)
    for rid in (first.id, nxt.id):
        client.responses.delete(rid)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(first.id)
