"""kvosd with the real default model (slow): the official openai client's chat answer equals the
in-process libc.chat answer, streamed or not; json_schema output is valid on every sampled choice,
with logprobs and penalties."""
import json

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
