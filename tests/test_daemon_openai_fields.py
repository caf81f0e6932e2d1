"""The OpenAI fields beyond plain sampling, through the unmodified openai client against kvosd on
tiny-llama: logprobs in both shapes (streamed too), response_format (json_schema output valid on
every sampled choice, json_object), vLLM's structured_outputs (regex, choice, Lark and GBNF
grammars), penalties, beam search, and clear 400s for what stays unsupported. Tool calls are in
test_daemon_openai_tools.py, the prompt's side (echo, prompt_logprobs, truncation) in
test_daemon_openai_prompts.py."""
import json
import re

import openai
import pytest

import kernel
from tests.helpers.openai_server import MODEL, client_fixture, server_fixture
from tests.helpers.schemas import PERSON, assert_valid

KEY, ROOT, TOOLS_KEY = "fields-key-for-tests", "fields-root-for-tests", "tools-key-for-tests"
pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py
pytest.importorskip("llguidance")


server = server_fixture(KEY, TOOLS_KEY, ROOT)
client = client_fixture(KEY)


CHAT = [{"role": "user", "content": "Tell me about a person."}]
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def joined(content) -> str:
    return b"".join(bytes(e.bytes) for e in content).decode(errors="replace")


def test_chat_logprobs_streamed_or_not(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=12, temperature=0.9, seed=5, logprobs=True, top_logprobs=3)
    reply = client.chat.completions.create(**kw)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert joined(content) == reply.choices[0].message.content
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3 and isinstance(e.token, str)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    streamed = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    entries = [e for c in streamed if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in content]
    only = client.chat.completions.create(**{**kw, "top_logprobs": None})
    assert all(e.top_logprobs == [] for e in only.choices[0].logprobs.content)
    assert client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3).choices[0].logprobs is None


def test_completion_logprobs_streamed_or_not(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0.7, seed=2, logprobs=2)
    reply = client.completions.create(**kw)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == value and 2 <= len(top) <= 3
    chunks = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True)
              if c.choices and c.choices[0].logprobs]
    assert sum((c.tokens for c in chunks), []) == lp.tokens
    assert sum((c.text_offset for c in chunks), []) == lp.text_offset


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_output_validates_on_every_sampled_choice(client, seed):
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=96, temperature=1.0, seed=seed,
                                           n=3, response_format=PERSON_FORMAT)
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        assert_valid(PERSON, json.loads(choice.message.content))


def test_json_schema_streamed_and_in_completions(client):
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=96, temperature=1.2, seed=9,
                                            response_format=PERSON_FORMAT, stream=True)
    assert_valid(PERSON, json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)))
    reply = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=96, temperature=1.0, seed=1,
                                      extra_body={"response_format": PERSON_FORMAT})
    assert_valid(PERSON, json.loads(reply.choices[0].text))


def test_json_object_gives_an_object(client):
    """Any object: random weights rarely close a free string within max_tokens (about one choice in
    ten closes at once, '{}': hence 32 of them), but every choice is an object's beginning, and
    every one that stops is a whole object."""
    choices = [c for seed in range(8) for c in client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=32, temperature=0.5, seed=seed, n=4,
        response_format={"type": "json_object"}).choices]
    done = [c for c in choices if c.finish_reason == "stop"]
    assert done and all(isinstance(json.loads(c.message.content), dict) for c in done)
    assert all(c.message.content.startswith("{") for c in choices)


CODE = r"[A-Z]{2}-[0-9]{3}"


def test_structured_outputs_regex_matches_every_sampled_choice(client):
    """vLLM's structured_outputs: the whole reply matches the regex, sampled, streamed, in completions."""
    body = {"structured_outputs": {"regex": CODE}}
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=1.2, seed=3,
                                           n=4, extra_body=body)
    for choice in reply.choices:
        assert choice.finish_reason == "stop" and re.fullmatch(CODE, choice.message.content), choice
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=1.2, seed=3,
                                            stream=True, extra_body=body)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content
    text = client.completions.create(model=MODEL, prompt="Code:", max_tokens=16, temperature=1.0, seed=4,
                                     extra_body=body).choices[0].text
    assert re.fullmatch(CODE, text), text


def test_structured_outputs_choice_and_grammars(client):
    choices = ["yes", "no", "maybe not"]
    got = {c.message.content for seed in range(3) for c in client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=1.5, seed=seed, n=4,
        extra_body={"structured_outputs": {"choice": choices}}).choices}
    assert got and got <= set(choices)
    lark = 'start: ANSWER " " NUM\nANSWER: "yes" | "no"\nNUM: /[0-9]{1,2}/'
    gbnf = 'root ::= ("yes" | "no") " " [0-9] [0-9]?'           # vLLM's examples write GBNF
    for grammar in (lark, gbnf):
        for c in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, seed=2,
                                                n=3, extra_body={"structured_outputs": {"grammar": grammar}}).choices:
            assert c.finish_reason == "stop" and re.fullmatch(r"(yes|no) [0-9]{1,2}", c.message.content), c


def test_structured_outputs_json_equals_response_format(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=96, temperature=1.0, seed=11, n=2)
    want = [c.message.content for c in client.chat.completions.create(**kw, response_format=PERSON_FORMAT).choices]
    for schema in (PERSON, json.dumps(PERSON)):             # an object, or its JSON text
        got = client.chat.completions.create(**kw, extra_body={"structured_outputs": {"json": schema,
                                                                                      "disable_fallback": True}})
        assert [c.message.content for c in got.choices] == want
    assert all(isinstance(json.loads(w), dict) for w in want)


def test_penalties_are_accepted_and_equal_the_kernel(client):
    k = kernel.boot(memory="8MiB", threads=1)
    root = k.syscalls()
    tid = root.spawn_tenant(MODEL)
    penalties = dict(frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.3, min_p=0.05)
    want = root.wait(root.spawn(tid, "Hello", max_tokens=16, temperature=0, ignore_eos=True, **penalties))
    plain = root.wait(root.spawn(tid, "Hello", max_tokens=16, temperature=0, ignore_eos=True))
    assert want.tokens != plain.tokens
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=16, temperature=0,
                                      frequency_penalty=1.5, presence_penalty=0.5,
                                      extra_body={"repetition_penalty": 1.3, "min_p": 0.05, "ignore_eos": True,
                                                  "return_token_ids": True})
    assert reply.choices[0].model_extra["token_ids"] == want.tokens


def test_allowed_token_ids_equal_the_kernel(client):
    k = kernel.boot(memory="8MiB", threads=1)
    root = k.syscalls()
    tid = root.spawn_tenant(MODEL)
    ids = [17, 42, 99, 300]
    want = root.wait(root.spawn(tid, "Hello", max_tokens=10, temperature=0.9, seed=3, ignore_eos=True,
                                allowed_token_ids=ids))
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=10, temperature=0.9, seed=3,
                                      extra_body={"allowed_token_ids": ids, "ignore_eos": True,
                                                  "return_token_ids": True})
    assert reply.choices[0].model_extra["token_ids"] == want.tokens and set(want.tokens) <= set(ids)


def test_bad_words_equal_the_kernel_s_bad_words_ids(client):
    """vLLM's bad_words: kvosd spells each word alone and after a space (libc.bad_words) and the
    kernel bans the sequences; the reply holds none of the words."""
    from userspace.libc.bad_words import bad_words_ids
    k = kernel.boot(memory="8MiB", threads=1)
    root = k.syscalls()
    tid = root.spawn_tenant(MODEL)
    greedy = dict(max_tokens=16, temperature=0, ignore_eos=True)
    plain = root.wait(root.spawn(tid, "Hello", **greedy))
    words = [w for w in plain.text.split() if w.isalpha()][:2]
    assert words, plain.text
    want = root.wait(root.spawn(tid, "Hello", bad_words_ids=bad_words_ids(root, tid, words), **greedy))
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=16, temperature=0,
                                      extra_body={"bad_words": words, "ignore_eos": True, "return_token_ids": True})
    assert reply.choices[0].model_extra["token_ids"] == want.tokens != plain.tokens
    assert not any(f" {w} " in f" {reply.choices[0].text} " for w in words)


def test_logit_bias_and_min_tokens_equal_the_kernel_over_both_doors(client, server):
    from userspace.daemon.client import Client
    k = kernel.boot(memory="8MiB", threads=1)
    root = k.syscalls()
    tid = root.spawn_tenant(MODEL)
    plain = root.wait(root.spawn(tid, "Hello", max_tokens=12, temperature=0, ignore_eos=True))
    bias = {plain.tokens[0]: -100, 77: 5.5}
    shaped = dict(logit_bias=bias, min_tokens=4, stop_token_ids=[plain.tokens[1]])
    want = root.wait(root.spawn(tid, "Hello", max_tokens=12, temperature=0, ignore_eos=True, **shaped))
    assert want.tokens[0] != plain.tokens[0] and plain.tokens[1] not in want.tokens[:4]
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0,
                                      logit_bias={str(t): b for t, b in bias.items()},
                                      extra_body={"min_tokens": 4, "ignore_eos": True, "return_token_ids": True,
                                                  "stop_token_ids": [plain.tokens[1]]})
    assert reply.choices[0].model_extra["token_ids"] == want.tokens
    with Client(server.url, KEY) as remote:                 # the syscall door, token ids as ints
        mine = next(t.tid for t in remote.schedstat().tenants if t.name == MODEL)
        got = remote.wait(remote.spawn(mine, "Hello", max_tokens=12, temperature=0, ignore_eos=True, **shaped))
    assert got.tokens == want.tokens


@pytest.mark.parametrize("body, reason", [
    ({"frequency_penalty": 2.5}, "frequency_penalty must be <= 2"),
    ({"presence_penalty": -3}, "presence_penalty must be >= -2"),
    ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
    ({"min_p": 1.5}, "min_p must be <= 1"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be in [0, 20]"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ({"logprobs": 3}, "logprobs"),
    ({"response_format": {"type": "xml"}}, "response_format.type must be"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "json_schema cannot be compiled"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "the chat template of tiny-llama takes no tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "takes no tools"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                                 "function": {"name": "g"}}},
     "not among the tools"),
    ({"tools": [{"type": "retrieval"}]}, "only {'type': 'function'"),
    ({"logit_bias": {"5": 101}}, "logit_bias[5] must be <= 100"),
    ({"logit_bias": {"x": 1}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {"99999": 1}}, "logit_bias token id 99999 is outside the vocabulary"),
    ({"min_tokens": 3}, "min_tokens 3 exceeds max_tokens 2"),
    ({"min_tokens": 1, "response_format": {"type": "json_object"}}, "min_tokens cannot be combined"),
    ({"allowed_token_ids": [99999]}, "allowed_token_ids: token id 99999 is outside the vocabulary"),
    ({"allowed_token_ids": [5], "structured_outputs": {"regex": "a+"}}, "allowed_token_ids cannot be combined"),
    ({"bad_words": ["ok", ""]}, "bad_words must be a list of non-empty words"),
    ({"bad_words": ["ok"], "allowed_token_ids": [5]}, "bad_words_ids cannot be combined"),
    ({"bad_words": ["ok"], "use_beam_search": True}, "bad_words with use_beam_search is not supported"),
    ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex: "),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "give exactly one of structured_outputs.json,"),
    ({"structured_outputs": {}}, "give exactly one of structured_outputs.json,"),
    ({"structured_outputs": {"choice": ["a", 1]}}, "choice must be a list of non-empty strings"),
    ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs.grammar: "),
    ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs.grammar: "),
    ({"structured_outputs": {"json": "{"}}, "structured_outputs.json is not JSON"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag is not supported"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "are exclusive"),
    ({"structured_outputs": {"choice": ["a"]}, "min_tokens": 1}, "min_tokens cannot be combined"),
    ({"suffix": "x"}, "suffix is not supported"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
    ({"length_penalty": 1.5}, "length_penalty with use_beam_search only"),
    ({"audio": {"voice": "x"}}, "audio is not supported"),
])
def test_what_stays_unsupported_or_out_of_range_is_a_400_naming_the_field(client, body, reason):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, extra_body=body)
    assert reason in err.value.body["message"], err.value.body


def test_include_stop_str_in_output_streamed_or_not(client):
    kw = dict(model=MODEL, prompt="Hello there", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0].text
    at = next(i for i in range(len(plain) // 2, len(plain) - 2) if plain[i:i + 2].isascii())
    stop = plain[at:at + 2]
    at = plain.find(stop)
    kw["extra_body"] = {"ignore_eos": True, "include_stop_str_in_output": True}
    kept = client.completions.create(**kw, stop=[stop]).choices[0]
    assert kept.finish_reason == "stop" and kept.text == plain[:at + 2]
    assert "".join(c.choices[0].text for c in client.completions.create(**kw, stop=[stop], stream=True)) == kept.text
    kw["extra_body"] = {"ignore_eos": True}
    assert client.completions.create(**kw, stop=[stop]).choices[0].text == plain[:at]


def test_beam_search_gives_libc_s_beams(client, server):
    """use_beam_search: the n best beams of userspace/libc/beam.py's search (forks and kills), best
    first, in both endpoints; every process ends (the module's server stops with fsck clean)."""
    from userspace import libc
    k = kernel.boot(memory="8MiB", threads=1)
    root = k.syscalls()
    tid = root.spawn_tenant(MODEL)
    eos = root.tenantinfo(tid).eos_token_ids
    for prompt, create, extra in (("Once upon a time", client.completions.create, {}),
                                  (CHAT, client.chat.completions.create, {"ignore_eos": True})):
        beams = libc.beam_search(root, tid, prompt, width=3, max_tokens=6, eos_token_ids=() if extra else eos)
        kw = {"prompt": prompt} if isinstance(prompt, str) else {"messages": prompt}
        reply = create(model=MODEL, n=3, max_tokens=6, temperature=0, **kw,
                       extra_body={"use_beam_search": True, "return_token_ids": True, **extra})
        assert [c.model_extra["token_ids"] for c in reply.choices] == [b.tokens for b in beams]
        texts = [c.text if isinstance(prompt, str) else c.message.content for c in reply.choices]
        assert texts == [root.detokenize(tid, b.tokens[:-1] if b.finished else b.tokens) for b in beams]
        assert [c.finish_reason for c in reply.choices] == ["stop" if b.finished else "length" for b in beams]
        assert reply.usage.completion_tokens == sum(len(b.tokens) for b in beams)
        assert reply.usage.prompt_tokens == len(root.tokenize(tid, prompt))
    assert server.daemon.root.meminfo().mapped == 0


@pytest.mark.parametrize("body, reason", [
    ({"stream": True}, "stream with use_beam_search is not supported"),
    ({"temperature": 0.7}, "temperature with use_beam_search must be 0 or 1"),
    ({"top_p": 0.5}, "top_p with use_beam_search is not supported"),
    ({"logprobs": 2}, "logprobs with use_beam_search is not supported"),
    ({"stop": ["x"]}, "stop with use_beam_search is not supported"),
    ({"max_tokens": 0}, "max_tokens with use_beam_search must be at least 1"),
    ({"n": 21}, "n with use_beam_search is at most 20"),
])
def test_beam_search_refuses_what_it_cannot_honour(client, body, reason):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="Hi", **{"n": 2, "max_tokens": 4, **body},
                                  extra_body={"use_beam_search": True})
    assert reason in err.value.body["message"], err.value.body


def test_vllm_extensions_at_their_defaults_are_accepted(client):
    """Clients written for vLLM send its extensions at their defaults; they mean what kvosd does."""
    defaults = {"skip_special_tokens": True, "spaces_between_special_tokens": True, "add_generation_prompt": True,
                "continue_final_message": False, "use_beam_search": False, "length_penalty": 1.0}     # these two: off
    kw = dict(model=MODEL, messages=CHAT, max_tokens=6, temperature=0)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw, extra_body=defaults).choices[0].message.content == plain


def test_tools_with_tool_choice_none_are_accepted(client):
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, tool_choice="none",
                                           tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert reply.choices[0].message.tool_calls is None


def fields_table() -> list:
    """docs/daemon.md's table of request fields: [(field, endpoints, status)] (a field may have a row
    per endpoint)."""
    import pathlib
    text = (pathlib.Path(__file__).parent.parent / "docs" / "daemon.md").read_text()
    head = text.index("| field | endpoint | kvosd | notes |")
    rows = []
    for line in text[head:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        names, endpoint, status = (cell.strip() for cell in line.strip("|").split("|")[:3])
        ends = {"chat", "completions"} if endpoint == "both" else {endpoint}
        rows += [(name.strip().strip("`"), ends, status) for name in names.split(",")]
    return rows


def test_the_docs_field_table_matches_the_request_models():
    from userspace.daemon.openai_requests import IGNORED, OFF_VALUES, ChatRequest, CompletionRequest
    rows = fields_table()
    for endpoint, model in (("chat", ChatRequest), ("completions", CompletionRequest)):
        served = {name for name, ends, status in rows if endpoint in ends and status in ("supported", "extension")}
        assert served == set(model.model_fields), endpoint
        refused = {name for name, ends, status in rows if endpoint in ends and status == "refused"}
        assert refused == set(OFF_VALUES) - set(model.model_fields), endpoint
    assert {name for name, _, status in rows if status == "ignored"} == IGNORED
    assert {status for *_, status in rows} == {"supported", "extension", "ignored", "refused"}
