"""The packed (ragged) batch handed to a program's forward pass.

One flat buffer of the step's new tokens, every process's tokens back to back,
no padding. Built by the kernel from the scheduler's plan; read by programs.
"""
from dataclasses import dataclass

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

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]


def build_batch(works, wanted, mm, device, null_frame=None):
    """Pack one program's share of a plan into a ForwardBatch; returns (batch, padding tokens).

    `works` are kernel.sched.plan.Work items of processes running one program;
    `wanted` the subset whose last token's logits are sampled (in works order).
    With `null_frame` (legacy batch="padded"), every sequence is padded to the
    longest one: the padding rows are real rows of the batch (they cost real
    compute), each a 1-token sequence whose K/V lands in the null frame.
    """
    import numpy as np

    token_ids, positions, slots, query_start, context_lens, rows, sample_indices = pack(works, wanted, mm)
    padding = 0
    if null_frame is not None and works:
        padding = pad(works, null_frame, token_ids, positions, slots, query_start, context_lens, rows)
    max_pages = max(len(r) for r in rows)
    table = np.zeros((len(rows), max_pages), dtype=np.int32)
    for i, r in enumerate(rows):
        table[i, :len(r)] = r
    dev = getattr(device, "torch_device", None) or torch.device("cpu")
    as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)  # noqa: E731
    batch = ForwardBatch(
        token_ids=as_tensor(token_ids, torch.int64),
        positions=as_tensor(positions, torch.int64),
        slot_mapping=as_tensor(slots, torch.int32),
        page_table=torch.from_numpy(table).to(dev, non_blocking=True),
        query_start=as_tensor(query_start, torch.int32),
        context_lens=as_tensor(context_lens, torch.int32),
        sample_indices=as_tensor(sample_indices, torch.int64),
        max_query_len=max(w.count for w in works) if works else 0,
        max_context_len=max(context_lens) if context_lens else 0,
    )
    return batch, padding


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
        token_ids += proc.tokens[w.start:w.end]
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
