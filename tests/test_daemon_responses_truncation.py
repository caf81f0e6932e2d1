"""The Responses API's truncation "auto" through the unmodified openai client against kvosd: a tenant
whose prompt limit is 100 tokens (tiny-llama spells about a token a byte). Too long, a conversation
drops its oldest messages after the instructions, so that it starts at a user message; the reply is
the kernel's own for the fitted conversation; a continuation past the limit is rebuilt from what was
stored and fitted; without truncation each is a 413 (E2BIG), and so is a last item too long alone."""
import openai
import pytest

import kernel
from tests.kernel_helpers import turn_text
from userspace.daemon.config import DaemonConfig, TenantSpec
from userspace.daemon.listen import ServerThread

KEY, ROOT = "truncation-key-for-tests", "truncation-root-for-tests"
MODEL, LIMIT = "tiny-llama", 100
pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py
GREEDY = dict(temperature=0, max_output_tokens=8)
SYSTEM = {"role": "system", "content": "Be brief."}


@pytest.fixture(scope="module")
def server(one_thread):
    srv = ServerThread(DaemonConfig(boot=dict(device="cpu", memory="8MiB", threads=1), root_key=ROOT,
                                    tenants=[TenantSpec("short", MODEL, KEY, {"max_prompt_tokens": LIMIT})]))
    yield srv
    report = srv.stop()
    assert report["fsck"] == "clean" and report["frames_mapped"] == 0


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def local():
    """The same tenant in a kernel of this process: the oracle."""
    root = kernel.boot(memory="8MiB", threads=1).syscalls()
    return root, root.spawn_tenant(MODEL, max_prompt_tokens=LIMIT)


def reply(local, messages) -> str:
    """The greedy reply of a process spawned with messages (one interactive turn, as kvosd spawns)."""
    root, tid = local
    pid = root.spawn(tid, messages, interactive=True, max_tokens=8, temperature=0)
    text = turn_text(root, pid)
    root.kill(pid)
    root.wait(pid)
    return text


def fitted(local, messages) -> list:
    """The oracle of truncation, by linear search: the system head and the rest from the earliest user
    message (or the last item) whose tokens fit the limit."""
    root, tid = local
    head = [m for m in messages if m["role"] == "system"][:1]
    rest = messages[len(head):]
    for i, m in enumerate(rest):
        if m["role"] == "user" or i == len(rest) - 1:
            if len(root.tokenize(tid, head + rest[i:])) <= LIMIT:
                return head + rest[i:]
    raise AssertionError("nothing fits")


def conversation(turns: int) -> list:
    items = []
    for i in range(turns):
        items += [{"role": "user", "content": f"Question number {i} about the weather today"},
                  {"role": "assistant", "content": f"Answer {i}: it is sunny"}]
    return items + [{"role": "user", "content": "And tomorrow?"}]


def test_auto_drops_the_oldest_messages_until_the_rest_fits(client, local, server):
    items = conversation(4)
    with pytest.raises(openai.APIStatusError, match="exceeds tenant 'short''s limit of 100") as err:
        client.responses.create(model="short", input=items, instructions="Be brief.", store=False, **GREEDY)
    assert err.value.status_code == 413                 # E2BIG
    want = fitted(local, [SYSTEM] + items)
    assert 1 < len(want) < len(items) and want[0] == SYSTEM and want[1]["role"] == "user"
    r = client.responses.create(model="short", input=items, instructions="Be brief.", store=False,
                                truncation="auto", **GREEDY)
    assert r.truncation == "auto" and r.output_text == reply(local, want)
    assert r.usage.input_tokens == len(local[0].tokenize(local[1], want)) <= LIMIT
    short = client.responses.create(model="short", input="Hi", store=False, truncation="auto", **GREEDY)
    assert short.output_text == reply(local, [{"role": "user", "content": "Hi"}])    # fits: nothing dropped
    assert not server.daemon.root.ps()


def test_a_last_item_too_long_alone_is_still_refused(client, server):
    with pytest.raises(openai.APIStatusError, match="does not fit the tenant's prompt limit") as err:
        client.responses.create(model="short", input="x" * (2 * LIMIT), truncation="auto", **GREEDY)
    assert err.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="truncation must be"):
        client.responses.create(model="short", input="Hi", truncation="sometimes", **GREEDY)
    assert not server.daemon.root.ps()


def test_a_continuation_past_the_limit_is_rebuilt_and_fitted(client, local, server):
    first = "Tell me about the weather in the north of the country today, and the wind and the rain there, please"
    r1 = client.responses.create(model="short", input=first, **GREEDY)
    assert r1.output_text == reply(local, [{"role": "user", "content": first}])
    second = "And what about the south of the country tomorrow, and the day after?"
    with pytest.raises(openai.APIStatusError, match="exceeds tenant 'short''s limit") as err:
        client.responses.create(model="short", input=second, previous_response_id=r1.id, **GREEDY)
    assert err.value.status_code == 413
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": r1.output_text},
               {"role": "user", "content": second}]
    want = fitted(local, history)
    assert want == history[2:]                      # the first exchange went
    r2 = client.responses.create(model="short", input=second, previous_response_id=r1.id, truncation="auto",
                                 **GREEDY)
    assert r2.output_text == reply(local, want) and r2.usage.input_tokens_details.cached_tokens == 0
    third = "Thanks"                                # r2's own conversation continues by fork, as any
    r3 = client.responses.create(model="short", input=third, previous_response_id=r2.id, truncation="auto",
                                 **GREEDY)
    assert r3.usage.input_tokens_details.cached_tokens > 0
    again = client.responses.create(model="short", input="Hi", previous_response_id=r1.id, **GREEDY)
    assert again.output_text                        # r1 is as it was: a short continuation forks it
    for r in (r1, r2, r3, again):
        client.responses.delete(r.id)
    assert server.daemon.root.meminfo().mapped == 0 and not server.daemon.root.ps()
