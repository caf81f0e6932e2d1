"""Bad arguments to kernel/ops raise KvosError(EINVAL) before any memory is touched.

Each case corrupts one argument of a valid call and checks the error, that the pool is
byte-identical afterwards and that a poisoned `out` is still all poison. The torch index
checks that CUDA uses (validate.py) must give the same reasons as the C pre-pass.
"""
import pytest
import torch

from kernel import ops
from kernel.errors import KvosError
from kernel.ops import validate
from tests.test_ops_helpers import make_batch


@pytest.fixture
def batch():
    return make_batch([1, 3, 2], [40, 3, 70], 9, 3, 64, 16)


def attention_args(batch):
    k_cache, v_cache = batch.caches
    return dict(q=batch.q, k_cache=k_cache, v_cache=v_cache, page_table=batch.page_table.clone(),
                query_start=batch.query_start.clone(), context_lens=batch.context_lens.clone(), scale=0.125,
                out=torch.full_like(batch.q, float("nan")))


def bad_table(table, row, col, value):
    table = table.clone()
    table[row, col] = value
    return table


ATTENTION_CASES = {
    "q dtype": (lambda a: {"q": a["q"].double()}, "dtype"),
    "q heads not a multiple of kv heads": (lambda a: {"q": a["q"][:, :8], "out": a["out"][:, :8]}, "multiple"),
    "q head_dim": (lambda a: {"q": a["q"][:, :, :32], "out": a["out"][:, :, :32]}, "head_dim"),
    "q last dim strided": (lambda a: {"q": a["q"].transpose(1, 2).contiguous().transpose(1, 2)}, "contiguous"),
    "out shape": (lambda a: {"out": a["out"][:-1]}, "out has shape"),
    "out dtype": (lambda a: {"out": a["out"].double()}, "dtype"),
    "page_table dtype": (lambda a: {"page_table": a["page_table"].float()}, "dtype"),
    "page_table rank": (lambda a: {"page_table": a["page_table"].flatten()}, "dimensions"),
    "query_start length": (lambda a: {"query_start": a["query_start"][:-1]}, "entries"),
    "context_lens length": (lambda a: {"context_lens": a["context_lens"][:-1]}, "entries"),
    "query_start[0]": (lambda a: {"query_start": a["query_start"] + 1}, "query_start[0]"),
    "query_start decreases": (lambda a: {"query_start": torch.tensor([0, 3, 1, 6], dtype=torch.int32)}, "decreases"),
    "query_start end": (lambda a: {"query_start": torch.tensor([0, 1, 4, 5], dtype=torch.int32)}, "ends at"),
    "context shorter than q_len": (lambda a: {"context_lens": torch.tensor([40, 2, 70], dtype=torch.int32)},
                                   "shorter"),
    "context beyond the page-table row": (lambda a: {"context_lens": torch.tensor([40, 3, 90], dtype=torch.int32)},
                                          "pages"),
    "page entry past the pool": (lambda a: {"page_table": bad_table(a["page_table"], 2, 4, 10**6)}, "not a frame"),
    "negative page entry": (lambda a: {"page_table": bad_table(a["page_table"], 0, 1, -1)}, "not a frame"),
    "scale NaN": (lambda a: {"scale": float("nan")}, "scale"),
    "scale not a number": (lambda a: {"scale": "0.1"}, "scale"),
    "cache dtype unsupported on cpu": (lambda a: {"k_cache": a["k_cache"].half(), "v_cache": a["v_cache"].half(),
                                                  "q": a["q"].half(), "out": a["out"].half()}, "cpu caches hold"),
    "k and v caches differ": (lambda a: {"v_cache": a["v_cache"][:-1]}, "differ"),
    "int64 index beyond int32": (lambda a: {"context_lens": a["context_lens"].long() + 2**40}, "int32"),
}


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_paged_attention_refuses(batch, case):
    change, reason = ATTENTION_CASES[case]
    args = attention_args(batch)
    args.update(change(args))
    before = batch.snapshot()
    out = args["out"]
    with pytest.raises(KvosError) as info:
        ops.paged_attention(**args)
    assert info.value.errno == "EINVAL"
    assert reason in info.value.reason, info.value.reason
    assert torch.equal(batch.pool, before)
    assert torch.isnan(out).all(), "out was written before the error"


def test_unused_page_entries_are_not_checked(batch):
    """Entries past a sequence's context are padding (any value): never read, never refused."""
    args = attention_args(batch)
    args["page_table"] = torch.cat([args["page_table"], torch.full((3, 2), -7, dtype=torch.int32)], dim=1)
    ops.paged_attention(**args)


def write_args(batch):
    k_cache, v_cache = batch.caches
    slots = (batch.ours[:1] * 16 + torch.arange(4)).to(torch.int32)
    return dict(k_cache=k_cache, v_cache=v_cache, k=torch.randn(4, 3, 64), v=torch.randn(4, 3, 64),
                slot_mapping=slots)


WRITE_CASES = {
    "k dtype": (lambda a: {"k": a["k"].double()}, "dtype"),
    "k shape": (lambda a: {"k": a["k"][:, :2]}, "expected (num_tokens"),
    "v tokens": (lambda a: {"v": a["v"][:3]}, "tokens"),
    "slot_mapping length": (lambda a: {"slot_mapping": a["slot_mapping"][:3]}, "entries"),
    "slot_mapping dtype": (lambda a: {"slot_mapping": a["slot_mapping"].float()}, "dtype"),
    "slot past the pool": (lambda a: {"slot_mapping": torch.tensor([0, 1, 2, 10**6], dtype=torch.int32)}, "outside"),
    "negative slot": (lambda a: {"slot_mapping": torch.tensor([0, -1, 2, 3], dtype=torch.int32)}, "outside"),
    "k last dim strided": (lambda a: {"k": a["k"].transpose(1, 2).contiguous().transpose(1, 2)}, "contiguous"),
    "k_cache not a cache": (lambda a: {"k_cache": a["k_cache"][0]}, "dimensions"),
    "k not a tensor": (lambda a: {"k": a["k"].tolist()}, "torch.Tensor"),
}


@pytest.mark.parametrize("case", sorted(WRITE_CASES))
def test_write_kv_refuses(batch, case):
    change, reason = WRITE_CASES[case]
    args = write_args(batch)
    args.update(change(args))
    before = batch.snapshot()
    with pytest.raises(KvosError) as info:
        ops.write_kv(**args)
    assert info.value.errno == "EINVAL" and reason in info.value.reason, info.value.reason
    assert torch.equal(batch.pool, before)


def idx(*values):
    return torch.tensor(values, dtype=torch.int32)


FRAME_CASES = {   # op, args builder (pool, swap), reason
    "copy src past the pool": ("copy", lambda p, s: (p, idx(1, 9), idx(2, 3)), "src[1] = 9 is outside"),
    "copy negative dst": ("copy", lambda p, s: (p, idx(1, 4), idx(2, -3)), "dst[1] = -3 is outside"),
    "copy repeated dst": ("copy", lambda p, s: (p, idx(1, 4), idx(2, 2)), "repeats"),
    "copy dst is a src": ("copy", lambda p, s: (p, idx(1, 4), idx(4, 2)), "also a source"),
    "copy lists differ in length": ("copy", lambda p, s: (p, idx(1, 4), idx(2)), "entries"),
    "copy pool not bytes": ("copy", lambda p, s: (p.view(torch.int16), idx(1), idx(2)), "dtype"),
    "copy pool not contiguous": ("copy", lambda p, s: (p[:, :8], idx(1), idx(2)), "contiguous"),
    "copy float frame list": ("copy", lambda p, s: (p, idx(1).float(), idx(2)), "dtype"),
    "swap_out slot past the swap area": ("out", lambda p, s: (p, s, idx(1, 2), idx(0, 4)), "slots[1] = 4 is outside"),
    "swap_out frame past the pool": ("out", lambda p, s: (p, s, idx(8, 2), idx(0, 1)), "frames[0] = 8 is outside"),
    "swap_out repeated slot": ("out", lambda p, s: (p, s, idx(1, 2), idx(3, 3)), "repeats"),
    "swap_out frame sizes differ": ("out", lambda p, s: (p, s[:, :8].contiguous(), idx(1), idx(0)), "differ in size"),
    "swap_in frame past the pool": ("in", lambda p, s: (s, p, idx(0, 1), idx(2, 8)), "frames[1] = 8 is outside"),
    "swap_in repeated frame": ("in", lambda p, s: (s, p, idx(0, 1), idx(5, 5)), "repeats"),
}


@pytest.mark.parametrize("case", sorted(FRAME_CASES))
def test_frame_copies_refuse(case):
    op, build, reason = FRAME_CASES[case]
    pool = torch.randint(0, 256, (8, 16), dtype=torch.uint8)
    swap = torch.randint(0, 256, (4, 16), dtype=torch.uint8)
    before, swap_before = pool.clone(), swap.clone()
    fn = {"copy": ops.copy_frames, "out": ops.swap_out, "in": ops.swap_in}[op]
    with pytest.raises(KvosError) as info:
        fn(*build(pool, swap))
    assert info.value.errno == "EINVAL" and reason in info.value.reason, info.value.reason
    assert torch.equal(pool, before) and torch.equal(swap, swap_before)


INDEX_CASES = ["query_start[0]", "query_start decreases", "query_start end", "context shorter than q_len",
               "context beyond the page-table row", "page entry past the pool", "negative page entry"]


@pytest.mark.parametrize("case", INDEX_CASES)
def test_torch_index_checks_give_the_c_reasons(batch, case):
    """validate.batch_in_range (the CUDA path's check) and the C pre-pass agree word for word."""
    change, _ = ATTENTION_CASES[case]
    args = attention_args(batch)
    args.update(change(args))
    with pytest.raises(KvosError) as c_check:
        ops.paged_attention(**args)
    with pytest.raises(KvosError) as torch_check:
        validate.batch_in_range(args["page_table"], args["query_start"], args["context_lens"], batch.q.shape[0],
                                args["k_cache"].shape[0], args["k_cache"].shape[1])
    assert c_check.value.reason == torch_check.value.reason


@pytest.mark.parametrize("case", ["copy src past the pool", "copy negative dst", "copy repeated dst",
                                  "copy dst is a src"])
def test_torch_frame_list_checks_give_the_c_reasons(case):
    _, build, _ = FRAME_CASES[case]
    pool = torch.zeros(8, 16, dtype=torch.uint8)
    _, src, dst = build(pool, None)
    with pytest.raises(KvosError) as c_check:
        ops.copy_frames(pool, src, dst)
    with pytest.raises(KvosError) as torch_check:
        validate.frame_lists(src, 8, dst, 8, True)
    assert c_check.value.reason == torch_check.value.reason


def test_torch_slot_check_gives_the_c_reason(batch):
    args = write_args(batch)
    args["slot_mapping"] = torch.tensor([0, 1, 10**6, 3], dtype=torch.int32)
    with pytest.raises(KvosError) as c_check:
        ops.write_kv(**args)
    num_slots = args["k_cache"].shape[0] * args["k_cache"].shape[1]
    with pytest.raises(KvosError) as torch_check:
        validate.slots_in_range(args["slot_mapping"], num_slots)
    assert c_check.value.reason == torch_check.value.reason


def test_valid_batches_pass_the_torch_checks(batch):
    validate.batch_in_range(batch.page_table, batch.query_start, batch.context_lens, batch.q.shape[0],
                            batch.pool.shape[0], 16)
    validate.frame_lists(idx(1, 2), 8, idx(3, 4), 8, True)
