"""Decode graphs (kernel/devices/graphs.py): pure-decode steps through padded static buffers.

Here (no GPU) capture is off: the runner pads, stages and copies exactly as it would for a graph and
calls the eager forward, so these tests check that padded static decode gives the unpadded eager
decode's logits and greedy tokens, that no real row reads the null frame, and that memory stays
whole. The CUDA tests (marked cuda) check the captured graphs themselves against eager.
"""
import numpy as np
import pytest
import torch

import kernel
from kernel.batch import HostBatch, to_device
from kernel.devices.graphs import graph_sizes, padded_size
from kernel.errors import EINVAL, KvosError
from kernel.ops import validate
from tests.kernel_helpers import TINY, assert_all_memory_back, frames, run_workload, workload

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_graph_sizes_are_powers_of_two_then_steps_of_16():
    assert graph_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 16))
    assert graph_sizes(5) == [1, 2, 4, 8]
    assert graph_sizes(20) == [1, 2, 4, 8, 16, 32]
    sizes = graph_sizes(64)
    assert [padded_size(sizes, n) for n in (1, 3, 5, 9, 17, 64, 65)] == [1, 4, 8, 16, 32, 64, None]


def test_graphs_must_be_a_known_mode_and_refuse_the_simulator_and_tp():
    for bad in ("yes", 1.5):
        with pytest.raises(KvosError) as e:
            kernel.boot(graphs=bad)
        assert e.value.errno == EINVAL
    with pytest.raises(KvosError, match="graphs"):
        kernel.boot(device="sim:h200", graphs=True)


def spy(k):
    """Wrap the runner so that each static step is also run eagerly on the unpadded batch; returns the
    list of (static logits, eager logits, rows) it fills. The eager rerun writes the K/V of the same
    tokens again (the same values up to rounding): later steps compare against their own eager twin."""
    runner, seen = k.graphs, []
    static_forward = runner.forward

    def both(program, host, kv):
        logits, padding = static_forward(program, host, kv)
        logits = logits.clone()
        eager = program.forward(to_device(host, k.device), kv)
        seen.append((logits, eager, host.num_seqs, padding))
        return logits, padding
    runner.forward = both
    return seen


def poison_null_frame(k):
    """Every byte of the null frame 0xFF: NaN in float32 and bfloat16 alike, so a real row that read it
    would come out NaN."""
    k.device.pool[k.null_frame].fill_(0xFF)


def run_poisoned(k):
    """Step to the end, the null frame poisoned before every step and fsck after it."""
    while True:
        poison_null_frame(k)
        if not k.step():
            return
        k.fsck()


def test_padded_static_decode_equals_unpadded_eager_decode():
    k = kernel.boot(memory=frames(128), graphs=True)
    s = k.syscalls()
    tid = s.spawn_tenant(TINY)
    jobs = workload(n=11, seed=3, output=(6, 20))
    pids = [s.spawn(tid, prompt, max_tokens=n, ignore_eos=True, temperature=0) for prompt, n in jobs]
    seen = spy(k)
    run_poisoned(k)
    assert k.graphs.stats.static_steps == len(seen) > 5
    assert k.graphs.stats.eager_steps >= 1                      # the prefill steps
    sizes = {n + padding for _, _, n, padding in seen}
    assert sizes <= set(graph_sizes(256)) and any(p for *_, p in seen)   # some steps were padded
    for static, eager, n, _ in seen:
        assert static.shape == eager.shape == (n, k.tenants[tid].program.vocab_size)
        assert torch.isfinite(static).all(), "a real row read the null frame"
        torch.testing.assert_close(static, eager, rtol=1e-4, atol=1e-4)
        assert torch.equal(static.argmax(-1), eager.argmax(-1))
    for pid in pids:
        s.wait(pid)
    assert_all_memory_back(k)


def test_rows_in_any_order_come_back_in_that_order():
    """sample_indices need not be 0..n-1 in order (prompt-scoring rows follow the sampled ones): the
    runner gathers whenever they are not, even when they start at 0 and end at n - 1."""
    k = kernel.boot(memory=frames(128), graphs=True)
    s = k.syscalls()
    tid = s.spawn_tenant(TINY)
    for prompt, n in workload(n=6, seed=4, output=(8, 12)):
        s.spawn(tid, prompt, max_tokens=n, ignore_eos=True, temperature=0)
    runner, checked = k.graphs, []
    static_forward = runner.forward

    def permuted(program, host, kv):
        n = host.num_seqs
        if n >= 4:
            host.sample_indices = np.array([0, 2, 1] + list(range(3, n)), dtype=np.int64)
            eager = program.forward(to_device(host, k.device), kv)
            logits, padding = static_forward(program, host, kv)
            torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-4)
            checked.append(n)
            host.sample_indices = np.arange(n, dtype=np.int64)
        return static_forward(program, host, kv)
    runner.forward = permuted
    while k.step():
        k.fsck()
    assert checked
    assert_all_memory_back(k)


def test_graph_runner_gives_the_eager_kernels_greedy_outputs():
    jobs = workload(n=20, seed=7, output=(4, 30))
    want, _ = run_workload(jobs)
    got, k = run_workload(jobs, graphs=True)
    assert got == want
    st = k.graphs.stats
    assert st.static_steps > 0 and st.replays == 0 and st.padding_rows > 0
    assert k.syscalls().schedstat().padding_tokens == st.padding_rows    # graph padding is counted
    assert_all_memory_back(k)


def test_a_wider_batch_than_the_largest_graph_runs_eagerly():
    jobs = workload(n=12, seed=2, output=(3, 8))
    want, _ = run_workload(jobs)
    got, k = run_workload(jobs, graphs="eager", max_running=8)   # sizes 1..8: a 12-row decode never comes
    assert got == want and k.graphs.max_batch == 8 and k.graphs.stats.static_steps > 0
    assert_all_memory_back(k)


def test_graph_runner_under_memory_pressure_with_swap_and_forks():
    """Preemption, swap and forks change which rows a decode step holds: the static buffers follow."""
    jobs = workload(n=16, seed=11, output=(10, 40))
    want, _ = run_workload(jobs, memory=frames(24), swap=frames(64))
    got, k = run_workload(jobs, memory=frames(24), swap=frames(64), graphs=True)
    assert got == want
    assert k.syscalls().schedstat().preemptions > 0
    assert_all_memory_back(k)


# ---- the host-side index checks that replace the device checks inside a graph ----

def _host(table, qs, ctx, slots):
    return HostBatch(np.asarray(slots, np.int64), np.asarray(slots, np.int64), np.asarray(slots, np.int32),
                     np.asarray(table, np.int32), np.asarray(qs, np.int32), np.asarray(ctx, np.int32),
                     np.zeros(0, np.int64))


HOST_CASES = {   # name: (page_table, query_start, context_lens, slots); 4 frames of 16 slots
    "slot past the pool": ([[0, 1]], [0, 2], [20], [18, 64]),
    "negative slot": ([[0, 1]], [0, 2], [20], [-1, 19]),
    "query_start does not start at 0": ([[0], [1]], [1, 2, 3], [5, 5], [1, 17, 2]),
    "query_start decreases": ([[0], [1]], [0, 2, 1], [5, 5], [1]),
    "query_start ends early": ([[0], [1]], [0, 1, 2], [5, 5], [1, 17, 2]),
    "context shorter than its tokens": ([[0], [1]], [0, 1, 4], [5, 2], [1, 17, 18, 19]),
    "row too short for its context": ([[0], [1]], [0, 1, 2], [5, 17], [1, 17]),
    "page entry outside the pool": ([[0, 9], [1, 2]], [0, 1, 2], [20, 17], [1, 17]),
}


@pytest.mark.parametrize("case", HOST_CASES)
def test_host_checks_give_the_device_checks_reasons(case):
    table, qs, ctx, slots = HOST_CASES[case]
    with pytest.raises(KvosError) as host:
        validate.host_batch(slots, table, qs, ctx, 4, 16)
    assert host.value.errno == EINVAL
    t = lambda a: torch.tensor(a, dtype=torch.int32)  # noqa: E731
    with pytest.raises(KvosError) as device:
        if "slot" in case:
            validate.slots_in_range(t(slots), 64)
        validate.batch_in_range(t(table), t(qs), t(ctx), len(slots), 4, 16)
    assert str(host.value) == str(device.value)


def test_host_checks_pass_a_good_batch():
    validate.host_batch([1, 17, 18, 3], [[0, 1], [1, 2]], [0, 1, 4], [20, 19], 4, 16)


def test_the_forward_skips_device_checks_for_a_host_checked_batch(monkeypatch):
    """check=False on every layer when the builder checked the host arrays: nothing in the forward may
    read an index tensor back (a captured graph cannot). The forward in torch ops is the one CUDA
    runs; on the CPU a float32 program takes the fused C forward (step_ops checks once a step), so
    the torch forward is chosen here."""
    from kernel import ops
    from userspace.programs.llama import LlamaProgram
    monkeypatch.setattr(LlamaProgram, "forward", lambda self, batch, kv: self.forward_torch(batch, kv))
    calls = []
    for name in ("write_kv", "paged_attention"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, **kw: (calls.append(kw["check"]), _real(*a, **kw))[1])
    run_workload(workload(n=3, seed=1, output=(2, 4)))
    assert calls and not any(calls)


# ---- on a GPU: the captured graphs ----

@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_equal_eager(dtype):
    from userspace.programs.loader import load_program
    outputs = {}
    for graphs in (False, True):
        k = kernel.boot(device="cuda", memory=frames(256), graphs=graphs)
        s = k.syscalls()
        tid = s.spawn_tenant(load_program(TINY, "cuda", dtype=dtype))
        pids = [s.spawn(tid, p, max_tokens=n, ignore_eos=True, temperature=0)
                for p, n in workload(n=24, seed=5, output=(8, 40))]
        while k.step():
            k.fsck()
        outputs[graphs] = [s.wait(p).tokens for p in pids]
        assert_all_memory_back(k)
        if graphs:
            st = k.graphs.stats
            assert st.replays == st.static_steps > 0 and st.captures
            # every size's logits are rows of the program's one static buffer, not a tensor each
            (static,) = k.graphs._static.values()
            shared = static.logits.untyped_storage().data_ptr()
            assert len(static.graphs) > 1
            assert all(out.untyped_storage().data_ptr() == shared for _, out in static.graphs.values())
    assert outputs[True] == outputs[False]


@cuda
@pytest.mark.cuda
def test_cuda_graph_replay_reads_no_null_frame():
    k = kernel.boot(device="cuda", memory=frames(128), graphs=True)
    s = k.syscalls()
    tid = s.spawn_tenant(TINY)
    for p, n in workload(n=5, seed=9, output=(6, 12)):          # 5 rows: graphs of 8, 3 padding rows
        s.spawn(tid, p, max_tokens=n, ignore_eos=True, temperature=0)
    seen = spy(k)
    run_poisoned(k)           # (fsck after every step here too)
    for static, eager, _, _ in seen:
        assert torch.isfinite(static).all()
        torch.testing.assert_close(static, eager, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_padded_static_decode_equals_eager_on_smollm2():
    """The real default model: 3 sequences padded to 4, logits against the unpadded eager forward."""
    k = kernel.boot(memory="64MiB", graphs=True)
    s = k.syscalls()
    tid = s.spawn_tenant("smollm2-135m")
    questions = ["What is the capital of France?", "Name three primary colors.", "Count to five."]
    pids = [s.spawn(tid, [{"role": "user", "content": q}], max_tokens=6, temperature=0) for q in questions]
    seen = spy(k)
    run_poisoned(k)
    assert seen and any(padding for *_, padding in seen)
    for static, eager, _, _ in seen:
        assert torch.isfinite(static).all()
        torch.testing.assert_close(static, eager, rtol=2e-3, atol=2e-3)
        assert torch.equal(static.argmax(-1), eager.argmax(-1))
    for pid in pids:
        s.wait(pid)
    assert_all_memory_back(k)


# ---- the device script's Python parts, on the CPU ----

def _script(*args, timeout=600):
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_kernel.py"), *args], cwd=root,
                          capture_output=True, text=True, timeout=timeout)


def test_device_script_imports_and_parses_its_arguments():
    out = _script("--help")
    assert out.returncode == 0, out.stderr[-2000:]
    for option in ("--batches", "--rounds", "--steps", "--dry-run"):
        assert option in out.stdout


@pytest.mark.slow
def test_device_script_dry_run_passes_every_check_on_the_cpu():
    out = _script("--dry-run")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "eager: 32/32 greedy outputs equal" in out.stdout and "graphs: 32/32 greedy outputs equal" in out.stdout
    assert "all checks passed" in out.stdout
    table = [line.split() for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in table[:2]] == ["1", "3"]            # a row per batch size


def test_rows_that_do_not_sample_are_left_out_in_order():
    """A decode batch whose works do not all sample (a 1-token prompt chunk that is not its last, say):
    the runner returns the rows asked for, in the order asked."""
    import dataclasses
    k = kernel.boot(memory=frames(64), graphs=True)
    s = k.syscalls()
    tid = s.spawn_tenant(TINY)
    for p, n in workload(n=5, seed=4, output=(8, 12)):
        s.spawn(tid, p, max_tokens=n, ignore_eos=True, temperature=0)
    hosts = []
    static_forward = k.graphs.forward
    k.graphs.forward = lambda *args: (hosts.append(args), static_forward(*args))[1]
    while not hosts:
        assert k.step()
    program, host, kv = hosts[0]
    subset = dataclasses.replace(host, sample_indices=np.array([3, 0, 4], dtype=np.int64))
    got, padding = static_forward(program, subset, kv)
    want = program.forward(to_device(subset, k.device), kv)
    assert padding == 3 and got.shape == (3, program.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
