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
