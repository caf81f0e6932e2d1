"""Memory manager: frames, page tables, copy-on-write, page cache, shm, swap, cgroups, fsck."""
import pytest

from kernel.errors import KernelPanic, KvosError
from kernel.mm import MemoryPressure, SwapFull
from tests.mm_helpers import append, make_mm, read_tokens, snapshot

NS = b"program-A"


def test_on_demand_allocation_and_slots():
    mm = make_mm(num_frames=8, page_size=4)
    cg = mm.create_cgroup("t")
    a = mm.create(cg, 4, NS)
    assert mm.meminfo().mapped == 0            # nothing reserved at creation
    slots = mm.append(a, [1, 2, 3])
    assert len(mm.space(a).frames) == 1 and len(slots) == 3
    frame = mm.space(a).frames[0]
    assert slots == [frame * 4, frame * 4 + 1, frame * 4 + 2]
    mm.append(a, [4, 5])                       # crosses into a second page
    assert len(mm.space(a).frames) == 2
    assert mm.frames_needed(a, 3) == 0 and mm.frames_needed(a, 4) == 1
    mm.fsck()
    mm.free(a)
    assert mm.meminfo().free == 8
    mm.fsck()


def test_fork_copy_on_write_on_real_data():
    mm = make_mm(num_frames=8, page_size=4)
    cg = mm.create_cgroup("t")
    parent = mm.create(cg, 4, NS)
    append(mm, parent, [10, 11, 12, 13, 14, 15])          # one full page, one half page
    child = mm.fork(parent)
    assert mm.space(child).frames == mm.space(parent).frames
    assert [p.refcount for p in mm.pagemap(child).pages] == [2, 2]
    assert [p.cow for p in mm.pagemap(child).pages] == [False, True]   # full pages never fault
    append(mm, child, [20])                                 # fault: copy the half page
    assert mm.cow_faults == 1
    append(mm, parent, [30, 31, 32])                        # parent's page is private again: no fault
    assert mm.cow_faults == 1
    assert mm.space(child).frames[0] == mm.space(parent).frames[0]      # the full page stays shared
    assert mm.space(child).frames[1] != mm.space(parent).frames[1]
    assert read_tokens(mm, parent) == [10, 11, 12, 13, 14, 15, 30, 31, 32]
    assert read_tokens(mm, child) == [10, 11, 12, 13, 14, 15, 20]
    mm.fsck()
    mm.free(parent)
    mm.free(child)
    mm.fsck()
    assert mm.meminfo().free + mm.meminfo().cached == 8


def test_page_cache_hit_eviction_and_verification():
    mm = make_mm(num_frames=4, page_size=4)
    cg = mm.create_cgroup("t")
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    a = mm.create(cg, 4, NS)
    append(mm, a, prompt)
    assert mm.publish(a) == 2
    mm.free(a)
    info = mm.meminfo()
    assert info.cached == 2 and info.free == 2             # full pages stay, named and reclaimable
    b = mm.create(cg, 4, NS)
    assert mm.map_cached(b, prompt, max_tokens=len(prompt) - 1) == 8
    assert mm.meminfo().page_cache_hits == 2
    assert read_tokens(mm, b) == prompt[:8]
    other = mm.create(cg, 4, b"program-B")                 # another namespace: no hit
    assert mm.map_cached(other, prompt) == 0
    mm.free(b)
    # allocation takes free frames first, then evicts least recently used cached frames
    c = mm.create(cg, 4, NS)
    mm.append(c, list(range(100, 112)))
    assert mm.meminfo().page_cache_evictions == 1
    mm.fsck()


def test_hit_verifies_tokens_not_only_the_hash():
    mm = make_mm(num_frames=4, page_size=2)
    cg = mm.create_cgroup("t")
    a = mm.create(cg, 2, NS)
    append(mm, a, [1, 2, 3])
    mm.publish(a)
    frame = mm.space(a).frames[0]
    name = mm.page_cache.page_of[frame].name
    # forge a colliding name: same hash, other tokens -> lookup must refuse it
    assert mm.page_cache.lookup(name, NS, [9, 9]) is None
    assert mm.page_cache.lookup(name, NS, [1, 2]) == frame


def test_shm_segment_is_pinned_and_shared():
    mm = make_mm(num_frames=6, page_size=4)
    cg = mm.create_cgroup("t")
    builder = mm.create(cg, 4, NS)
    append(mm, builder, [1, 2, 3, 4, 5, 6])
    shmid = mm.make_segment(builder)
    assert all(p.pinned for p in mm.segment_pagemap(shmid).pages)
    x, y = mm.create(cg, 4, NS), mm.create(cg, 4, NS)
    assert mm.attach(x, shmid) == 6 and mm.attach(y, shmid) == 6
    append(mm, x, [7])
    append(mm, y, [8])
    assert mm.cow_faults == 2
    assert read_tokens(mm, x) == [1, 2, 3, 4, 5, 6, 7]
    assert read_tokens(mm, y) == [1, 2, 3, 4, 5, 6, 8]
    mm.free(x)
    mm.free(y)
    # pinned pages are never evicted: a process needing every other frame cannot take them
    big = mm.create(cg, 4, NS)
    with pytest.raises(MemoryPressure):
        mm.append(big, list(range(24)))
    mm.remove_segment(shmid)
    mm.fsck()
    mm.append(big, list(range(24)))      # the full page is reclaimable now (cached), the rest free
    mm.fsck()


def test_swap_out_and_in_keep_data_and_free_frames():
    mm = make_mm(num_frames=6, page_size=4, swap_slots=4)
    cg = mm.create_cgroup("t")
    a = mm.create(cg, 4, NS)
    append(mm, a, list(range(10)))
    assert mm.swap_out(a) == 3
    assert mm.meminfo().mapped == 0 and mm.space(a).is_swapped
    assert all(p.swapped and p.frame is None for p in mm.pagemap(a).pages)
    mm.fsck()
    other = mm.create(cg, 4, NS)                # someone else uses the frames meanwhile
    append(mm, other, list(range(50, 70)))
    mm.free(other)
    assert mm.swap_in(a) == 3
    assert read_tokens(mm, a) == list(range(10))
    mm.fsck()


def test_swap_in_maps_pages_still_in_the_page_cache():
    mm = make_mm(num_frames=6, page_size=4, swap_slots=4)
    cg = mm.create_cgroup("t")
    a = mm.create(cg, 4, NS)
    append(mm, a, list(range(10)))
    mm.publish(a)
    mm.swap_out(a)
    assert mm.meminfo().cached == 2             # the two full pages stay named
    assert mm.swap_in(a) == 1                   # only the partial page is copied back
    assert read_tokens(mm, a) == list(range(10))
    mm.fsck()


def test_swap_full_changes_nothing():
    mm = make_mm(num_frames=6, page_size=4, swap_slots=1)
    cg = mm.create_cgroup("t")
    a = mm.create(cg, 4, NS)
    append(mm, a, list(range(10)))
    before = snapshot(mm)
    with pytest.raises(SwapFull):
        mm.swap_out(a)
    assert snapshot(mm) == before


def test_cgroup_limit_and_charges():
    mm = make_mm(num_frames=8, page_size=4)
    small = mm.create_cgroup("small", limit=2)
    big = mm.create_cgroup("big")
    a = mm.create(small, 4, NS)
    mm.append(a, list(range(8)))
    before = snapshot(mm)
    with pytest.raises(MemoryPressure) as err:
        mm.append(a, [1])
    assert err.value.cgroup is mm.cgroups[small] and err.value.errno == "ENOMEM"
    assert snapshot(mm) == before
    b = mm.create(big, 4, NS)
    mm.append(b, list(range(12)))                # the other tenant is not limited by it
    assert mm.meminfo().cgroups["small"].charged == 2
    assert mm.meminfo().cgroups["big"].charged == 3
    mm.fsck()


def test_pool_exhaustion_is_memory_pressure_and_changes_nothing():
    mm = make_mm(num_frames=2, page_size=4)
    cg = mm.create_cgroup("t")
    a = mm.create(cg, 4, NS)
    mm.append(a, list(range(6)))
    before = snapshot(mm)
    with pytest.raises(MemoryPressure) as err:
        mm.append(a, list(range(4)))
    assert err.value.cgroup is None
    assert snapshot(mm) == before


@pytest.mark.parametrize("call", [
    lambda mm, a: mm.append(12345, [1]),
    lambda mm, a: mm.fork(999),
    lambda mm, a: mm.free(999),
    lambda mm, a: mm.swap_out(999),
    lambda mm, a: mm.attach(a, 999),
    lambda mm, a: mm.remove_segment(999),
    lambda mm, a: mm.create(999, 4, NS),
    lambda mm, a: mm.create(1, 0, NS),
    lambda mm, a: mm.create_cgroup("x", limit=0),
    lambda mm, a: mm.create_cgroup("x", limit="lots"),
    lambda mm, a: mm.remove_cgroup(0),
    lambda mm, a: mm.pagemap(-1),
    lambda mm, a: mm.make_segment(mm.empty),
    lambda mm, a: mm.attach(a, mm.make_segment(mm.empty)),
])
def test_bad_input_is_refused_and_changes_nothing(call):
    mm = make_mm(num_frames=4, page_size=4)
    cg = mm.create_cgroup("t")
    assert cg == 1
    a = mm.create(cg, 4, NS)
    append(mm, a, [1, 2, 3, 4, 5])
    mm.fork(a)
    mm.empty = mm.create(cg, 4, NS)
    before = snapshot(mm)
    with pytest.raises(KvosError) as err:
        call(mm, a)
    assert err.value.errno in ("EINVAL", "ESRCH")
    assert snapshot(mm) == before
    mm.fsck()


def test_attach_refuses_a_non_empty_space_or_another_program():
    mm = make_mm(num_frames=6, page_size=4)
    cg = mm.create_cgroup("t")
    s = mm.create(cg, 4, NS)
    append(mm, s, [1, 2])
    shmid = mm.make_segment(s)
    busy = mm.create(cg, 4, NS)
    append(mm, busy, [3])
    stranger = mm.create(cg, 4, b"other-program")
    before = snapshot(mm)
    for asid in (busy, stranger):
        with pytest.raises(KvosError):
            mm.attach(asid, shmid)
    assert snapshot(mm) == before


def test_fsck_catches_corruption():
    mm = make_mm(num_frames=4, page_size=4)
    cg = mm.create_cgroup("t")
    a = mm.create(cg, 4, NS)
    mm.append(a, [1, 2, 3])
    mm.frames.refcount[mm.space(a).frames[0]] += 1
    with pytest.raises(KernelPanic, match="refcount"):
        mm.fsck()


def test_fsck_catches_a_leaked_frame():
    mm = make_mm(num_frames=4, page_size=4)
    mm.frames.free_list.pop()
    with pytest.raises(KernelPanic):
        mm.fsck()


def test_removing_a_cgroup_reparents_shared_frames():
    mm = make_mm(num_frames=6, page_size=4)
    a_cg, b_cg = mm.create_cgroup("a"), mm.create_cgroup("b")
    a = mm.create(a_cg, 4, NS)
    append(mm, a, list(range(8)))
    mm.publish(a)
    b = mm.create(b_cg, 4, NS)                  # global sharing: same namespace across tenants
    assert mm.map_cached(b, list(range(9)), max_tokens=8) == 8
    with pytest.raises(KvosError):
        mm.remove_cgroup(a_cg)                  # still has an address space
    mm.free(a)
    mm.remove_cgroup(a_cg)
    assert mm.meminfo().cgroups["root"].charged == 2
    mm.fsck()


def test_prealloc_reservation_is_mapped_waste_until_filled():
    mm = make_mm(num_frames=8, page_size=4)
    cg = mm.create_cgroup("t")
    a = mm.create(cg, 4, NS)
    append(mm, a, [1, 2, 3])
    assert mm.reserve(a, 20) == 4                # 5 pages in all for 20 tokens
    info = mm.meminfo()
    assert info.mapped == 5 and info.tokens_stored == 3
    assert mm.frames_needed(a, 10) == 0          # the reservation covers growth
    append(mm, a, list(range(4, 14)))
    assert mm.meminfo().mapped == 5
    child = mm.fork(a)                           # the child shares pages, not the reservation
    assert len(mm.space(child).frames) == 4
    mm.fsck()
    mm.swap_out(a)                               # swapping releases the reservation
    assert len(mm.space(a).swap_slots) == 4
    mm.fsck()
    mm.swap_in(a)
    assert read_tokens(mm, a) == [1, 2, 3] + list(range(4, 14))
    mm.fsck()


def test_device_batches_are_cut_at_hazards():
    from kernel.devices.base import Device, MemOp
    seen = []

    class Recorder(Device):
        def _swap_out(self, frames, slots):
            seen.append(("out", frames, slots))

        def _copy_frames(self, src, dst):
            seen.append(("copy", src, dst))

    dev = Recorder("rec")
    dev.run([MemOp("swap_out", 1, 0), MemOp("swap_out", 2, 1), MemOp("swap_out", 3, 0),   # slot 0 reused
             MemOp("copy", 4, 5), MemOp("copy", 5, 6), MemOp("copy", 7, 8)])              # 5 read after written
    assert seen == [("out", [1, 2], [0, 1]), ("out", [3], [0]), ("copy", [4], [5]), ("copy", [5, 7], [6, 8])]
