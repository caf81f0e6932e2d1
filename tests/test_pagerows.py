"""The batch builder's persistent page table (kernel/pagerows.py) against a table rebuilt each step.

A seeded whole-kernel run on tiny-llama (a system prompt in shm, forks, a pool small enough that
processes are preempted, swapped out and back in) builds every step's batch both ways; the two
page tables must be equal at every step, fsck clean after each. A parent's copy-on-write
remap after a fork (a row the table holds, changed in place) is checked the same way, and a unit
test drives the rows alone through appends, a remap, a replaced list, a shorter list, reclaim and growth.
"""
import random
from types import SimpleNamespace

import numpy as np
import pytest

import kernel
from kernel import step as kstep
from kernel.errors import KernelPanic
from kernel.pagerows import PageRows
from userspace.programs.loader import load_program

GREEDY = dict(temperature=0, ignore_eos=True)


def test_rows_follow_appends_remaps_and_replaced_lists():
    mm = SimpleNamespace(spaces={1: None, 2: None})
    rows = PageRows(mm, rows=2, width=2)
    a, b = [5, 6], [7]
    assert rows.rows_for([1, 2], [a, b]).tolist() == [[5, 6], [7, 0]]
    a.append(8)                                            # a page appended: only the tail is written
    assert rows.rows_for([1, 2], [a, b]).tolist() == [[5, 6, 8], [7, 0, 0]] and rows.tails == 1
    b[0] = 9                                               # remapped in place: stale until reported
    mm.remapped.add(2)
    assert rows.rows_for([2], [b]).tolist() == [[9]]
    a2 = [3, 4]                                            # swapped out and back in: another list
    assert rows.rows_for([1], [a2]).tolist() == [[3, 4]]
    rows.check([1, 2], [a2, b])
    a2.pop()                                               # shorter: rewritten, the old tail zeroed
    assert rows.rows_for([1, 2], [a2, b]).tolist() == [[3], [9]]
    rows.check([1, 2], [a2, b])
    del mm.spaces[1]                                       # asid 1 is freed: its row is reused
    mm.spaces[3] = mm.spaces[4] = None
    assert rows.rows_for([3, 2, 4], [[1, 2], b, [3]]).tolist() == [[1, 2], [9, 0], [3, 0]]
    assert rows.table.shape[0] == 4 and 1 not in rows.row_of
    rows.table[rows.row_of[2], 1] = 7
    with pytest.raises(KernelPanic):
        rows.check([2], [b])


@pytest.fixture
def compared(monkeypatch):
    """Every batch the kernel builds is built again with a fresh table; the two must be equal."""
    real = kstep.host_batch
    seen = []

    def both(works, wanted, mm, null_frame=None, page_rows=None, extra_rows=()):
        assert page_rows is not None and null_frame is None
        host, padding = real(works, wanted, mm, null_frame, page_rows, extra_rows)
        rebuilt, _ = real(works, wanted, mm, null_frame, None, extra_rows)
        assert host.page_table.shape == rebuilt.page_table.shape
        assert np.array_equal(host.page_table, rebuilt.page_table)
        seen.append(len(works))
        return host, padding
    monkeypatch.setattr(kstep, "host_batch", both)
    return seen


def test_a_parents_cow_remap_after_fork_rewrites_its_row(compared):
    k = kernel.boot(memory="64MiB")
    s = k.syscalls()
    tid = s.spawn_tenant(load_program("tiny-llama"))
    parent = s.spawn(tid, list(range(3, 23)), max_tokens=30, **GREEDY)      # 20 tokens: a partly filled page
    for _ in range(3):
        k.step()
    asid = k.procs[parent].asid
    assert asid in k.page_rows.source                       # the parent's row is in the table
    s.fork(parent, 1)
    faults, rewrites = k.mm.cow_faults, k.page_rows.rewrites
    k.step()                                                # the parent writes its shared page first
    assert k.mm.cow_faults == faults + 1 and k.page_rows.rewrites == rewrites + 2     # its row, the child's
    while k.step():
        k.fsck()
    k.fsck()
    k.shutdown()


def test_incremental_table_equals_a_rebuilt_one_every_step(compared):
    program = load_program("tiny-llama")
    frame = 16 * program.kv_shape.bytes_per_token
    k = kernel.boot(memory=40 * frame, swap="64MiB", token_budget=256)
    s = k.syscalls()
    tid = s.spawn_tenant(program)
    rng = random.Random(1)
    shm = s.shmget(tid, [rng.randrange(3, 512) for _ in range(40)])
    pids = []
    for i in range(24):
        prompt = [rng.randrange(3, 512) for _ in range(rng.randint(5, 90))]
        pids.append(s.spawn(tid, prompt, max_tokens=rng.randint(8, 60), shm=shm if i % 3 == 0 else None, **GREEDY))
    for _ in range(6):
        k.step()
        k.fsck()
    for pid in pids[:4]:
        if k.procs[pid].alive:
            pids += s.fork(pid, 2)
    while k.step():
        k.fsck()
    for pid in pids:
        s.wait(pid)
    s.shmrm(shm)
    k.fsck()
    st = s.schedstat()
    rows = k.page_rows
    assert st.preemptions > 0 and st.swap_outs > 0 and st.swap_ins > 0 and k.mm.cow_faults > 0
    assert len(compared) > 50 and rows.tails > 0 and rows.rewrites > len(pids)
    k.shutdown()
