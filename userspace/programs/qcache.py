"""The quantized cache: a GGUF's weights as qlinear layers, ready to load in well under a second.

Like converted.py's cache (keyed by the file's sha256 and this format's version, written and read
by its write_program and read_program), but the folder
quantized/<digest>-v<FORMAT> holds the packed blocks (qmm's and the int4 op's; an embedding's once, also
when it is the head), bf16 panels of float matrices and float32 vectors in one weights.safetensors, with
program.json saying which layer each name is.
No float32 copy of the matrices is ever written. A missing or damaged folder is rebuilt.
"""
from __future__ import annotations

from pathlib import Path

import torch

from userspace.programs import qlinear
from userspace.programs.cachedir import cache_dir
from userspace.programs.config import LlamaConfig
from userspace.programs.converted import read_program, write_program
from userspace.programs.tokenizer import TextTokenizer

FORMAT = 5       # 2: BlockLinear (ops.qmm's packed blocks beside the int4 op's form); 3: qmm tiles of 16 columns;
#                  4: a tied Q8_0 embedding without its own q and d (its rows come from the head's blocks);
#                  5: Q5_K and mixed-type fused parts as blocks, other quantized types requantized to Q8_0,
#                     float matrices in bf16 panels, every block embedding a BlockTable


def quantized_dir(digest: str) -> Path:
    return cache_dir() / "quantized" / f"{digest[:32]}-v{FORMAT}"


def _flatten(weights: dict) -> tuple[dict, dict]:
    tensors, kinds = {}, {}
    for name, w in weights.items():
        if isinstance(w, torch.Tensor):
            tensors[name] = w.contiguous()
            continue
        kinds[name] = _kind(w)
        tensors.update({f"{name}:{k}": t.contiguous() for k, t in w.tensors().items()})
    return tensors, kinds


def _kind(w) -> str:
    """A layer's kind; a BlockLinear's says its bits, shape and wide form (block4:n:k+int4), a
    PanelLinear's its shape (panel:n:k; the dtype is the tensor's)."""
    if isinstance(w, qlinear.BlockLinear):
        wide = "" if w.wide is None else "+" + qlinear.kind_of(w.wide)
        return f"block{w.bits}:{w.shape[0]}:{w.shape[1]}{wide}"
    if isinstance(w, qlinear.PanelLinear):
        return f"panel:{w.shape[0]}:{w.shape[1]}"
    if isinstance(w, qlinear.BlockTable):
        return f"table{'+tied' if w.tied else ''}:{_kind(w.blocks)}"
    return qlinear.kind_of(w)


def _sub(t: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}


def _layer(kind: str, t: dict):
    if kind.startswith("block"):
        spec, _, wide = kind.partition("+")
        bits, n, k = (int(v) for v in spec[5:].split(":"))
        return qlinear.BlockLinear(t["packed"], bits, (n, k), _layer(wide, _sub(t, "wide.")) if wide else None)
    if kind == "int4":
        return qlinear.Int4Linear(t["packed"], t["sz"])
    if kind == "int8":
        return qlinear.Int8Linear(qlinear.Int4Linear(t["hi.packed"], t["hi.sz"]),
                                  qlinear.Int4Linear(t["lo.packed"], t["lo.sz"]))
    if kind.startswith("panel:"):
        n, k = (int(v) for v in kind[6:].split(":"))
        return qlinear.PanelLinear(t["packed"], n, k)
    if kind.startswith("table"):
        spec, _, blocks = kind.partition(":")
        return qlinear.BlockTable(_layer(blocks, _sub(t, "blocks.")), tied=spec == "table+tied")
    raise ValueError(f"unknown layer kind {kind!r}")


def _unflatten(tensors: dict, kinds: dict) -> dict:
    grouped: dict = {}
    out = {}
    for key, t in tensors.items():
        name, _, leaf = key.partition(":")
        if leaf:
            grouped.setdefault(name, {})[leaf] = t
        else:
            out[name] = t
    for name, kind in kinds.items():
        out[name] = _layer(kind, grouped[name])
    return out


def load_quantized(digest: str):
    """(config, weights, tokenizer) from the cache, or None when absent or unreadable."""
    # the blocks in 2 MiB pages: a step streams them all from the last-level cache, where 4 KiB pages'
    # TLB misses cost a tenth of a one-row step (docs/performance.md section 22)
    found = read_program(quantized_dir(digest), digest, FORMAT, huge_pages=True)
    if found is None:
        return None
    config, tensors, tokenizer, meta = found
    try:
        weights = _unflatten(tensors, meta["kinds"])
    except Exception:       # a damaged layer list means: convert again
        return None
    return config, weights, tokenizer


def save_quantized(digest: str, config: LlamaConfig, weights: dict, tokenizer: TextTokenizer) -> bool:
    """Write the quantized form; False (and nothing left behind) when the cache is not writable."""
    tensors, kinds = _flatten(weights)
    return write_program(quantized_dir(digest), digest, FORMAT, config, tensors, tokenizer, kinds=kinds)
