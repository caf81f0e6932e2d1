"""Tensor parallelism on the CPU: two gloo ranks against one rank, token for token.

Each test boots real worker processes (a fresh interpreter each: about 2-5 s here), so the
tests share kernels where they can and the slow ones are marked.
"""
import json
import os
import random
import signal
import time

import pytest

import kernel
from kernel.errors import KvosError
from tests.kernel_helpers import TINY

GREEDY = dict(temperature=0, ignore_eos=True)


def _record_logits(k, program):
    """Wrap rank 0's forward (an instance attribute) so the test sees every step's logits."""
    seen, forward = [], program.forward

    def recording(batch, kv):
        logits = forward(batch, kv)
        seen.append(logits.clone())
        return logits
    program.forward = recording
    return seen, forward


def _workload(k, seed=3, steps_between_forks=3):
    """A seeded workload with forks, on a pool small enough to swap and preempt: every step fscked.
    Returns ({name: tokens}, stats): names, not pids, so two kernels' runs compare."""
    rng = random.Random(seed)
    s = k.syscalls()
    tid = s.spawn_tenant(TINY)
    named = {}
    for i in range(8):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(5, 60))]
        named[f"p{i}"] = s.spawn(tid, prompt, max_tokens=rng.randint(8, 40), **GREEDY)
    steps = forks = 0
    while k.step():
        steps += 1
        k.fsck()
        if steps % steps_between_forks == 0 and forks < 4:
            parent = named[f"p{forks}"]
            if k.procs[parent].alive:
                for j, child in enumerate(s.fork(parent, 2)):
                    named[f"p{forks}.{j}"] = child
            forks += 1
        assert steps < 5000, "the kernel does not finish"
    k.fsck()
    out = {name: s.wait(pid).tokens for name, pid in named.items()}
    return out, dict(steps=steps, preemptions=k.stats.preemptions, swap_out=k.device.stats.swap_out_bytes,
                     copies=k.device.stats.copy_bytes)


BOOT = dict(device="cpu", frames=24, swap_frames=24, token_budget=32)


@pytest.fixture
def tp2():
    k = kernel.boot(**BOOT, tp=2)
    yield k
    k.shutdown(kill=True)


def test_tp2_greedy_and_logits_match_one_rank(tp2):
    one = kernel.boot(**BOOT)
    prompts = [[5, 6, 7, 8, 9] * 7, [100, 200, 300], list(range(10, 90))]
    results = []
    for k in (one, tp2):
        s = k.syscalls()
        tid = s.spawn_tenant(TINY)
        program = k.tenants[tid].program
        seen, _ = _record_logits(k, program)
        try:
            pids = [s.spawn(tid, p, max_tokens=12, **GREEDY) for p in prompts]
            results.append(([s.wait(p).tokens for p in pids], seen))
        finally:        # the class's forward again: a bound method left on the (cached) program would be
            del program.forward     # copied into every program made from it (an adapter's, a mixed step's)
    (tokens1, logits1), (tokens2, logits2) = results
    assert tokens1 == tokens2
    assert len(logits1) == len(logits2) > 0
    assert [a.shape for a in logits1] == [b.shape for b in logits2]
    worst = max((a - b).abs().max().item() for a, b in zip(logits1, logits2) if a.numel())
    assert worst <= 1e-5, worst
    one.shutdown()


@pytest.mark.slow
def test_tp2_seeded_workload_with_forks_swap_and_preemption(tp2):
    one = kernel.boot(**BOOT)
    out1, stats1 = _workload(one)
    out2, stats2 = _workload(tp2)
    assert stats1["preemptions"] > 0 and stats1["swap_out"] > 0 and stats1["copies"] > 0, stats1
    assert out1 == out2
    assert stats1["steps"] == stats2["steps"] and stats1["preemptions"] == stats2["preemptions"]
    one.shutdown()


def test_tp_programs_are_sharded_and_named_by_layout(tp2):
    s = tp2.syscalls()
    tid = s.spawn_tenant(TINY)
    program = tp2.tenants[tid].program
    one = kernel.boot(device="cpu", frames=8)
    whole = one.tenants[one.syscalls().spawn_tenant(TINY)].program
    assert program.kv_shape.num_kv_heads * 2 == whole.kv_shape.num_kv_heads     # half the heads per rank
    assert program.identity != whole.identity                                   # pages never mix
    assert program.embed.shape[0] * 2 == whole.embed.shape[0]
    s.wait(s.spawn(tid, [5, 6, 7], max_tokens=2, **GREEDY))
    # per layer 2 all-reduces; per step one embedding all-reduce and one logits all-gather
    assert tp2.device.tp.calls == 2 * (2 * 3 + 2)
    one.shutdown()


def test_tp_refuses_what_does_not_divide():
    k = kernel.boot(device="cpu", frames=8, tp=3)
    try:
        with pytest.raises(KvosError) as err:       # tiny-llama: 4 query heads, 2 KV heads
            k.syscalls().spawn_tenant(TINY)
        assert err.value.errno == "EINVAL"
        assert "4 query heads and 2 KV heads" in err.value.reason and "divide by 3" in err.value.reason
        k.fsck()
    finally:
        k.shutdown()
    for bad in (0, -1, "2", True, 65):
        with pytest.raises(KvosError) as err:
            kernel.boot(device="cpu", tp=bad)
        assert err.value.errno == "EINVAL"
    with pytest.raises(KvosError):
        kernel.boot(device="sim:a100", tp=2)


def test_a_dead_worker_ends_its_processes_with_eio():
    k = kernel.boot(device="cpu", frames=32, token_budget=32, tp=2)
    s = k.syscalls()
    tid = s.spawn_tenant(TINY)
    pids = [s.spawn(tid, [5 + i] * 20, max_tokens=30, **GREEDY) for i in range(3)]
    k.step()
    k.fsck()
    worker = k.device.procs[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)
    started = time.monotonic()
    steps = 0
    while k.step():
        k.fsck()
        steps += 1
        assert steps < 100
    assert time.monotonic() - started < 10, "a dead rank must not hang the kernel"
    for pid in pids:
        status = s.wait(pid)
        assert status.reason == "error" and status.error.startswith("EIO: tensor-parallel"), status
    later = s.spawn(tid, [7, 8, 9], max_tokens=4, **GREEDY)      # admitted, then ended the same way
    assert s.wait(later).error.startswith("EIO")
    k.fsck()
    k.shutdown()


def test_a_hung_worker_times_out_instead_of_hanging(monkeypatch):
    monkeypatch.setenv("KVOS_TP_TIMEOUT", "3")
    k = kernel.boot(device="cpu", frames=32, token_budget=32, tp=2)
    s = k.syscalls()
    tid = s.spawn_tenant(TINY)
    pid = s.spawn(tid, [5] * 20, max_tokens=30, **GREEDY)
    k.step()
    worker = k.device.procs[0]
    os.kill(worker.pid, signal.SIGSTOP)          # alive but silent: only the timeout can tell
    try:
        started = time.monotonic()
        while k.step():
            k.fsck()
        assert time.monotonic() - started < 20
        assert s.wait(pid).error.startswith("EIO: tensor-parallel")
        k.fsck()
    finally:
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGKILL)
    k.shutdown()


@pytest.mark.slow
def test_smollm2_runs_at_tp3():
    """SmolLM2-135M: 9 query heads and 3 KV heads split three ways; same greedy tokens as one rank."""
    model = "smollm2-135m"
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    outputs = []
    for tp in (1, 3):
        k = kernel.boot(device="cpu", memory="32MiB", tp=tp)
        s = k.syscalls()
        tid = s.spawn_tenant(model)
        outputs.append(s.wait(s.spawn(tid, prompt, max_tokens=16, temperature=0)).tokens)
        k.fsck()
        k.shutdown()
    assert outputs[0] == outputs[1]


def _forward_once(config, tokens: list, group=None):
    """Logits of one sequence through LlamaProgram (sharded when `group` is a rank's TPGroup)."""
    import torch

    from kernel.batch import ForwardBatch
    from kernel.kvcache import KVView
    from userspace.programs import tiny
    from userspace.programs.llama import LlamaProgram, fuse_hf_weights

    weights = fuse_hf_weights(config, tiny.tiny_weights(config, seed=1))
    program = LlamaProgram("t", config, weights, tiny.tiny_tokenizer(), b"t", torch.device("cpu"), torch.float32,
                           tp=group)
    n = len(tokens)
    batch = ForwardBatch(token_ids=torch.tensor(tokens), positions=torch.arange(n),
                         slot_mapping=torch.arange(n, dtype=torch.int32),
                         page_table=torch.arange(4, dtype=torch.int32).unsqueeze(0),
                         query_start=torch.tensor([0, n], dtype=torch.int32),
                         context_lens=torch.tensor([n], dtype=torch.int32),
                         sample_indices=torch.arange(n), max_query_len=n, max_context_len=n)
    frame = 16 * program.kv_shape.bytes_per_token
    return program.forward(batch, KVView(torch.zeros(4, frame, dtype=torch.uint8), program.kv_shape))


def _rank(rank: int, size: int, port: int, config, tokens: list) -> None:
    import datetime

    import torch.distributed as dist

    from kernel.devices.tp import make_group
    store = dist.TCPStore("127.0.0.1", port, size, False, timeout=datetime.timedelta(seconds=60))
    _forward_once(config, tokens, make_group(store, rank, size, "t", 60.0))


def test_shards_compute_what_the_whole_model_does_with_biases_tied_head_and_a_ragged_vocabulary():
    """LlamaProgram and tp_shard as the workers run them, on real gloo ranks (rank 1 a spawned
    process), for a variant the named models do not cover: q/k/v and o biases, a tied head and a
    vocabulary (509) that does not divide by 2, so the last rank's slice is padded."""
    import datetime
    import multiprocessing

    import torch.distributed as dist

    from kernel.devices.tp import make_group
    from userspace.programs import tiny
    config = tiny.tiny_config(vocab_size=509, attention_bias=True, o_proj_bias=True, tie_word_embeddings=True)
    tokens = [3, 50, 7, 508, 200, 11, 42]
    whole = _forward_once(config, tokens)
    store = dist.TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False, timeout=datetime.timedelta(seconds=60))
    peer = multiprocessing.get_context("spawn").Process(target=_rank, args=(1, 2, store.port, config, tokens))
    peer.start()
    try:
        split = _forward_once(config, tokens, make_group(store, 0, 2, "t", 60.0))
    finally:
        peer.join(60)
    assert peer.exitcode == 0
    assert split.shape == whole.shape == (7, 509)
    # Logits here reach 20 and more (a tied head): fp32 sums in another order differ by up to 1e-5 of
    # the largest logit (measured: 2e-6 of it), more than 1e-5 in absolute terms
    assert (split - whole).abs().max().item() <= 1e-5 * whole.abs().max().item()
    assert split.argmax(-1).tolist() == whole.argmax(-1).tolist()


def test_kvos_run_tp2_prints_what_one_rank_prints(capsys):
    from userspace.shell.main import main
    outputs = []
    for tp in ("1", "2"):
        assert main(["run", "--json", "--model", TINY, "--tp", tp, "--max-tokens", "6", "hello there",
                     "what is paging?"]) == 0
        outputs.append([o["token_ids"] for o in map(json.loads,
                                                   capsys.readouterr().out.strip().splitlines())])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2


def test_quantized_weights_are_refused_under_tensor_parallel(tp2, tmp_path, monkeypatch):
    from gguf import GGMLQuantizationType

    from tests.helpers.tiny_gguf import write_gguf
    from userspace.programs import tiny
    monkeypatch.setenv("KVOS_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny.TINY_CONFIG, tiny.tiny_weights(tiny.TINY_CONFIG, 5), tiny.tiny_tokenizer(),
               matrix_type=lambda name: GGMLQuantizationType.Q8_0)
    monkeypatch.setenv("KVOS_WEIGHTS", "gguf")
    s = tp2.syscalls()
    before = len(s.schedstat().tenants)
    with pytest.raises(KvosError) as err:       # the blocks are not sharded: refused, not run wrong
        s.spawn_tenant(str(path))
    assert err.value.errno == "EINVAL" and "tensor parallel" in err.value.reason
    assert len(s.schedstat().tenants) == before
    tp2.fsck()


def test_lora_adapters_at_tp2_match_one_rank(tp2, tmp_path):
    """A base's processes and two adapters' in one batch at TP 2: each rank holds its share of A and B
    (column-parallel slots the rows of B for its columns, row-parallel ones the columns of A for its
    inputs, partial sums the all-reduce adds): the same greedy tokens and logprobs as one rank."""
    from tests.test_lora import peft_adapter
    peft_adapter(tmp_path / "a", seed=1)
    peft_adapter(tmp_path / "b", seed=2, target_modules=["q_proj", "v_proj", "down_proj", "o_proj"], r=2)
    specs = [TINY, f"{TINY}+lora:{tmp_path / 'a'}", f"{TINY}+lora:{tmp_path / 'b'}"]
    prompts = [[5, 6, 7, 8, 9] * 7, list(range(10, 60))]
    one = kernel.boot(**BOOT)
    runs = []
    for k in (one, tp2):
        s = k.syscalls()
        tids = [s.spawn_tenant(spec) for spec in specs]
        pids = [s.spawn(tid, p, max_tokens=10, logprobs=2, **GREEDY) for p in prompts for tid in tids]
        while k.step():
            k.fsck()
        logprobs = [[e.logprob for e in s.read(pid, timeout=30).logprobs] for pid in pids]
        runs.append([(s.wait(pid).tokens, lp) for pid, lp in zip(pids, logprobs)])
    assert [tokens for tokens, _ in runs[0]] == [tokens for tokens, _ in runs[1]]
    worst = max(abs(a - b) for (_, la), (_, lb) in zip(*runs) for a, b in zip(la, lb))
    assert worst <= 1e-4, worst
    assert len({tuple(tokens) for tokens, _ in runs[0][:3]}) == 3       # each adapter changes the base's text
    one.shutdown()
