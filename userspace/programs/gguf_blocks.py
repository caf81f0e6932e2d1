"""A GGUF's quantized tensors, kept quantized: blocks decoded into codes and scales, fused, repacked.

The canonical weights (names of llama.fuse_hf_weights) are built from the file's raw blocks:
- Q4_0 (d fp16, 16 bytes of nibbles: value d * (q - 8)), Q4_1 (d, m fp16: value d * q + m) and
  Q4_K (per-32 6-bit scales and mins under fp16 d, dmin) -> 4-bit codes with per-32 d and m
  (value d * u + m) -> qlinear.BlockLinear (4-bit);
- Q5_0 (d, 4 bytes of fifth bits, 16 of nibbles: value d * (q - 16)), Q5_1 (d, m: d * q + m) and
  Q5_K (Q4_K's scales and mins, a fifth bit per value) -> 5-bit codes with per-32 d and m, held in
  the 8-bit layout -> qlinear.BlockLinear (8-bit);
- Q8_0 (d fp16, 32 int8: value d * q) -> qlinear.BlockLinear (8-bit codes q + 128, m = -128 d);
- every other quantized type (Q6_K, Q2_K and Q3_K, whose scales are per 16, the i-quants) ->
  dequantized by the gguf library and rounded again to Q8_0 blocks (requantized: the one lossy
  step here, at most half a step of amax / 127 per 32, well under the type's own rounding);
- an embedding in any of these -> qlinear.BlockTable over its BlockLinear (also the head when tied);
- F32/F16/BF16 matrices -> rounded to bf16 panels (qlinear.PanelLinear, ops.panel_mm's bf16 path);
  vectors (norms, biases) -> float32 tensors.
llama.cpp's permutation of the Q/K rows is undone on whole rows (a block never crosses a row),
and q | k | v and gate | up are fused by stacking rows, exactly as the float32 path does; parts of
different block types (Q5_0 q and k with a Q8_0 v, as llama.cpp's _M mixes have) meet in the
8-bit layout, exactly.
"""
from __future__ import annotations

import numpy as np
import torch

from kernel.errors import EINVAL, KvosError
from userspace.programs.config import LlamaConfig
from userspace.programs.gguf_file import rope_heads, unpermute_rope_rows
from userspace.programs.llama import fuse_hf_weights
from userspace.programs.qlinear import GROUP, BlockLinear, BlockTable, PanelLinear

_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "Q4_K": 144, "Q5_K": 176}


def _f16(raw: np.ndarray, offset: int) -> torch.Tensor:
    """The fp16 field at `offset` of every block, as float32 (n, blocks)."""
    field = np.ascontiguousarray(raw[..., offset:offset + 2]).view(np.float16)[..., 0]
    return torch.from_numpy(field.astype(np.float32))


def _nibbles(qs: np.ndarray) -> torch.Tensor:
    """ggml's nibble order: in each block, element j < 16 is the low nibble of byte j, element 16 + j its high one."""
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1)             # (n, blocks, 32)
    return torch.from_numpy(codes.reshape(codes.shape[0], -1).astype(np.int32))


def _fifth_bits(qh: np.ndarray, qs: np.ndarray) -> torch.Tensor:
    """Q5 codes 0..31: ggml's nibble order (_nibbles) plus bit j of the block's 32-bit qh as bit 4 of element j."""
    bits = np.ascontiguousarray(qh).view("<u4")                      # (n, blocks, 1)
    high = ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32) << 4   # (n, blocks, 32)
    return _nibbles(qs) + torch.from_numpy(high.reshape(high.shape[0], -1))


def decode(t) -> tuple:
    """One GGUF tensor (a GGUFReader tensor) -> a part: ("int4", codes, d, m), ("u8", codes, d, m)
    (codes of up to 8 bits, value d * codes + m), ("int8", q, d) or ("float", w float32).
    Matrices are (rows, k); vectors are ("float", v)."""
    kind = t.tensor_type.name
    if kind in _BLOCK_BYTES and len(t.shape) == 2:
        rows = int(t.shape[1])
        raw = np.asarray(t.data).reshape(rows, -1, _BLOCK_BYTES[kind])
        d = _f16(raw, 0)
        if kind == "Q4_0":
            return "int4", _nibbles(raw[..., 2:]), d, -8 * d
        if kind == "Q4_1":
            return "int4", _nibbles(raw[..., 4:]), d, _f16(raw, 2)
        if kind == "Q4_K":
            return _q4_k(raw, d, _f16(raw, 2))
        if kind == "Q5_K":
            return _q5_k(raw, d, _f16(raw, 2))
        if kind == "Q5_0":
            return "u8", _fifth_bits(raw[..., 2:6], raw[..., 6:]), d, -16 * d
        if kind == "Q5_1":
            return "u8", _fifth_bits(raw[..., 4:8], raw[..., 8:]), d, _f16(raw, 2)
        q = torch.from_numpy(np.ascontiguousarray(raw[..., 2:]).view(np.int8).reshape(rows, -1).copy())
        return "int8", q, d
    from gguf import GGML_QUANT_SIZES  # the gguf library: only for types decoded here by it
    from gguf.quants import dequantize
    try:
        values = dequantize(t.data, t.tensor_type)
    except Exception as exc:
        raise KvosError(EINVAL, f"cannot dequantize {t.name} ({kind}: {exc})") from None
    values = torch.from_numpy(np.array(values, dtype=np.float32, copy=True))
    if GGML_QUANT_SIZES[t.tensor_type][0] > 1 and values.dim() == 2 and values.shape[1] % GROUP == 0:
        return requantized_q8_0(values)             # a quantized type the layout cannot hold as it is
    return "float", values


def requantized_q8_0(w: torch.Tensor) -> tuple:
    """("int8", q, d): w (rows, k) rounded to Q8_0 blocks: per 32, d = amax / 127 as an fp16 (the
    next one up when rounding went down, so no code passes 127), q = round(w / d). Each value moves
    by at most d / 2: for Q6_K, about a quarter of its own worst rounding (d * sc / 2 per 16)."""
    blocks = w.reshape(w.shape[0], -1, GROUP)
    amax = blocks.abs().amax(-1)
    d = (amax / 127).half()
    d = torch.where(d.float() * 127 < amax, torch.nextafter(d, torch.full_like(d, float("inf"))), d).float()
    q = (blocks / d.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).round().clamp_(-127, 127)
    return "int8", q.to(torch.int8).reshape(w.shape), d


def _k_scales_mins(raw: np.ndarray) -> tuple:
    """Q4_K's and Q5_K's 12 bytes after d and dmin: eight 6-bit scales and eight 6-bit mins, one
    pair a sub-block of 32, each (rows, super-blocks, 8) int32."""
    packed = raw[..., 4:16].astype(np.int32)
    lo, hi = packed[..., :4], packed[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=-1)
    m = np.concatenate([packed[..., 4:8] & 63, (hi >> 4) | ((packed[..., 4:8] >> 6) << 4)], axis=-1)
    return sc, m


def _k_part(codes: np.ndarray, d: torch.Tensor, dmin: torch.Tensor, sc: np.ndarray, m: np.ndarray, kind: str):
    """Per 32, d' = d * sc and m' = -dmin * m (products of fp16 and 6-bit ints, rounded to fp16 when packed)."""
    rows = codes.shape[0]
    scale = (d[..., None] * torch.from_numpy(sc).float()).reshape(rows, -1)
    mins = (dmin[..., None] * torch.from_numpy(m).float()).reshape(rows, -1)
    return kind, torch.from_numpy(codes.reshape(rows, -1).astype(np.int32)), scale, -mins


def _q4_k(raw: np.ndarray, d: torch.Tensor, dmin: torch.Tensor) -> tuple:
    """Q4_K super-blocks of 256: eight sub-blocks of 32 with 6-bit scale sc and min m each, value
    d * sc * q - dmin * m; the 128 bytes of nibbles are four chunks of 64 values (low nibbles, then high)."""
    sc, m = _k_scales_mins(raw)
    qs = raw[..., 16:].reshape(*raw.shape[:2], 4, 32)
    return _k_part(np.stack([qs & 15, qs >> 4], axis=3), d, dmin, sc, m, "int4")


def _q5_k(raw: np.ndarray, d: torch.Tensor, dmin: torch.Tensor) -> tuple:
    """Q5_K super-blocks of 256: Q4_K's scales and mins, then 32 bytes qh and Q4_K's 128 bytes of nibbles;
    value j of the sub-block 2c + h (chunk c, low or high nibble h) has bit 2c + h of qh[j] as its fifth."""
    sc, m = _k_scales_mins(raw)
    qh = raw[..., 16:48][:, :, None, None, :]                       # (rows, blocks, 1, 1, 32)
    qs = raw[..., 48:].reshape(*raw.shape[:2], 4, 32)
    low = np.stack([qs & 15, qs >> 4], axis=3)                       # (rows, blocks, 4, 2, 32)
    shift = (2 * np.arange(4)[:, None] + np.arange(2)[None, :])[None, None, :, :, None]
    return _k_part(low + (((qh >> shift) & 1) << 4), d, dmin, sc, m, "u8")


def permute_rows(part: tuple, num_heads: int) -> tuple:
    """Undo llama.cpp's Q/K row permutation on every per-row tensor of a part."""
    return (part[0], *(unpermute_rope_rows(t, num_heads) for t in part[1:]))


def dequantize_part(part: tuple) -> torch.Tensor:
    """The float32 values of a part (the fp16 scales exactly as stored; no bf16 rounding)."""
    if part[0] in ("int4", "u8"):
        _, codes, d, m = part
        return codes.float() * d.repeat_interleave(GROUP, 1) + m.repeat_interleave(GROUP, 1)
    if part[0] == "int8":
        _, q, d = part
        return q.float() * d.repeat_interleave(GROUP, 1)
    return part[1]


def _as_u8(part: tuple) -> tuple:
    """A block part in the 8-bit layout's terms (codes up to 8 bits, value d * codes + m): the same values."""
    if part[0] == "int8":
        _, q, d = part
        return "u8", q.to(torch.int32) + 128, d, -128 * d
    return ("u8", *part[1:])


def _fuse(parts: list) -> tuple:
    """Stack parts by rows; block parts of different kinds meet in the 8-bit layout, any with a float
    part as float32."""
    kinds = {p[0] for p in parts}
    if len(kinds) > 1 and "float" not in kinds:
        parts, kinds = [_as_u8(p) for p in parts], {"u8"}
    if len(kinds) == 1:
        return (parts[0][0], *(torch.cat(ts) for ts in zip(*(p[1:] for p in parts))))
    return ("float", torch.cat([dequantize_part(p) for p in parts]))


def linear(part: tuple):
    """The qlinear layer for a matrix part: a BlockLinear for block parts (any rows; k is a multiple
    of 32, the block size), else bf16 panels."""
    if part[0] == "float":
        return PanelLinear.from_float(part[1], torch.bfloat16)
    if part[0] == "int8":
        part = _as_u8(part)
    _, codes, d, m = part
    return BlockLinear.from_blocks(codes, d, m, 4 if part[0] == "int4" else 8)


def canonical(config: LlamaConfig, raw: dict, permuted: bool) -> dict:
    """Canonical weights from raw GGUF tensors under Hugging Face names (gguf_file.raw_tensors):
    llama.fuse_hf_weights's names and fusing, with parts decoded as they are taken."""
    parts = _Decoded(raw, config, permuted)

    def embed(part):        # blocks stay blocks (and are the head when tied); a float table stays float32
        if part[0] == "float":
            return part[1]
        return BlockTable(linear(part), config.tie_word_embeddings)

    return fuse_hf_weights(config, parts, matrix=lambda ps: linear(ps[0] if len(ps) == 1 else _fuse(ps)),
                           vector=dequantize_part, embed=embed)


class _Decoded:
    """The raw tensors as parts, decoded (and their Q/K rows un-permuted) when taken."""

    def __init__(self, raw: dict, config: LlamaConfig, permuted: bool):
        self.raw, self.config, self.permuted = raw, config, permuted

    def __contains__(self, name) -> bool:
        return name in self.raw

    def __getitem__(self, name) -> tuple:
        part = decode(self.raw[name])
        heads = rope_heads(name, self.config, self.permuted)
        return part if heads is None else permute_rows(part, heads)
