"""kvosd with the real default model (slow): the official openai client's chat answer equals the
in-process libc.chat answer, streamed or not; json_schema output is valid on every sampled choice,
with logprobs and penalties; structured_outputs choice and regex hold on the real model."""
import json
import re

import pytest
import torch

import kernel
from kernel.ops import set_num_threads
from tests.helpers.schemas import PERSON, assert_valid
from userspace import libc
from userspace.daemon.config import DaemonConfig, TenantSpec
from userspace.daemon.listen import ServerThread

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
QUESTIONS = ["What is the capital of France?", "Name three primary colors."]


def test_openai_chat_equals_in_process_chat(monkeypatch):
    openai = pytest.importorskip("openai")
    threads = torch.get_num_threads()
    monkeypatch.setenv("KVOS_THREADS", "1")      # the server's loop and this test share 2 cores
    k = kernel.boot(memory="64MiB", threads=1)
    root = k.syscalls()
    tid = root.spawn_tenant(MODEL)
    expected = [libc.chat(root, tid, [{"role": "user", "content": q}], temperature=0, max_tokens=32)
                for q in QUESTIONS]
    srv = ServerThread(DaemonConfig(boot=dict(memory="64MiB", threads=1), root_key="root-key-smollm2",
                                    tenants=[TenantSpec(MODEL, MODEL, "tenant-key-smollm2")]))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="tenant-key-smollm2", max_retries=0)
        for question, want in zip(QUESTIONS, expected):
            messages = [{"role": "user", "content": question}]
            reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32)
            assert reply.choices[0].message.content == want.text
            assert reply.usage.completion_tokens == len(want.tokens)
            assert reply.usage.prompt_tokens == want.prompt_tokens
            streamed = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32,
                                                      stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in streamed) == want.text
        assert "Paris" in expected[0].text
        _structured_output(client)
    finally:
        report = srv.stop()
        set_num_threads(threads)
    assert report["fsck"] == "clean" and report["frames_mapped"] == 0


def _structured_output(client):
    """The real model under a schema, sampled at temperature 1 over several seeds: every choice parses
    and validates; logprobs and penalties come along."""
    pytest.importorskip("llguidance")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = [{"role": "user", "content": "Describe a person as JSON with name, age, pets and member."}]
    for seed in range(3):
        reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=1.0, seed=seed, n=2,
                                               max_tokens=64, response_format=fmt, logprobs=True, top_logprobs=2,
                                               frequency_penalty=0.3, presence_penalty=0.3)
        for choice in reply.choices:
            assert choice.finish_reason == "stop", choice
            assert_valid(PERSON, json.loads(choice.message.content))
            assert all(len(e.top_logprobs) == 2 for e in choice.logprobs.content)
    # vLLM's structured_outputs: one of three choices where the model would answer with a sentence
    # (greedy, it says Lyon: the mask allows any token that begins a choice, and the lone letter "L",
    # log-probability -1.96 as a common opening, outscores "Paris", -4.10), a number under a regex
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    for temperature in (0, 1.0):
        reply = client.chat.completions.create(model=MODEL, messages=ask, temperature=temperature, seed=2, n=2,
                                               max_tokens=8, extra_body={
                                                   "structured_outputs": {"choice": ["Paris", "Lyon", "Berlin"]}})
        for choice in reply.choices:
            assert choice.message.content in ("Paris", "Lyon", "Berlin") and choice.finish_reason == "stop", choice
    ask = [{"role": "user", "content": "How many legs does a spider have?"}]
    reply = client.chat.completions.create(model=MODEL, messages=ask, temperature=1.0, seed=1, n=3, max_tokens=8,
                                           extra_body={"structured_outputs": {"regex": "[0-9]{1,2} legs"}})
    for choice in reply.choices:
        assert choice.finish_reason == "stop" and re.fullmatch("[0-9]{1,2} legs", choice.message.content), choice
