"""The quantized cache: a GGUF's weights as qlinear layers, ready to load in well under a second.

Like converted.py's cache (keyed by the file's sha256 and this format's version), but the folder
quantized/<digest>-v<FORMAT> holds the packed int4 codes, bf16 scales, Q8_0 embedding blocks and
float32 vectors in one weights.safetensors, with program.json saying which layer each name is.
No float32 copy of the matrices is ever written. A missing or damaged folder is rebuilt.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from userspace.programs import qlinear
from userspace.programs.cachedir import cache_dir, publish_dir
from userspace.programs.config import LlamaConfig
from userspace.programs.tokenizer import TextTokenizer

FORMAT = 1


def quantized_dir(digest: str) -> Path:
    return cache_dir() / "quantized" / f"{digest[:32]}-v{FORMAT}"


def _flatten(weights: dict) -> tuple[dict, dict]:
    tensors, kinds = {}, {}
    for name, w in weights.items():
        if isinstance(w, torch.Tensor):
            tensors[name] = w.contiguous()
            continue
        kinds[name] = qlinear.kind_of(w)
        tensors.update({f"{name}:{k}": t.contiguous() for k, t in w.tensors().items()})
        if isinstance(w, qlinear.Q8Table) and w.head is not None:
            kinds[name] = "q8table+head"
            tensors.update({f"{name}:head.{k}": t for k, t in w.head.tensors().items()})
    return tensors, kinds


def _layer(kind: str, t: dict):
    if kind == "int4":
        return qlinear.Int4Linear(t["packed"], t["sz"])
    if kind == "int8":
        return qlinear.Int8Linear(qlinear.Int4Linear(t["hi.packed"], t["hi.sz"]),
                                  qlinear.Int4Linear(t["lo.packed"], t["lo.sz"]))
    if kind == "dense":
        return qlinear.DenseLinear(t["w_t"])
    head = _layer("int8", {k[5:]: v for k, v in t.items() if k.startswith("head.")}) if kind == "q8table+head" else None
    return qlinear.Q8Table(t["q"], t["d"], head)


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
    from safetensors.torch import load_file
    folder = quantized_dir(digest)
    try:
        meta = json.loads((folder / "program.json").read_text())
        if meta.get("format") != FORMAT or meta.get("sha256") != digest:
            return None
        config = LlamaConfig.from_dict(meta["config"])
        weights = _unflatten(load_file(folder / "weights.safetensors"), meta["kinds"])
        tokenizer = TextTokenizer.load(folder / "tokenizer.json", meta.get("chat_template"), meta.get("special_tokens"))
    except Exception:       # any damage to the cache means: convert again
        return None
    return config, weights, tokenizer


def save_quantized(digest: str, config: LlamaConfig, weights: dict, tokenizer: TextTokenizer) -> bool:
    """Write the quantized form; False (and nothing left behind) when the cache is not writable."""
    from safetensors.torch import save_file
    final = quantized_dir(digest)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    tensors, kinds = _flatten(weights)
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(tensors, tmp / "weights.safetensors")
        tokenizer.save(tmp / "tokenizer.json")
        meta = {"format": FORMAT, "sha256": digest, "config": config.to_dict(), "kinds": kinds,
                "chat_template": tokenizer.chat_template, "special_tokens": tokenizer.special_tokens}
        (tmp / "program.json").write_text(json.dumps(meta, indent=1))
        publish_dir(tmp, final)
    except OSError:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True
