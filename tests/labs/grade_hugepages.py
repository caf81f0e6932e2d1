"""Grader of lab hugepages: TLB reach, the weights in huge pages (docs/labs/hugepages.md).

The arena's copies are checked as data (exact, memory of their own, in order, each on a cache line,
inside the arena), its memory as Linux sees it (/proc/self/smaps: 2 MiB aligned and eligible for
transparent huge pages), and a GGUF model read through it must compute what it computes mapped from
its file, to the bit.
"""
import gc

import pytest
import torch

from kernel.errors import KernelPanic
from kernel.ops import hugepages
from tests.helpers.paged_runner import PagedRunner
from tests.labs.grading import points, rng
from tests.test_hugepages import thp_eligible
from tests.test_quant import MIXES, PROMPT, _model
from userspace.programs.loader import load_program

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32, torch.float64)


def tensors(name: str, n: int) -> list:
    """n tensors of random dtypes and shapes, most of them not a whole number of cache lines."""
    r = rng(name)
    g = torch.Generator().manual_seed(r.randrange(2**31))
    out = []
    for _ in range(n):
        dtype, shape = r.choice(DTYPES), tuple(r.randint(1, 40) for _ in range(r.randint(1, 3)))
        t = torch.randn(shape, generator=g) * 50
        out.append(t.to(dtype))
    return out


@points(3)
def test_take_gives_exact_copies_in_memory_of_their_own():
    sources = tensors("exact", 30) + [torch.randn(64, 64)[:, 5:40]]      # a strided source too
    arena = hugepages.Arena(1 << 20)
    copies = [arena.take(t) for t in sources]
    for t, c in zip(sources, copies):
        assert c.dtype == t.dtype and c.shape == t.shape and c.is_contiguous(), (t.dtype, t.shape)
        assert torch.equal(c, t), "a copy holds other values than its source"
        assert c.untyped_storage().data_ptr() != t.untyped_storage().data_ptr(), "take returned its source"
    before = sources[0].clone()
    copies[0].view(-1)[0] += 1
    assert torch.equal(sources[0], before), "writing a copy changed its source"


@points(3)
def test_slots_are_cache_lines_front_to_back_inside_the_arena():
    sources = tensors("slots", 40)
    arena = hugepages.Arena(1 << 20)
    base = arena.memory.data_ptr()
    at = 0
    for t in sources:
        c = arena.take(t)
        nbytes = t.numel() * t.element_size()
        assert c.data_ptr() % hugepages.ALIGN == 0, f"a copy at {c.data_ptr() - base} is not on a cache line"
        assert c.data_ptr() - base == at, f"the copy of {nbytes} bytes is at {c.data_ptr() - base}, not {at}"
        at += -(-nbytes // hugepages.ALIGN) * hugepages.ALIGN
        assert arena.used == at, f"used is {arena.used} after {at} bytes of slots"
    assert base + at <= arena.memory.data_ptr() + arena.memory.numel()


@points(3)
def test_the_arena_is_2_mib_aligned_and_eligible_for_huge_pages():
    arena = hugepages.Arena(5 << 20)
    assert arena.memory.dtype == torch.uint8 and arena.memory.numel() == arena.size == 6 << 20
    assert arena.memory.data_ptr() % hugepages.HUGE_PAGE == 0, "the arena does not start on a 2 MiB boundary"
    if not hugepages.available():
        pytest.skip("no transparent huge pages on this machine: only the alignment is graded")
    for at in range(0, arena.size, hugepages.HUGE_PAGE):        # madvise splits a mapping: every 2 MiB of it
        assert thp_eligible(arena.memory.data_ptr() + at), f"the arena's bytes from {at} are not advised"
    arena.memory[::4096] = 1                   # touch it: Linux may now back it with 2 MiB pages


@points(1)
def test_a_full_arena_refuses_and_keeps_what_it_holds():
    arena = hugepages.Arena(1)
    first = arena.take(torch.ones(hugepages.HUGE_PAGE // 8, dtype=torch.float32))
    used = arena.used
    with pytest.raises(KernelPanic):
        arena.take(torch.ones(hugepages.HUGE_PAGE // 4, dtype=torch.float32))
    assert arena.used == used and bool((first == 1).all())


@points(2)
def test_the_copies_keep_the_memory_alive():
    sources = tensors("alive", 10)
    arena = hugepages.Arena(1 << 20)
    copies = [arena.take(t) for t in sources]
    del arena
    gc.collect()
    torch.randn(1500, 1500)                    # reuse of freed memory would show in the copies
    assert all(torch.equal(c, t) for t, c in zip(sources, copies))


@points(3)
def test_a_gguf_model_computes_the_same_from_the_arena(tmp_path, monkeypatch):
    path = _model(tmp_path, monkeypatch, MIXES["q4_1+q8_0 embed"], tie_word_embeddings=True)
    monkeypatch.setenv("KVOS_HUGEPAGES", "0")                  # the file's own mapping: the reference
    mapped = load_program(str(path), "cpu", weights="gguf")
    runner = PagedRunner(mapped)
    want = runner.prefill(runner.new_seq(), PROMPT)
    del mapped, runner
    gc.collect()
    monkeypatch.setenv("KVOS_HUGEPAGES", "1")
    if not hugepages.available():
        pytest.skip("no transparent huge pages on this machine")
    placed = load_program(str(path), "cpu", weights="gguf")
    assert thp_eligible(placed.layers[0].gate_up_t.packed.data_ptr()), "the blocks are not in the arena"
    runner = PagedRunner(placed)
    assert torch.equal(runner.prefill(runner.new_seq(), PROMPT), want)
