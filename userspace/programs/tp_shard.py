"""Tensor-parallel sharding of a LLaMA program's weights, and the three places its forward talks.

With t ranks, rank r keeps (Megatron's layout, as vLLM and nano-vllm use it):
  - qkv      column-parallel by heads: its nq/t query heads, nkv/t KV heads (rows of q | k | v);
  - o        row-parallel: the columns of its query heads; partial outputs summed by all_reduce;
  - gate_up  column-parallel by halves: rows r of the gate half and r of the up half;
  - down     row-parallel: its columns of the intermediate size; all_reduce;
  - embed    vocabulary-parallel: ceil(V/t) rows (the last rank padded with zeros); a token outside
             a rank's rows looks up zeros there, and all_reduce sums the one real row;
  - lm_head  vocabulary-parallel: its ceil(V/t) rows; all_gather joins the logits, cut back to V;
  - norms, biases of o (added once, after the sum) and the RoPE tables: whole on every rank.
Each rank's KV cache then holds nkv/t heads: its frames are 1/t of a whole frame's bytes.

The group object (`tp`, kernel/devices/tp.py's TPGroup, reached through the device the loader is
given) offers rank, size, all_reduce and all_gather; nothing here imports the kernel's internals.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from kernel.errors import EINVAL, KvosError


def check_divisible(config, size: int) -> None:
    """EINVAL, with every reason, when the model cannot be split over `size` ranks."""
    reasons = []
    if config.num_attention_heads % size:
        reasons.append(f"{config.num_attention_heads} query heads")
    if config.num_key_value_heads % size:
        reasons.append(f"{config.num_key_value_heads} KV heads")
    if config.intermediate_size % size:
        reasons.append(f"an intermediate size of {config.intermediate_size}")
    if reasons:
        raise KvosError(EINVAL, f"tensor parallel {size}: the model has {' and '.join(reasons)}, "
                                f"which do not divide by {size}")
    if getattr(config, "num_experts", 1) > 1:
        raise KvosError(EINVAL, f"tensor parallel {size}: mixture-of-experts models are not sharded yet")


def local_config(config, size: int):
    """The per-rank shapes: heads and the intermediate size divided by `size`."""
    check_divisible(config, size)
    return replace(config, num_attention_heads=config.num_attention_heads // size,
                   num_key_value_heads=config.num_key_value_heads // size,
                   intermediate_size=config.intermediate_size // size)


def vocab_rows(vocab_size: int, size: int) -> int:
    return -(-vocab_size // size)


def _rank_rows(config, rank: int, size: int) -> tuple:
    """Rank `rank`'s rows of the q heads, of the KV heads and of the intermediate size (slices)."""
    d = config.head_dim
    nq, nkv, inter = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    return (slice(rank * nq // size * d, (rank + 1) * nq // size * d),
            slice(rank * nkv // size * d, (rank + 1) * nkv // size * d),
            slice(rank * inter // size, (rank + 1) * inter // size))


def shard_weights(config, weights: dict, rank: int, size: int) -> dict:
    """Rank `rank`'s slice of the canonical (fused) weights (userspace/programs/llama.py's names)."""
    q_rows, kv_rows, i_rows = _rank_rows(config, rank, size)
    inter = config.intermediate_size
    q_size, kv_size = config.q_size, config.kv_size
    out = {}
    for name, w in weights.items():
        part = name.rsplit(".", 1)[-1]
        if part in ("qkv", "qkv_bias"):
            q, k, v = w[:q_size], w[q_size:q_size + kv_size], w[q_size + kv_size:]
            out[name] = torch.cat([q[q_rows], k[kv_rows], v[kv_rows]]).contiguous()
        elif part == "o":
            out[name] = w[:, q_rows].contiguous()
        elif part == "gate_up":
            out[name] = torch.cat([w[:inter][i_rows], w[inter:][i_rows]]).contiguous()
        elif part == "down":
            out[name] = w[:, i_rows].contiguous()
        elif name in ("embed", "lm_head"):
            out[name] = _vocab_slice(w, rank, size)
        else:
            out[name] = w                      # norms, o_bias, freq_factors: whole on every rank
    return out                                 # a tied head is the embedding's slice, as on one rank


def lora_piece(config, slot: str, index: int, a: torch.Tensor, b: torch.Tensor, rank: int, size: int) -> tuple:
    """Rank `rank`'s share of a LoRA delta on part `index` of the fused projection `slot` (lora.py's
    TARGETS): (start of its columns in the rank's slot, A (r, rank's inputs), B (rank's columns, r)).
    Column-parallel slots keep A whole and the rows of B for the rank's columns; row-parallel ones
    (o, down) the columns of A for the rank's inputs and B whole, so each rank's delta is a partial
    sum that the projection's all-reduce adds up with the rank's partial product."""
    q_rows, kv_rows, i_rows = _rank_rows(config, rank, size)
    if slot == "qkv_t":
        q_local, kv_local = q_rows.stop - q_rows.start, kv_rows.stop - kv_rows.start
        return [0, q_local, q_local + kv_local][index], a, b[(q_rows, kv_rows, kv_rows)[index]]
    if slot == "gate_up_t":
        return index * (i_rows.stop - i_rows.start), a, b[i_rows]
    return 0, a[:, q_rows if slot == "o_t" else i_rows], b      # o_t, down_t


def _vocab_slice(w: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    rows = vocab_rows(w.shape[0], size)
    part = w[rank * rows:(rank + 1) * rows]
    if part.shape[0] < rows:                   # the last rank's padding: zero rows, never the max logit
        part = torch.cat([part, part.new_zeros(rows - part.shape[0], w.shape[1])])
    return part.contiguous()


def embed(tp, token_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Vocabulary-parallel lookup: this rank's rows, zeros for the others' tokens, summed."""
    rows = table.shape[0]
    local = token_ids - tp.rank * rows
    mine = (local >= 0) & (local < rows)
    x = F.embedding(local.clamp(0, rows - 1), table) * mine.unsqueeze(1).to(table.dtype)
    return tp.all_reduce(x)


def row_add(tp, x: torch.Tensor, a: torch.Tensor, w) -> None:
    """x += (a @ w) summed over ranks (a row-parallel projection into the residual stream); w a tensor, or
    a LoraLinear whose deltas are partial sums too (lora_piece)."""
    partial = torch.mm(a.to(w.dtype), w) if isinstance(w, torch.Tensor) else w.mm(a)
    x.add_(tp.all_reduce(partial.to(x.dtype)))


def lm_head(tp, x: torch.Tensor, head: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Vocabulary-parallel logits: each rank's columns, gathered, cut to the real vocabulary."""
    return tp.all_gather(F.linear(x.to(head.dtype), head).float())[:, :vocab_size]
