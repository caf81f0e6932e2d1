"""kernel/ops/hugepages.py: the huge-page arena, and a GGUF program's blocks read into it.

Whether the kernel backs a range with 2 MiB pages is its call (memory may be fragmented), so the
tests check what kvos controls: the range is eligible (smaps' THPeligible, which reads the madvise
and the alignment), the copies are exact and aligned, and a program computes the same bits from
the arena as from the file's own mapping.
"""
import gc

import pytest
import torch
from safetensors.torch import load_file, save_file

from kernel.errors import KernelPanic
from kernel.ops import hugepages
from tests.helpers.paged_runner import PagedRunner
from tests.test_quant import MIXES, PROMPT, _model
from userspace.programs import converted, qlinear
from userspace.programs.loader import load_program

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages on this system")


def thp_eligible(address: int) -> bool:
    """Whether the mapping holding address may get transparent huge pages (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                lo, hi = (int(v, 16) for v in first.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("THPeligible:"):
                return line.split()[1] == "1"
    return False


@needs_thp
def test_an_arena_hands_out_exact_aligned_copies_that_do_not_overlap():
    arena = hugepages.arena(10 << 20)
    sources = [torch.randn(1000, 37), torch.arange(77, dtype=torch.int8), torch.randn(5, dtype=torch.float64),
               torch.randint(0, 255, (3, 4, 5), dtype=torch.uint8), torch.randn(64, 64)[:, 3:].contiguous()]
    copies = [arena.take(t) for t in sources]
    spans = []
    for t, c in zip(sources, copies):
        assert torch.equal(c, t) and c.shape == t.shape and c.dtype == t.dtype and c.is_contiguous()
        assert c.data_ptr() % hugepages.ALIGN == 0 and thp_eligible(c.data_ptr())
        spans.append((c.data_ptr(), c.data_ptr() + c.numel() * c.element_size()))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert arena.memory.data_ptr() % hugepages.HUGE_PAGE == 0
    copies[0][0, 0] = 42.0                       # a copy, not a view of its source
    assert sources[0][0, 0] != 42.0
    del arena
    gc.collect()                                  # the copies keep the mapping alive
    torch.randn(2000, 2000)
    assert all(torch.equal(c, t) for t, c in zip(sources[1:], copies[1:]))


@needs_thp
def test_an_arena_refuses_what_does_not_fit():
    arena = hugepages.arena(100)
    arena.take(torch.zeros(hugepages.HUGE_PAGE // 4 - 16))
    with pytest.raises(KernelPanic):
        arena.take(torch.zeros(32))


def test_kvos_hugepages_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("KVOS_HUGEPAGES", "0")
    assert not hugepages.available() and hugepages.arena(1 << 20) is None


@needs_thp
def test_read_tensors_into_huge_pages_gives_the_file_s_tensors(tmp_path):
    tensors = {"a": torch.randn(300, 7), "b": torch.arange(1001, dtype=torch.int32),
               "c": torch.randn(17).to(torch.bfloat16), "d": torch.randint(0, 255, (9, 18, 5), dtype=torch.uint8)}
    save_file(tensors, tmp_path / "w.safetensors")
    mapped = load_file(tmp_path / "w.safetensors")
    placed = converted.read_tensors(tmp_path / "w.safetensors", huge_pages=True)
    assert placed.keys() == mapped.keys()
    for key, t in placed.items():
        assert torch.equal(t, mapped[key]) and t.dtype == mapped[key].dtype
        assert thp_eligible(t.data_ptr()) and not thp_eligible(mapped[key].data_ptr())


@needs_thp
def test_a_gguf_program_s_blocks_sit_in_huge_pages_and_compute_the_same(tmp_path, monkeypatch):
    path = _model(tmp_path, monkeypatch, MIXES["q4_1+q8_0 embed"], tie_word_embeddings=True)
    first = load_program(str(path), "cpu", weights="gguf")       # repacks, then reads the cache back
    blocks = [layer.gate_up_t.packed for layer in first.layers] + [first.lm_head.blocks.packed]
    assert all(isinstance(layer.qkv_t, qlinear.BlockLinear) for layer in first.layers)
    assert all(thp_eligible(t.data_ptr()) for t in blocks)
    runner = PagedRunner(first)
    want = runner.prefill(runner.new_seq(), PROMPT)
    del first, runner, blocks
    gc.collect()
    monkeypatch.setenv("KVOS_HUGEPAGES", "0")                   # the same cache, from the file's mapping
    mapped = load_program(str(path), "cpu", weights="gguf")
    assert not thp_eligible(mapped.layers[0].gate_up_t.packed.data_ptr())
    runner = PagedRunner(mapped)
    assert torch.equal(runner.prefill(runner.new_seq(), PROMPT), want)
