"""Predicted outputs (spawn's prediction=..., kernel/speculate.py propose_predicted): the caller's
guess of the output is drafted where the output follows it; the output, its logprobs and its
draws are the model's own whatever the guess, and a good guess takes fewer steps. fsck after every
step, every frame back."""
from types import SimpleNamespace

import pytest

import kernel
from kernel.errors import KvosError
from kernel.speculate import propose_predicted
from tests.kernel_helpers import TINY, assert_all_memory_back, frames, run_exits, run_to_end


def guessing(tokens, prediction, generated):
    return SimpleNamespace(tokens=list(tokens), prediction=tuple(prediction), prediction_hay=None,
                           prediction_at=0, turn_generated=generated)


def test_the_prediction_is_read_in_order_and_resumed_after_an_edit():
    p = guessing([90, 91, 1], [1, 2, 3, 4, 1, 2, 5], generated=1)
    assert propose_predicted(p, 2) == (2, 3) and p.prediction_at == 1
    p.tokens += [2, 3, 4, 1, 2]                     # the output followed it: the next 1 2 is the later one
    p.turn_generated = 6
    assert propose_predicted(p, 3) == (5,)
    p = guessing([90, 1, 2, 3, 77, 4], [1, 2, 3, 9, 4, 5, 6], generated=5)    # 9 became 77, then back on track
    assert propose_predicted(p, 2) == (5, 6)
    assert propose_predicted(guessing([90, 8], [1, 2], generated=1), 2) == ()          # not in it
    assert propose_predicted(guessing([1, 2], [1, 2], generated=2), 2) == ()           # nothing follows
    # the turn's tokens only: the prompt's last token is not looked up
    assert propose_predicted(guessing([1, 2], [2, 3], generated=0), 2) == ()
    # whole tokens only: 0x0100 0x0200's bytes straddle 0x00010000 0x02000000
    p = guessing([0x0100, 0x0200], [0x00010000, 0x02000000, 0, 0x0100, 0x0200, 7], generated=2)
    assert propose_predicted(p, 1) == (7,)


def run(speculate, jobs, **boot):
    """Spawn each (prompt, kwargs), run to the end; per job (tokens, logprobs, exit status); the kernel."""
    exits, k = run_exits(jobs, speculate=speculate, **boot)
    return [(st.tokens, [(e.token, e.logprob) for e in entries], st) for st, entries in exits], k


GREEDY = dict(max_tokens=40, temperature=0, ignore_eos=True, logprobs=1)
SAMPLED = dict(max_tokens=40, temperature=0.9, seed=7, ignore_eos=True, logprobs=1)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_right_guess_takes_fewer_steps_and_changes_nothing(params):
    ((want, want_lp, _),), k0 = run(0, [([3, 4, 5, 6], params)])
    ((got, got_lp, status),), k4 = run(4, [([3, 4, 5, 6], dict(params, prediction=want))])
    assert (got, got_lp) == (want, want_lp)
    assert status.accepted_prediction_tokens >= 30 and k4.stats.steps <= k0.stats.steps / 2
    assert status.rejected_prediction_tokens <= 4                # the last draft may run past the end


def test_a_wrong_or_edited_guess_changes_nothing():
    ((want, want_lp, _),), _ = run(0, [([3, 4, 5, 6], GREEDY)])
    edited = want[:8] + [want[8] + 1, want[8] + 2] + want[9:]          # a word changed early on
    wrong = [(t * 7 + 3) % 250 + 3 for t in want]
    out, k = run(4, [([3, 4, 5, 6], dict(GREEDY, prediction=edited)),
                     ([3, 4, 5, 6], dict(GREEDY, prediction=wrong))])
    for tokens, logprobs, _ in out:
        assert (tokens, logprobs) == (want, want_lp)
    (_, _, edit_status), (_, _, wrong_status) = out
    assert edit_status.accepted_prediction_tokens >= 25 and edit_status.rejected_prediction_tokens >= 1
    assert wrong_status.accepted_prediction_tokens <= 3


def test_forks_keep_the_guess_and_no_speculation_ignores_it():
    (want,), _ = run(0, [([3, 4, 5, 6], SAMPLED)])
    k = kernel.boot(speculate=4, memory=frames(64))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    pids = sys.spawn_n(tid, [3, 4, 5, 6], 3, prediction=want[0], **SAMPLED)
    run_to_end(k)
    statuses = [sys.wait(pid) for pid in pids]
    assert statuses[0].tokens == want[0] and statuses[0].accepted_prediction_tokens >= 30
    assert all(s.accepted_prediction_tokens + s.rejected_prediction_tokens > 0 for s in statuses[1:])
    assert_all_memory_back(k)
    ((tokens, _, status),), _ = run(0, [([3, 4, 5, 6], dict(SAMPLED, prediction=want[0]))])
    assert tokens == want[0] and (status.accepted_prediction_tokens, status.rejected_prediction_tokens) == (0, 0)


@pytest.mark.parametrize("prediction, errno, match", [
    ([{"role": "user", "content": "x"}], "EINVAL", "prediction is text or token ids"),
    ([99999], "EINVAL", "prediction"),
    ("", "EINVAL", "prediction is empty"),
    (list(range(3, 300)) * 5, "E2BIG", "prediction of 1485 tokens exceeds"),
    (list(range(3, 300)) * 20, "ENOMEM", "prediction of 5940 tokens is longer than the context"),
])
def test_a_bad_prediction_is_refused_and_changes_nothing(prediction, errno, match):
    k = kernel.boot(speculate=4, memory=frames(64))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY, max_prompt_tokens=1000)
    with pytest.raises(KvosError, match=f"^{errno}: .*{match}"):
        sys.spawn(tid, [3, 4, 5], max_tokens=4, prediction=prediction)
    assert sys.ps() == []
    k.fsck()
    assert_all_memory_back(k)


def test_smollm2_with_its_own_answer_as_the_guess():
    """The default model: an answer regenerated with the first one's text as the prediction is the
    same text in far fewer steps (the text is tokenized again: most of its tokens are drafted)."""
    jobs = [([{"role": "user", "content": "Write one sentence about operating systems."}],
             dict(max_tokens=40, temperature=0))]
    k0 = kernel.boot(memory="64MiB")
    sys = k0.syscalls()
    tid = sys.spawn_tenant("smollm2-135m")
    first = sys.wait(sys.spawn(tid, jobs[0][0], **jobs[0][1]))
    assert len(first.tokens) >= 20
    steps0 = k0.stats.steps
    k0.shutdown()
    k4 = kernel.boot(memory="64MiB", speculate=8)
    sys = k4.syscalls()
    tid = sys.spawn_tenant("smollm2-135m")
    again = sys.wait(sys.spawn(tid, jobs[0][0], prediction=first.text, **jobs[0][1]))
    assert again.tokens == first.tokens
    assert again.accepted_prediction_tokens >= len(first.tokens) * 3 // 4 and k4.stats.steps <= steps0 / 2
    assert_all_memory_back(k4)


def test_kvosd_takes_openai_s_prediction_and_counts_it():
    """prediction in chat and completions (`kvos serve --speculate k`): the same text as without it,
    usage's completion_tokens_details counting the drafts kept and not, streamed too; a bad one a 400."""
    import openai

    from userspace.daemon.config import DaemonConfig, TenantSpec
    from userspace.daemon.listen import ServerThread
    key = "prediction-key-for-tests"
    srv = ServerThread(DaemonConfig(boot=dict(device="cpu", memory=frames(64), threads=1, speculate=4),
                                    tenants=[TenantSpec("alice", TINY, key)], root_key="prediction-root-key"))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)
        kw = dict(model="alice", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
        chat = [{"role": "user", "content": "Hello"}]
        plain = client.chat.completions.create(messages=chat, **kw)
        assert plain.usage.completion_tokens_details is None
        text = plain.choices[0].message.content
        guessed = client.chat.completions.create(messages=chat, prediction={"type": "content", "content": text}, **kw)
        assert guessed.choices[0].message.content == text
        details = guessed.usage.completion_tokens_details
        assert details.accepted_prediction_tokens >= 20 and details.rejected_prediction_tokens >= 0
        chunks = list(client.chat.completions.create(messages=chat, stream=True, stream_options={"include_usage": True},
                                                     prediction={"type": "content",
                                                                 "content": [{"type": "text", "text": text}]}, **kw))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert chunks[-1].usage.completion_tokens_details.accepted_prediction_tokens == \
            details.accepted_prediction_tokens
        done = client.completions.create(prompt="Hi", **kw)
        again = client.completions.create(prompt="Hi", extra_body={"ignore_eos": True, "prediction": {
            "type": "content", "content": done.choices[0].text}}, **{k: v for k, v in kw.items() if k != "extra_body"})
        assert again.choices[0].text == done.choices[0].text
        assert again.usage.completion_tokens_details.accepted_prediction_tokens > 0
        for bad in ({"type": "content", "content": ""}, {"type": "text", "content": "x"}):
            with pytest.raises(openai.BadRequestError, match="prediction"):
                client.chat.completions.create(messages=chat, prediction=bad, **kw)
        client.close()
    finally:
        report = srv.stop()
    assert report["fsck"] == "clean" and report["frames_mapped"] == 0
