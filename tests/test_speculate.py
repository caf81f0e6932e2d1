"""Speculative decoding by prompt lookup (kernel/speculate.py): the proposer, the memory manager's
truncate, and whole runs that must give what the same run without speculation gives, token for
token and logprob for logprob (greedy, seeded sampling, penalties, stops, grammars, forks, later
turns, memory pressure), with fsck after every step and every frame back."""
from types import SimpleNamespace

import pytest

import kernel
from kernel.errors import KernelPanic, KvosError
from kernel.speculate import MAX_DECODES, may_draft, note_outcome, propose
from tests.kernel_helpers import TINY, assert_all_memory_back, frames, run_exits, run_to_end

# A prompt that repeats itself: the lookup finds its n-grams from the first decode step on.
LOOP = [7, 8, 9, 10, 11] * 6 + [7, 8]


def proc(tokens):
    return SimpleNamespace(tokens=list(tokens), ngram_hay=None)


def test_propose_takes_what_followed_the_latest_occurrence_of_the_longest_suffix():
    p = proc([1, 2, 3, 4, 9, 9, 1, 2, 3, 5, 6, 7, 1, 2, 3])
    assert propose(p, 3) == (5, 6, 7)            # 1 2 3 last occurred before 5 6 7
    assert propose(p, 1) == (5,)
    p = proc([4, 5, 6, 1, 2, 3, 7, 8, 2, 3])        # "2 3" occurred once, before 7
    assert propose(p, 4) == (7, 8, 2, 3)
    assert propose(proc([1, 2, 3, 4]), 4) == ()      # nothing repeats
    assert propose(proc([5, 5]), 4) == ()            # shorter than the shortest n-gram with a follower
    assert propose(proc([5, 5, 5]), 4) == (5,)       # "5 5" at 0 is followed by the last 5


def test_propose_grows_its_index_with_the_file_and_ignores_matches_across_tokens():
    p = proc([1, 2, 3])
    assert propose(p, 2) == ()
    p.tokens += [9, 1, 2]
    assert propose(p, 2) == (3, 9) and len(p.ngram_hay) == 4 * 6
    # 0x01000000 then 0x00000002 contain the bytes of 0x00000100's neighbours: only whole tokens match
    p = proc([0x0100, 0x0200, 7, 0x00010000, 0x02000000, 0, 0x0100, 0x0200])
    assert propose(p, 1) == (7,)


def test_a_process_whose_drafts_miss_backs_off():
    p = SimpleNamespace(draft_misses=0, drafts_resume=0, drafts_kept=0.0)
    assert may_draft(p, 0)
    waits = []
    for step in range(10, 100, 1):
        if may_draft(p, step):
            note_outcome(p, 0, 4, step)          # nothing taken
            waits.append(p.drafts_resume - step)
    assert waits[:6] == [2, 4, 8, 16, 32, 64]
    note_outcome(p, 1, 4, 200)                   # one taken: drafts again at once
    assert p.draft_misses == 0 and may_draft(p, 201)


def test_a_miss_among_drafts_that_pay_is_chance():
    """A process whose drafts are mostly kept (average share kept >= KEEPS_ENOUGH) drafts on after
    one that kept nothing; as misses pile up the average falls and the back-off returns."""
    from kernel.speculate import KEEPS_ENOUGH
    p = SimpleNamespace(draft_misses=0, drafts_resume=0, drafts_kept=0.0)
    for step in range(5):
        note_outcome(p, 3, 4, step)               # 3 of 4 kept, five times
    assert p.drafts_kept > KEEPS_ENOUGH
    note_outcome(p, 0, 4, 5)
    assert may_draft(p, 6) and p.draft_misses == 0
    step = 6
    while True:                                   # misses in a row: the average decays by 3/4 each
        note_outcome(p, 0, 4, step)
        if p.drafts_kept < KEEPS_ENOUGH:
            break
        assert may_draft(p, step + 1)
        step += 1
    assert step > 6 and not may_draft(p, step + 1) and may_draft(p, step + 2)


def test_truncate_unmaps_the_pages_past_the_end_and_never_a_named_one():
    k = kernel.boot(memory=frames(16))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    pid = sys.spawn(tid, list(range(3, 40)), max_tokens=1, temperature=0, interactive=True)
    run_to_end(k)
    mm, p = k.mm, k.procs[pid]
    space = mm.space(p.asid)
    free = mm.frames.num_free
    mm.append(p.asid, [5] * 30)                 # 37 + 30 tokens: pages 3 and 4 are new
    assert mm.frames.num_free == free - 2
    assert mm.truncate(p.asid, 40) == 2 and space.num_tokens == 40 and mm.frames.num_free == free
    mm.fsck()                                   # the memory alone: the process did not compute these
    with pytest.raises(KernelPanic, match="truncate"):
        mm.truncate(p.asid, 20)                 # page 0 and 1 are named: their K/V is kept
    with pytest.raises(KernelPanic, match="truncate"):
        mm.truncate(p.asid, 41)
    mm.truncate(p.asid, p.num_computed)
    k.fsck()
    sys.kill(pid)
    sys.wait(pid)
    assert_all_memory_back(k)


def run(speculate, jobs, boot=None, tenant=TINY):
    """Spawn each job (prompt, spawn kwargs), run to the end (fsck every step); per job: its exit
    status's tokens, text, reason and its logprob entries, in order; and the kernel."""
    exits, k = run_exits(jobs, tenant, speculate=speculate, **(boot or {}))
    return [(st.tokens, st.text, st.reason, [(e.token, e.logprob, e.top) for e in entries])
            for st, entries in exits], k


SAMPLING = [
    {"temperature": 0},
    {"temperature": 0.9, "seed": 11},
    {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 3},
    {"temperature": 0.7, "seed": 5, "frequency_penalty": 0.1, "presence_penalty": 0.1, "logprobs": 3},
    {"temperature": 0, "repetition_penalty": 1.3},
    {"temperature": 0, "min_tokens": 5, "stop_token_ids": [9]},
    {"temperature": 0, "logit_bias": {10: -100}},
]


@pytest.mark.parametrize("params", SAMPLING, ids=lambda p: ",".join(p))
def test_the_same_tokens_as_without_speculation(params):
    # tiny-llama's random weights rarely repeat under sampling: a bias keeps the draws among the
    # loop's five tokens, so that n-grams recur and drafts are proposed (and some taken)
    params = {"logit_bias": {t: 6.0 for t in range(7, 12)}, **params}
    jobs = [(LOOP, dict(max_tokens=40, ignore_eos=True, **params)),
            (LOOP[3:] + [12, 13], dict(max_tokens=7, ignore_eos=True, **params)),
            ([3, 4, 5, 6], dict(max_tokens=25, ignore_eos=True, **params))]
    plain, _ = run(0, jobs)
    spec, k = run(4, jobs)
    assert spec == plain
    assert k.stats.draft_tokens > 0


def test_greedy_repetition_takes_fewer_steps():
    jobs = [(LOOP, dict(max_tokens=60, ignore_eos=True, temperature=0))]
    plain, k0 = run(0, jobs)
    spec, k4 = run(4, jobs)
    assert spec == plain
    assert k4.stats.accepted_tokens > 0 and k4.stats.steps < k0.stats.steps
    assert k4.stats.generated_tokens == k0.stats.generated_tokens == 60


def test_stop_strings_end_a_turn_inside_the_drafts():
    # tiny-llama's text is its token ids' bytes; stop on 4 bytes first printed late in the greedy
    # loop's text, after drafts were being computed
    greedy = dict(max_tokens=60, temperature=0, ignore_eos=True)
    text = run(0, [(LOOP, greedy)])[0][0][1]
    at = next(i for i in range(2 * len(text) // 3, len(text) - 4) if text.find(text[i:i + 4]) == i)
    jobs = [(LOOP, dict(greedy, stop=[text[at:at + 4]]))]
    spec, k = run(4, jobs)
    assert spec == run(0, jobs)[0]
    assert spec[0][2] == "stop" and spec[0][1] == text[:at] and k.stats.draft_tokens > 0


def test_a_grammar_sees_every_token_it_would_have_seen():
    jobs = [(LOOP, dict(max_tokens=40, temperature=0,
                        json_schema={"type": "object", "properties": {"a": {"type": "integer"}}}))]
    plain, _ = run(0, jobs, boot={"memory": "64MiB"}, tenant="smollm2-135m")
    spec, k = run(4, jobs, boot={"memory": "64MiB"}, tenant="smollm2-135m")
    assert spec == plain
    assert k.stats.draft_tokens > 0


def test_forks_later_turns_and_memory_pressure():
    """spawn_n children share the prompt's pages (copy-on-write on the drafts' writes too); a second
    turn after write(); a pool too small for everyone at once (swap and reclaim)."""
    def go(speculate, memory, swap):
        k = kernel.boot(speculate=speculate, memory=frames(memory), swap=swap, token_budget=64)
        sys = k.syscalls()
        tid = sys.spawn_tenant(TINY)
        pids = sys.spawn_n(tid, LOOP, 3, max_tokens=30, ignore_eos=True, temperature=0.8, seed=4)
        chat = sys.spawn(tid, LOOP[:17], max_tokens=20, ignore_eos=True, temperature=0, interactive=True)
        others = [sys.spawn(tid, [3 + i] + LOOP, max_tokens=35, ignore_eos=True, temperature=0) for i in range(4)]
        run_to_end(k)
        sys.write(chat, [7, 8, 9, 10, 11, 7, 8])
        run_to_end(k)
        first = sys.read(chat).tokens
        sys.kill(chat)
        out = [sys.wait(p).tokens for p in pids + others] + [first]
        assert_all_memory_back(k)
        return out, k
    roomy, _ = go(0, 256, "1MiB")
    for memory, swap in ((256, "1MiB"), (14, "64KiB"), (14, 0)):
        tight, k = go(4, memory, swap)
        assert tight == roomy, (memory, swap)
        assert k.stats.draft_tokens > 0


def test_many_decoders_speculate_for_none():
    jobs = [([3 + i] + LOOP, dict(max_tokens=10, ignore_eos=True, temperature=0)) for i in range(MAX_DECODES + 1)]
    _, k = run(4, jobs, boot={"memory": frames(128)})
    assert k.stats.draft_tokens == 0
    lifted, k = run(4, jobs, boot={"memory": frames(128), "speculate_batch": MAX_DECODES + 1})
    assert k.stats.draft_tokens > 0 and lifted == run(0, jobs, boot={"memory": frames(128)})[0]
    _, k = run(4, jobs[:3], boot={"memory": frames(128), "speculate_batch": 2})
    assert k.stats.draft_tokens == 0


def sim_run(speculate, acceptance, seed=0, n=4, out=200, **boot):
    k = kernel.boot(device=f"sim:h100,draft_acceptance={acceptance}", speculate=speculate, seed=seed, **boot)
    sys = k.syscalls()
    tid = sys.spawn_tenant("llama-2-7b")
    pids = [sys.spawn(tid, list(range(3 + i, 100 + i)), max_tokens=out, ignore_eos=True) for i in range(n)]
    done = [sys.wait(p) for p in pids]
    k.fsck()
    mem = sys.meminfo()
    assert mem.mapped == 0 and mem.free + mem.cached == mem.total and all(len(d.tokens) == out for d in done)
    return k, max(d.elapsed for d in done)


def test_the_simulator_keeps_drafts_by_its_acceptance():
    """On sim:, drafts come every step and each is kept with draft_acceptance (kernel/step.py,
    simulated_draws): 0 keeps none (and the back-off keeps the waste small), 1 keeps all (k + 1 tokens
    a step), 0.8 about 59% of 4-draft runs; the priced time follows; a seed repeats its run."""
    plain, t_plain = sim_run(0, 0.8)
    none, t_none = sim_run(4, 0.0)
    assert none.stats.accepted_tokens == 0 and none.stats.draft_tokens < 200 and t_none < 1.02 * t_plain
    every, t_every = sim_run(4, 1.0)
    assert every.stats.accepted_tokens == every.stats.draft_tokens > 0
    assert every.stats.steps <= plain.stats.steps / 4 and t_every < t_plain / 4
    some, t_some = sim_run(4, 0.8)
    assert 0.5 < some.stats.accepted_tokens / some.stats.draft_tokens < 0.7 and t_plain / 3.4 < t_some < t_plain / 2
    again, t_again = sim_run(4, 0.8)
    other, _ = sim_run(4, 0.8, seed=1)
    assert (again.stats.accepted_tokens, t_again) == (some.stats.accepted_tokens, t_some)
    assert other.stats.accepted_tokens != some.stats.accepted_tokens


@pytest.mark.parametrize("boot, match", [
    ({"speculate": -1}, "speculate must be an integer"),
    ({"speculate": 17}, "speculate must be an integer"),
    ({"speculate": 2.0}, "speculate must be an integer"),
    ({"speculate": 2, "alloc": "prealloc"}, "speculate: drafts run"),
    ({"speculate": 2, "batch": "padded"}, "speculate: drafts run"),
    ({"speculate_batch": 0}, "speculate_batch must be an integer"),
    ({"speculate": 2, "device": "sim:h100,draft_acceptance=1.5"}, "GPU constant draft_acceptance is a probability"),
])
def test_boot_refuses(boot, match):
    with pytest.raises(KvosError, match=f"^EINVAL: {match}"):
        kernel.boot(**boot)


def test_smollm2_repeats_a_quote_in_fewer_steps_with_the_same_text():
    """The default model, asked to repeat a sentence: every draw equal to plain decoding's, most
    drafts taken."""
    k = kernel.boot(memory="64MiB")
    sys = k.syscalls()
    tid = sys.spawn_tenant("smollm2-135m")
    prompt = sys.tokenize(tid, "The page table maps virtual pages to frames. " * 3 + "Again: The page table maps")
    k.shutdown()
    jobs = [(prompt, dict(max_tokens=40, temperature=0))]
    plain, k0 = run(0, jobs, boot={"memory": "64MiB"}, tenant="smollm2-135m")
    spec, k4 = run(4, jobs, boot={"memory": "64MiB"}, tenant="smollm2-135m")
    assert spec == plain
    assert k4.stats.accepted_tokens >= 20 and k4.stats.steps <= k0.stats.steps / 2


def test_schedstat_counts_drafts_and_the_shell_passes_the_option():
    import argparse

    from userspace.shell.options import add_boot_options, boot_options
    jobs = [(LOOP, dict(max_tokens=60, ignore_eos=True, temperature=0))]
    _, k = run(3, jobs)
    stat = k.syscalls().schedstat()
    assert (stat.draft_tokens, stat.accepted_tokens) == (k.stats.draft_tokens, k.stats.accepted_tokens)
    assert 0 < stat.accepted_tokens <= stat.draft_tokens
    parser = argparse.ArgumentParser()
    add_boot_options(parser)
    assert boot_options(parser.parse_args(["--speculate", "4"]))["speculate"] == 4
    assert "speculate" not in boot_options(parser.parse_args([]))


def test_kvosd_with_speculation_serves_the_same_completions():
    """`kvos serve --speculate 4`: completions, streamed or not, equal an in-process kernel's without
    speculation, and /metrics counts the drafts."""
    import urllib.request

    import openai

    from userspace.daemon.config import DaemonConfig, TenantSpec
    from userspace.daemon.listen import ServerThread
    key = "spec-key-for-tests"
    srv = ServerThread(DaemonConfig(boot=dict(device="cpu", memory=frames(64), threads=1, speculate=4),
                                    tenants=[TenantSpec("alice", TINY, key)], root_key="spec-root-key"))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)
        kw = dict(model="alice", prompt=LOOP, max_tokens=40, temperature=0, extra_body={"ignore_eos": True,
                                                                                       "return_token_ids": True})
        whole = client.completions.create(**kw)
        streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
        want, _ = run(0, [(LOOP, dict(max_tokens=40, ignore_eos=True, temperature=0))])
        assert whole.choices[0].token_ids == want[0][0]
        assert whole.choices[0].text == streamed == want[0][1]
        req = urllib.request.Request(srv.url + "/metrics", headers={"Authorization": "Bearer spec-root-key"})
        scrape = urllib.request.urlopen(req).read().decode()
        drafts = [line for line in scrape.splitlines() if line.startswith("kvos_draft_tokens_total")]
        assert drafts and float(drafts[0].split()[-1]) > 0
        client.close()
    finally:
        report = srv.stop()
    assert report["fsck"] == "clean" and report["frames_mapped"] == 0


@pytest.mark.parametrize("env", [{"KVOS_WEIGHTS": "gguf"}, {"KVOS_KV": "int8"}, {"KVOS_KV": "bfloat16"},
                                 {"KVOS_MATMUL": "bfloat16"}], ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_every_cpu_program_gives_the_same_draws_to_the_bit(env, monkeypatch):
    """Each of the program's CPU paths computes a row the same whoever shares its step (the GEMMs, the
    attention and the K/V writes are per row), so a draft's row gives the logits plain decoding would:
    logprobs equal to the bit, greedy and sampled."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    k = kernel.boot(memory="64MiB")
    prompt = k.syscalls().tokenize(k.syscalls().spawn_tenant("smollm2-135m"),
                                   "The page table maps virtual pages to frames. " * 3 + "Again: The page table maps")
    k.shutdown()
    jobs = [(prompt, dict(max_tokens=30, temperature=0, logprobs=2)),
            (prompt[5:], dict(max_tokens=30, temperature=0.8, seed=3, logprobs=2))]
    plain, _ = run(0, jobs, boot={"memory": "64MiB"}, tenant="smollm2-135m")
    spec, k4 = run(4, jobs, boot={"memory": "64MiB"}, tenant="smollm2-135m")
    assert spec == plain and k4.stats.accepted_tokens > 0


def test_top_shows_how_many_drafts_were_taken():
    from rich.console import Console

    from userspace.tui import views
    _, k = run(3, [(LOOP, dict(max_tokens=60, ignore_eos=True, temperature=0))])
    console = Console(width=120, record=True)
    console.print(views.scheduler(k.syscalls().schedstat()))
    stat = k.stats
    assert f"speculation: {stat.accepted_tokens} of {stat.draft_tokens} drafts taken" in console.export_text()
