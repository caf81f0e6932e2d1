"""fork at the kernel level: copy-on-write moves the bytes. Greedy children continue exactly as their
parent and as a fresh run of the same prompt, after one fault per child when the last page is
partly filled (the last of the sharers to write finds the page its own) and none at a page boundary."""
import pytest

import kernel
from tests.kernel_helpers import TINY, assert_all_memory_back, frames, run_to_end


def fresh_run(prompt, n):
    k = kernel.boot(memory=frames(64))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    return sys.wait(sys.spawn(tid, prompt, max_tokens=n, ignore_eos=True, temperature=0)).tokens


@pytest.mark.parametrize("prompt_len, faults", [(40, 3), (48, 0)])
def test_greedy_forks_equal_a_fresh_run_after_one_fault_each(prompt_len, faults):
    prompt = [3 + (7 * i) % 500 for i in range(prompt_len)]
    k = kernel.boot(memory=frames(64))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    filler = sys.spawn(tid, list(range(100, 180)), max_tokens=1, temperature=0)    # frames that held other K/V
    sys.wait(filler)
    parent = sys.spawn(tid, prompt, max_tokens=12, ignore_eos=True, temperature=0)
    record = sys.trace(since=sys.schedstat().steps, timeout=5.0)[-1]     # the prompt, and the first token
    assert sys.ps()[0].computed_tokens == prompt_len
    children = sys.fork(parent, 3)
    assert [p.refcount for p in sys.pagemap(parent).pages] == [4] * -(-prompt_len // 16)
    record = sys.trace(since=record.step, timeout=5.0)[-1]       # every one writes token prompt_len
    assert len(record.cow_faults) == faults and sys.meminfo().cow_faults == faults
    run_to_end(k)
    outputs = [sys.wait(pid).tokens for pid in [parent] + children]
    assert outputs == [fresh_run(prompt, 12)] * 4
    assert_all_memory_back(k)
