"""The packed (ragged) batch handed to a program's forward pass.

One flat buffer of the step's new tokens, every process's tokens back to back,
no padding. Built by the kernel from the scheduler's plan; read by programs.
"""
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor       # int64 (num_tokens,): the new tokens of every sequence, packed
    positions: torch.Tensor       # int64 (num_tokens,): absolute position of each token in its sequence
    slot_mapping: torch.Tensor    # int32 (num_tokens,): frame * page_size + offset where its K/V goes
    page_table: torch.Tensor      # int32 (num_seqs, max_pages): frames of each sequence, row padded with 0
    query_start: torch.Tensor     # int32 (num_seqs + 1,): sequence s owns tokens query_start[s]:query_start[s+1]
    context_lens: torch.Tensor    # int32 (num_seqs,): K/V length of each sequence after this step's tokens
    sample_indices: torch.Tensor  # int64 (num_samples,): rows whose logits are returned, in this order
    max_query_len: int = 0        # longest q_len in the batch (1 for a pure decode batch)
    max_context_len: int = 0      # longest context in the batch
    checked: bool = False         # the builder checked the index ranges on the host: the ops need not

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]


@dataclass
class HostBatch:
    """A step's batch as host arrays (numpy), checked: what build_batch copies to the device, and what
    the decode graph runner (kernel/devices/graphs.py) copies into its static buffers instead."""
    token_ids: "np.ndarray"       # int64 (num_tokens,)
    positions: "np.ndarray"       # int64 (num_tokens,)
    slot_mapping: "np.ndarray"    # int32 (num_tokens,)
    page_table: "np.ndarray"      # int32 (num_seqs, max_pages), rows padded with 0
    query_start: "np.ndarray"     # int32 (num_seqs + 1,)
    context_lens: "np.ndarray"    # int32 (num_seqs,)
    sample_indices: "np.ndarray"  # int64 (num_samples,)
    max_query_len: int = 0
    max_context_len: int = 0

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @property
    def pure_decode(self) -> bool:
        """Every sequence brings one new token (no prefill chunk)."""
        return self.max_query_len == 1 and self.token_ids.shape[0] == self.num_seqs


def build_batch(works, wanted, mm, device, null_frame=None):
    """Pack one program's share of a plan into a ForwardBatch; returns (batch, padding tokens).
    host_batch() then to_device(): see them."""
    host, padding = host_batch(works, wanted, mm, null_frame)
    return to_device(host, device), padding


def host_batch(works, wanted, mm, null_frame=None, page_rows=None, extra_rows=()):
    """One program's share of a plan as checked host arrays; returns (HostBatch, padding tokens).

    `works` are kernel.sched.plan.Work items of processes running one program;
    `wanted` the subset whose last token's logits are sampled (in works order).
    With `null_frame` (legacy batch="padded"), every sequence is padded to the
    longest one: the padding rows are real rows of the batch (they cost real
    compute), each a 1-token sequence whose K/V lands in the null frame.
    The index ranges the ops would check on the device (slots, page-table entries, query starts,
    context lengths) are checked here on the host arrays, so the forward passes check=False and
    no op syncs with the host (which a captured CUDA graph forbids); bad indices are still
    KvosError(EINVAL) before anything is written.
    With `page_rows` (kernel/pagerows.py, the kernel's persistent table) and no padding, the page
    table is gathered from its rows, updated by what changed, instead of filled row by row.
    `extra_rows` (rows of the packed tokens: prompt positions to score) follow the wanted rows in
    sample_indices.
    """
    token_ids, positions, slots, query_start, context_lens, rows, sample_indices = pack(works, wanted, mm)
    sample_indices += extra_rows
    padding = 0
    if null_frame is not None and works:
        padding = pad(works, null_frame, token_ids, positions, slots, query_start, context_lens, rows)
    if page_rows is not None and not padding and works:
        table = page_rows.rows_for([w.proc.asid for w in works], rows)
    else:
        max_pages = max(len(r) for r in rows) if rows else 1
        table = np.zeros((len(rows), max_pages), dtype=np.int32)
        for i, r in enumerate(rows):
            table[i, :len(r)] = r
    host = HostBatch(
        token_ids=np.asarray(token_ids, dtype=np.int64), positions=np.asarray(positions, dtype=np.int64),
        slot_mapping=np.asarray(slots, dtype=np.int32), page_table=table,
        query_start=np.asarray(query_start, dtype=np.int32), context_lens=np.asarray(context_lens, dtype=np.int32),
        sample_indices=np.asarray(sample_indices, dtype=np.int64),
        max_query_len=max(w.count for w in works) if works else 0,
        max_context_len=max(context_lens) if context_lens else 0)
    if works:
        host_check(host, mm.frames.num_frames, works[0].proc.tenant.page_size)
    return host, padding


def host_check(host: HostBatch, num_frames: int, page_size: int) -> None:
    """The ops' index checks (kernel/ops/validate.py) on the host arrays: KvosError(EINVAL) with the
    reason the device check would give."""
    from kernel.ops import validate
    validate.host_batch(host.slot_mapping, host.page_table, host.query_start, host.context_lens,
                        num_frames, page_size)


def to_device(host: HostBatch, device) -> ForwardBatch:
    """The checked host arrays as a ForwardBatch on `device` (checked=True: the forward skips the
    ops' device-side index checks)."""
    dev = getattr(device, "torch_device", None) or torch.device("cpu")
    as_tensor = lambda a: torch.from_numpy(a).to(dev, non_blocking=True)  # noqa: E731
    return ForwardBatch(
        token_ids=as_tensor(host.token_ids), positions=as_tensor(host.positions),
        slot_mapping=as_tensor(host.slot_mapping), page_table=as_tensor(host.page_table),
        query_start=as_tensor(host.query_start), context_lens=as_tensor(host.context_lens),
        sample_indices=as_tensor(host.sample_indices), max_query_len=host.max_query_len,
        max_context_len=host.max_context_len, checked=True)


def pack(works, wanted, mm) -> tuple:
    """The ragged batch as lists: (token_ids, positions, slots, query_start, context_lens, page-table
    rows, sample_indices), every work's tokens back to back in works order (ForwardBatch says what
    each holds); a sample index is the row of the last token of a work in `wanted`."""
    # LAB(batch): BEGIN
    token_ids, positions, slots, query_start, context_lens, rows = [], [], [], [0], [], []
    sample_indices = []
    wanted_ids = {id(w) for w in wanted}
    for w in works:
        proc = w.proc
        token_ids += w.input_tokens
        positions += range(w.start, w.end)
        slots += w.slots
        query_start.append(query_start[-1] + w.count)
        context_lens.append(w.end)
        rows.append(mm.space(proc.asid).frames)
        if id(w) in wanted_ids:
            sample_indices.append(query_start[-1] - 1)
    return token_ids, positions, slots, query_start, context_lens, rows, sample_indices
    # LAB(batch): END


def pad(works, null_frame, token_ids, positions, slots, query_start, context_lens, rows) -> int:
    """Legacy batch="padded": append padding rows to the packed lists until every sequence is as long
    as the longest, each a 1-token sequence writing into `null_frame`. Returns the padding tokens."""
    # LAB(batch): BEGIN -> return 0
    longest = max(w.count for w in works)
    padding = longest * len(works) - query_start[-1]
    page_size = works[0].proc.tenant.page_size
    for _ in range(padding):
        token_ids.append(0)
        positions.append(0)
        slots.append(null_frame * page_size)
        query_start.append(query_start[-1] + 1)
        context_lens.append(1)
        rows.append((null_frame,))
    return padding
    # LAB(batch): END
