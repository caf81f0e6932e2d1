"""The kernel with the real default model (slow: CI runs it too)."""
import pytest

import kernel
from tests.kernel_helpers import TINY, run_to_end

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Give me a word that rhymes with cat."]


def _greedy(sys, tid, prompt, n=24):
    return sys.spawn(tid, [{"role": "user", "content": prompt}], max_tokens=n, temperature=0)


def test_two_models_share_one_pool():
    alone = {}
    for model in (MODEL, TINY):
        k = kernel.boot(memory="32MiB")
        s = k.syscalls()
        tid = s.spawn_tenant(model)
        alone[model] = [s.wait(_greedy(s, tid, q)).tokens for q in QUESTIONS]
    k = kernel.boot(memory="12MiB", swap="8MiB")        # 16 frames of the real model: pressure
    s = k.syscalls()
    real, tiny = s.spawn_tenant(MODEL, name="real"), s.spawn_tenant(TINY, name="tiny")
    assert k.tenants[real].page_size == 16 and k.tenants[tiny].page_size == 480   # more tiny tokens per frame
    pids = {model: [_greedy(s, tid, q) for q in QUESTIONS] for model, tid in ((MODEL, real), (TINY, tiny))}
    run_to_end(k)
    for model, ps in pids.items():
        assert [s.wait(p).tokens for p in ps] == alone[model]
    info = s.meminfo()
    assert info.free + info.cached == info.total


def test_chat_turn_continues_the_template_exactly():
    k = kernel.boot()
    s = k.syscalls()
    tid = s.spawn_tenant(MODEL)
    program = k.tenants[tid].program
    first = [{"role": "user", "content": "Name three primary colors."}]
    pid = s.spawn(tid, first, max_tokens=40, temperature=0, interactive=True)
    run_to_end(k)
    reply = s.read(pid)
    assert reply.finish_reason == "stop"                       # ended on <|im_end|>
    second = [{"role": "user", "content": "Which one is the sky?"}]
    s.write(pid, second)
    expected = program.apply_chat_template(first + [{"role": "assistant", "content": reply.text}] + second)
    assert k.procs[pid].tokens == expected
    s.wait(pid)


def test_stop_strings_cut_the_text():
    k = kernel.boot()
    s = k.syscalls()
    tid = s.spawn_tenant(MODEL)
    question = "Count from one to ten in words, separated by commas."
    full = s.wait(_greedy(s, tid, question, 40)).text
    stop = full[8:11]                                          # a string the model does produce
    cut = s.wait(s.spawn(tid, [{"role": "user", "content": question}], max_tokens=40, temperature=0,
                         stop=[stop, "never-produced"])).text
    assert cut == full[:full.index(stop)] and len(cut) < len(full)
