"""The prompt's side of the OpenAI API, through the unmodified openai client against kvosd on
tiny-llama: echo with logprobs (what evaluation harnesses send), vLLM's prompt_logprobs in its own
shape, truncate_prompt_tokens and the chat template's add_generation_prompt and
continue_final_message, each against the kernel's own answer."""
import openai
import pytest

import kernel
from tests.helpers.openai_server import MODEL, client_fixture, server_fixture

KEY, ROOT, TOOLS_KEY = "prompts-key-for-tests", "prompts-root-for-tests", "prompts-tools-key-for-tests"
CHAT = [{"role": "user", "content": "Tell me about a person."}]
pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


server = server_fixture(KEY, TOOLS_KEY, ROOT)
client = client_fixture(KEY)


def test_echo_with_logprobs_scores_the_prompt_as_the_kernel_does(client):
    """What lm-evaluation-harness sends for a log-likelihood: token ids, echo, logprobs 1, one token."""
    k = kernel.boot(memory="8MiB", threads=1)
    root = k.syscalls()
    tid = root.spawn_tenant(MODEL)
    ids = root.tokenize(tid, "The page table maps virtual pages to frames")
    pid = root.spawn(tid, ids, max_tokens=1, temperature=0, logprobs=2, prompt_logprobs=2)
    first = root.read(pid, timeout=30)
    want = first.prompt_logprobs
    assert len(want) == len(ids) and want[0].logprob is None and all(e.logprob < 0 for e in want[1:])
    reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=2)
    choice = reply.choices[0]
    lp = choice.logprobs
    echo = root.detokenize(tid, ids)
    assert choice.text == echo + first.text
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([e.logprob for e in want[1:]], abs=1e-5)
    assert lp.token_logprobs[-1] == pytest.approx(first.logprobs[0].logprob, abs=1e-5)
    assert all(len(top) in (2, 3) for top in lp.top_logprobs[1:])          # the 2 most likely and the token
    assert lp.text_offset[len(ids)] == len(echo) and lp.text_offset[:2] == [0, len(want[0].text)]
    # Streamed: the first chunk carries the echo and the prompt's entries; the whole equals the reply.
    chunks = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    streamed = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs
    offsets = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset
    # Text prompts echo as given, with or without logprobs.
    plain = client.completions.create(model=MODEL, prompt="Hi there", max_tokens=2, temperature=0, echo=True)
    assert plain.choices[0].text.startswith("Hi there") and plain.choices[0].logprobs is None
    streamed_text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Hi there", max_tokens=2, temperature=0, echo=True, stream=True))
    assert streamed_text == plain.choices[0].text


def test_prompt_logprobs_in_vllm_s_shape_equal_the_kernel_s(client):
    """vLLM's prompt_logprobs: per prompt token None first, then {token id: {logprob, rank,
    decoded_token}} with the token and the k most likely; per choice in completions, once in chat.
    Beside echo with logprobs, each keeps its own k. Not streamed (400, as vLLM)."""
    k = kernel.boot(memory="8MiB", threads=1)
    root = k.syscalls()
    tid = root.spawn_tenant(MODEL)
    ids = root.tokenize(tid, "The scheduler runs one forward step per time slice")
    pid = root.spawn(tid, ids, max_tokens=1, temperature=0, prompt_logprobs=3)
    want = root.read(pid, timeout=30).prompt_logprobs
    root.wait(pid)

    def check(got, k):
        assert len(got) == len(ids) and got[0] is None
        for entry, w in zip(got[1:], want[1:]):
            mine = entry[str(w.token)]
            assert mine["logprob"] == pytest.approx(w.logprob, abs=1e-5) and mine["rank"] == w.rank
            assert mine["decoded_token"] == w.text
            top = {str(t.token): (r, t) for r, t in enumerate(w.top[:k], start=1)}
            assert set(entry) == set(top) | {str(w.token)}
            for key, (r, t) in top.items():
                if key != str(w.token):
                    assert entry[key]["rank"] == r and entry[key]["logprob"] == pytest.approx(t.logprob, abs=1e-5)
            assert (mine["rank"] <= k) == (str(w.token) in top)

    reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, n=2,
                                      extra_body={"prompt_logprobs": 3})
    for choice in reply.choices:
        check(choice.model_extra["prompt_logprobs"], 3)
    chat = [{"role": "user", "content": "Hi"}]
    chat_ids = root.tokenize(tid, chat)
    pid = root.spawn(tid, chat_ids, max_tokens=1, temperature=0, prompt_logprobs=1)
    ids, want = chat_ids, root.read(pid, timeout=30).prompt_logprobs
    root.wait(pid)
    reply = client.chat.completions.create(model=MODEL, messages=chat, max_tokens=1, extra_body={"prompt_logprobs": 1})
    check(reply.model_extra["prompt_logprobs"], 1)
    # beside echo: echo's entries show logprobs' 1 (and the token), prompt_logprobs its 0 (the token alone)
    reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1,
                                      extra_body={"prompt_logprobs": 0})
    choice = reply.choices[0]
    check(choice.model_extra["prompt_logprobs"], 0)
    assert all(len(top) in (1, 2) for top in choice.logprobs.top_logprobs[1:len(ids)])
    assert choice.logprobs.token_logprobs[1:len(ids)] == pytest.approx([w.logprob for w in want[1:]], abs=1e-5)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, stream=True,
                                  extra_body={"prompt_logprobs": 1})
    assert "prompt_logprobs with stream is not supported" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, extra_body={"prompt_logprobs": 21})
    assert "prompt_logprobs" in err.value.body["message"]


def test_truncate_prompt_tokens_keeps_the_prompt_s_end(client, server):
    """truncate_prompt_tokens=k: the request runs on its prompt's last k tokens (a chat's, in its
    template), as if sent as those ids; -1 keeps the model's context; beams and echo see the cut."""
    k = kernel.boot(memory="8MiB", threads=1)
    root = k.syscalls()
    tid = root.spawn_tenant(MODEL)
    text = "A page table maps each virtual page of a process to a frame of the device's memory."
    ids = root.tokenize(tid, text)
    kw = dict(model=MODEL, max_tokens=6, temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
    cut = client.completions.create(prompt=text, **{**kw, "extra_body": {**kw["extra_body"],
                                                                         "truncate_prompt_tokens": 7}})
    sent = client.completions.create(prompt=ids[-7:], **kw)
    assert cut.usage.prompt_tokens == 7 and cut.choices[0].text == sent.choices[0].text
    whole = client.completions.create(prompt=text, **kw)
    keep_all = client.completions.create(prompt=text, **{**kw, "extra_body": {**kw["extra_body"],
                                                                             "truncate_prompt_tokens": -1}})
    assert keep_all.usage.prompt_tokens == len(ids) and keep_all.choices[0].text == whole.choices[0].text
    echoed = client.completions.create(prompt=text, echo=True, **{**kw, "extra_body": {"truncate_prompt_tokens": 5}})
    assert echoed.choices[0].text.startswith(root.detokenize(tid, ids[-5:]))
    chat_ids = root.tokenize(tid, CHAT)
    reply = client.chat.completions.create(messages=CHAT, **{**kw, "extra_body": {**kw["extra_body"],
                                                                                  "truncate_prompt_tokens": 4}})
    assert reply.usage.prompt_tokens == 4
    assert reply.choices[0].message.content == client.completions.create(prompt=chat_ids[-4:], **kw).choices[0].text
    beams = client.completions.create(prompt=text, n=2, max_tokens=4, model=MODEL, temperature=0, extra_body={
        "use_beam_search": True, "return_token_ids": True, "truncate_prompt_tokens": 6})
    plain = client.completions.create(prompt=ids[-6:], n=2, max_tokens=4, model=MODEL, temperature=0,
                                      extra_body={"use_beam_search": True, "return_token_ids": True})
    assert [c.model_extra["token_ids"] for c in beams.choices] == [c.model_extra["token_ids"] for c in plain.choices]
    for bad in (0, -2):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(prompt=text, **{**kw, "extra_body": {"truncate_prompt_tokens": bad}})
        assert "truncate_prompt_tokens must be at least 1" in err.value.body["message"]
    assert server.daemon.root.meminfo().mapped == 0


def test_a_chat_s_template_options_run_the_ids_tokenize_gives(client, server):
    """add_generation_prompt=false and continue_final_message=true (vLLM's): the reply is the one the
    tokenize syscall's ids give as a completion's prompt; a continued message's text ends the prompt."""
    k = kernel.boot(memory="8MiB", threads=1)
    root = k.syscalls()
    tid = root.spawn_tenant(MODEL)
    begun = CHAT + [{"role": "assistant", "content": "Her name is"}]
    kw = dict(model=MODEL, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    for messages, options in ((CHAT, {"add_generation_prompt": False}),
                              (begun, {"add_generation_prompt": False, "continue_final_message": True})):
        ids = root.tokenize(tid, messages, **options)
        reply = client.chat.completions.create(messages=messages, **{**kw, "extra_body": {**kw["extra_body"],
                                                                                          **options}})
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.choices[0].message.content == client.completions.create(prompt=ids, **kw).choices[0].text
        tokenized = client.post("/../tokenize", cast_to=object, body={"messages": messages, **options})
        assert tokenized["tokens"] == ids
    assert root.detokenize(tid, root.tokenize(tid, begun, add_generation_prompt=False,
                                              continue_final_message=True)).endswith("assistant\nHer name is")
    # echo (vLLM's): each choice's content starts with the assistant message it continues, streamed or not
    continued = dict(add_generation_prompt=False, continue_final_message=True)
    plain = client.chat.completions.create(messages=begun, **{**kw, "extra_body": {**kw["extra_body"], **continued}})
    echoed = client.chat.completions.create(messages=begun, n=2, **{**kw, "extra_body": {
        **kw["extra_body"], **continued, "echo": True}})
    assert [c.message.content for c in echoed.choices] == ["Her name is" + plain.choices[0].message.content] * 2
    chunks = list(client.chat.completions.create(messages=begun, stream=True, **{**kw, "extra_body": {
        **kw["extra_body"], **continued, "echo": True}}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == echoed.choices[0].message.content
    assert client.chat.completions.create(messages=CHAT, **{**kw, "extra_body": {**kw["extra_body"], "echo": True}}) \
        .choices[0].message.content == client.chat.completions.create(messages=CHAT, **kw).choices[0].message.content
    beams = client.chat.completions.create(messages=begun, n=2, model=MODEL, max_tokens=3, temperature=0, extra_body={
        "use_beam_search": True, "add_generation_prompt": False, "continue_final_message": True})
    assert len(beams.choices) == 2
    with pytest.raises(openai.BadRequestError) as err:          # the final message continued and closed: no
        client.chat.completions.create(messages=begun, **{**kw, "extra_body": {"continue_final_message": True}})
    assert "continue_final_message needs add_generation_prompt: false" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:          # chat's fields, not completions'
        client.completions.create(prompt="Hi", **{**kw, "extra_body": {"add_generation_prompt": False}})
    assert "add_generation_prompt is not supported" in err.value.body["message"]
    assert server.daemon.root.meminfo().mapped == 0
