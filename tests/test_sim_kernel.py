"""The kernel on the simulated device: the kernel tests that apply, in virtual time.

fsck after every step, every process ends after exactly its prescribed length,
preemption (swap and reclaim) happens under pressure, every policy finishes,
and the timestamps are the device's virtual clock.
"""
import pytest

import kernel
from kernel.errors import KvosError
from tests.kernel_helpers import assert_all_memory_back, run_to_end, workload

MODEL = "llama-2-7b"
FRAME = 16 * 524_288                     # one 16-token page of LLaMA-2-7B
JOBS = workload(32)


def run_jobs(jobs=JOBS, **boot):
    boot.setdefault("memory", 256 * FRAME)
    k = kernel.boot(device="sim:a100", **boot)
    sys = k.syscalls()
    tid = sys.spawn_tenant(MODEL)
    pids = [sys.spawn(tid, prompt, max_tokens=n, ignore_eos=True) for prompt, n in jobs]
    run_to_end(k)                        # fsck after every step
    lengths = [len(sys.wait(pid).tokens) for pid in pids]
    assert lengths == [n for _, n in jobs]
    assert_all_memory_back(k)
    return k


@pytest.mark.parametrize("policy", ["fcfs", "priority", "fair", "static"])
def test_every_policy_runs_every_process_to_its_length(policy):
    k = run_jobs(policy=policy, token_budget=64)
    assert k.stats.generated_tokens == sum(n for _, n in JOBS)


def test_swap_under_pressure_loses_nothing_and_costs_pcie_time():
    k = run_jobs(memory=12 * FRAME, swap=64 * FRAME, token_budget=64)
    stat = k.syscalls().schedstat()
    assert stat.swap_outs > 0 and stat.swap_ins > 0
    dev = k.device
    assert dev.totals.swap == pytest.approx((dev.stats.swap_out_bytes + dev.stats.swap_in_bytes)
                                            / dev.gpu.pcie_bandwidth)
    assert dev.totals.swap > 0


def test_reclaim_and_recompute_lose_nothing():
    k = run_jobs(memory=12 * FRAME, swap=0, token_budget=64)
    stat = k.syscalls().schedstat()
    assert stat.reclaims > 0 and stat.recomputed_tokens > 0 and stat.swap_outs == 0


def test_prealloc_and_padded_batches_are_counted():
    k = run_jobs(alloc="prealloc", batch="padded", token_budget=64)
    assert k.stats.padding_tokens > 0


def test_time_is_virtual_and_each_step_is_priced():
    k = kernel.boot(device="sim:a100")
    sys = k.syscalls()
    tid = sys.spawn_tenant(MODEL)
    assert k.clock() == 0.0
    pid = sys.spawn(tid, list(range(3, 103)), max_tokens=5, ignore_eos=True)
    run_to_end(k)
    status = sys.wait(pid)
    stat = sys.schedstat()
    steps = [s.seconds for s in stat.recent_steps]
    assert len(steps) == 5 and k.clock() == pytest.approx(sum(steps)) == pytest.approx(stat.busy_seconds)
    assert status.time_to_first_token == pytest.approx(steps[0])        # the prefill step
    assert status.elapsed == pytest.approx(sum(steps))
    k.device.advance_to(100.0)                                          # idle time passes for a driver
    assert k.clock() == 100.0
    k.device.advance_to(50.0)                                           # and never runs backwards
    assert k.clock() == 100.0


def test_chunked_prefill_never_stalls_decodes():
    k = kernel.boot(device="sim:a100", memory=128 * FRAME, token_budget=32, chunk=8)
    sys = k.syscalls()
    tid = sys.spawn_tenant(MODEL)
    short = sys.spawn(tid, list(range(3, 10)), max_tokens=30, ignore_eos=True)
    k.step()
    k.step()
    sys.spawn(tid, list(range(3, 300)), max_tokens=2, ignore_eos=True)
    while k.procs[short].alive:
        before = len(k.procs[short].output)
        k.step()
        assert len(k.procs[short].output) == before + 1 or not k.procs[short].alive
    run_to_end(k)


def test_fork_shares_pages_copy_on_write():
    k = kernel.boot(device="sim:a100", memory=64 * FRAME)
    sys = k.syscalls()
    tid = sys.spawn_tenant(MODEL)
    pid = sys.spawn(tid, list(range(3, 43)), max_tokens=20, ignore_eos=True)
    while k.procs[pid].num_computed < 40:
        k.step()
    children = sys.fork(pid, 3)
    assert [p.refcount for p in sys.pagemap(pid).pages] == [4, 4, 4]
    copied = k.device.stats.copy_bytes
    run_to_end(k)
    assert all(len(sys.wait(p).tokens) == 20 for p in [pid] + children)
    assert sys.meminfo().cow_faults >= 3
    assert k.device.stats.copy_bytes - copied == 3 * FRAME              # the shared partial page, copied thrice
    assert k.device.totals.copy > 0
    assert_all_memory_back(k)


def test_shm_prefix_is_prefilled_once():
    k = kernel.boot(device="sim:a100", memory=128 * FRAME)
    sys = k.syscalls()
    tid = sys.spawn_tenant(MODEL)
    shmid = sys.shmget(tid, list(range(3, 103)))
    pids = [sys.spawn(tid, [200 + i, 201, 202], max_tokens=4, ignore_eos=True, shm=shmid) for i in range(6)]
    run_to_end(k)
    stat = sys.schedstat()
    assert stat.prefill_tokens == 100 + 6 * 3 and stat.cached_tokens == 6 * 100
    assert all(len(sys.wait(p).tokens) == 4 for p in pids)
    sys.shmrm(shmid)
    assert_all_memory_back(k)


def test_a_process_that_can_never_fit_gets_enomem():
    k = kernel.boot(device="sim:a100", memory=4 * FRAME, swap=0)
    sys = k.syscalls()
    tid = sys.spawn_tenant(MODEL)
    with pytest.raises(KvosError) as err:
        sys.spawn(tid, list(range(3, 100)), max_tokens=5)
    assert err.value.errno == "ENOMEM"
    pid = sys.spawn(tid, list(range(3, 40)), max_tokens=100, ignore_eos=True)
    run_to_end(k)
    status = sys.wait(pid)
    assert status.reason == "error" and "ENOMEM" in status.error
    assert_all_memory_back(k)


def test_two_models_share_the_pool_and_each_pass_is_priced():
    k = kernel.boot(device="sim:a100", memory="4GiB", frame_bytes=FRAME)
    sys = k.syscalls()
    big, small = sys.spawn_tenant("llama-2-7b"), sys.spawn_tenant("smollm2-135m")
    assert k.tenants[small].page_size > k.tenants[big].page_size       # more tokens per frame
    for tid in (big, small):
        sys.spawn(tid, list(range(3, 50)), max_tokens=3, ignore_eos=True)
    k.step()
    gpu = k.device.gpu                                               # one pass per program, one sequence each
    assert k.device.last_cost.overhead == pytest.approx(2 * gpu.step_overhead + 2 * gpu.seq_overhead)
    run_to_end(k)
