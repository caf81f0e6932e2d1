"""A minimal driver that runs a few sequences through a program on a real frame pool.

Tests only, and deliberately not a scheduler: the caller says which tokens of
which sequence go into each step. Frames come from a shuffled free list, so
page tables are scattered as they are under the real allocator; fork() shares
a parent's full prefix pages the way the page cache and copy-on-write do.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from kernel.batch import ForwardBatch
from kernel.devices.torchdev import TorchDevice


@dataclass
class Seq:
    frames: list = field(default_factory=list)   # page table: virtual page -> frame
    length: int = 0                              # tokens whose K/V are in the cache


class PagedRunner:
    def __init__(self, program, num_frames: int = 256, page_size: int = 16, seed: int = 0, device: str = "cpu"):
        self.program = program
        self.device = TorchDevice(device)
        self.device.create_pool(num_frames, program.kv_shape.bytes_per_token * page_size)
        self.kv = self.device.kv_view(program.kv_shape)
        self.page_size = self.kv.page_size
        self.free = list(range(num_frames))
        random.Random(seed).shuffle(self.free)

    def new_seq(self) -> Seq:
        return Seq()

    def fork(self, parent: Seq, num_tokens: int) -> Seq:
        """A child sharing the parent's full pages among its first num_tokens; it resumes after them."""
        pages = num_tokens // self.page_size
        return Seq(frames=list(parent.frames[:pages]), length=pages * self.page_size)

    def step(self, work: list, sample_all: bool = False) -> torch.Tensor:
        """One forward pass over [(seq, new token ids), ...]; logits of each seq's last token (or of all)."""
        dev = self.device.torch_device
        ps = self.page_size
        tokens, positions, slots, starts, lens, samples = [], [], [], [0], [], []
        for seq, new in work:
            end = seq.length + len(new)
            while len(seq.frames) * ps < end:
                seq.frames.append(self.free.pop())
            for pos in range(seq.length, end):
                positions.append(pos)
                slots.append(seq.frames[pos // ps] * ps + pos % ps)
            tokens.extend(new)
            starts.append(starts[-1] + len(new))
            lens.append(end)
            samples.extend(range(starts[-2], starts[-1]) if sample_all else [starts[-1] - 1])
            seq.length = end
        max_pages = max(len(seq.frames) for seq, _ in work)
        table = [seq.frames + [0] * (max_pages - len(seq.frames)) for seq, _ in work]
        batch = ForwardBatch(
            token_ids=torch.tensor(tokens, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int32, device=dev),
            page_table=torch.tensor(table, dtype=torch.int32, device=dev),
            query_start=torch.tensor(starts, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            sample_indices=torch.tensor(samples, dtype=torch.int64, device=dev),
            max_query_len=max(len(new) for _, new in work),
            max_context_len=max(lens),
        )
        return self.program.forward(batch, self.kv)

    def prefill(self, seq: Seq, tokens: list, chunk: int | None = None) -> torch.Tensor:
        """Feed tokens in chunks; logits of every position, stacked (positions, vocab)."""
        chunk = chunk or len(tokens)
        out = [self.step([(seq, tokens[i:i + chunk])], sample_all=True) for i in range(0, len(tokens), chunk)]
        return torch.cat(out)

    def greedy(self, prompts: list, num_new: int, chunk: int | None = None, stop_ids=()):
        """Greedy continuation of several prompts run side by side in shared steps.

        Each step packs the next prefill chunk of every prompt still being read
        and the last token of every sequence already decoding. A sequence ends
        after num_new tokens or on a token of stop_ids (kept, as HF's generate
        does). Returns (new token ids per prompt, logits per prompt (steps, vocab)).
        """
        n = len(prompts)
        seqs = [self.new_seq() for _ in range(n)]
        fed, outs, logits, done = [0] * n, [[] for _ in range(n)], [[] for _ in range(n)], [False] * n
        while not all(done):
            work, who = [], []
            for i in range(n):
                if done[i]:
                    continue
                if fed[i] < len(prompts[i]):
                    piece = prompts[i][fed[i]:fed[i] + (chunk or len(prompts[i]))]
                    fed[i] += len(piece)
                else:
                    piece = [outs[i][-1]]
                work.append((seqs[i], piece))
                who.append(i)
            rows = self.step(work)
            for row, i in zip(rows, who):
                if fed[i] < len(prompts[i]):
                    continue            # mid-prompt: this row's logits are not sampled
                logits[i].append(row)
                outs[i].append(int(row.argmax()))
                done[i] = len(outs[i]) == num_new or outs[i][-1] in stop_ids
        return outs, [torch.stack(rows) for rows in logits]
