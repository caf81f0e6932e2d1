"""The converted cache: a model file turned into what LlamaProgram loads directly.

Keyed by the source file's sha256 and this format's version, a folder under
<cache>/converted holds weights.safetensors (fused, un-permuted, float32),
tokenizer.json and program.json (config, chat template, special tokens).
Converting a GGUF costs seconds; reading this back costs a fraction of one.
A missing, partial or stale folder is simply rebuilt.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from kernel.ops import hugepages
from userspace.programs.cachedir import cache_dir, publish_dir
from userspace.programs.config import LlamaConfig
from userspace.programs.tokenizer import TextTokenizer

FORMAT = 1


def converted_dir(digest: str) -> Path:
    return cache_dir() / "converted" / f"{digest[:32]}-v{FORMAT}"


def load_converted(digest: str):
    """(config, weights, tokenizer) from the cache, or None when absent or unreadable."""
    found = read_program(converted_dir(digest), digest, FORMAT)
    return None if found is None else found[:3]


def save_converted(digest: str, config: LlamaConfig, weights: dict, tokenizer: TextTokenizer) -> bool:
    """Write the converted form; False (and nothing left behind) when the cache is not writable."""
    return write_program(converted_dir(digest), digest, FORMAT, config, weights, tokenizer)


# -- one cached program folder (this cache's and qcache.py's) ---------------------------------------------------
def read_program(folder: Path, digest: str, fmt: int, huge_pages: bool = False):
    """(config, tensors, tokenizer, meta) of a program folder, or None when absent, stale or damaged.
    huge_pages: the tensors in 2 MiB pages where the system has them (read_tensors)."""
    try:
        meta = json.loads((folder / "program.json").read_text())
        if meta.get("format") != fmt or meta.get("sha256") != digest:
            return None
        config = LlamaConfig.from_dict(meta["config"])
        tensors = read_tensors(folder / "weights.safetensors", huge_pages)
        tokenizer = TextTokenizer.load(folder / "tokenizer.json", meta.get("chat_template"), meta.get("special_tokens"))
    except Exception:       # any damage to the cache (safetensors, json, a KvosError) means: convert again
        return None
    return config, tensors, tokenizer, meta


def read_tensors(path: Path, huge_pages: bool) -> dict:
    """A safetensors file's tensors: mapped from the file, or with huge_pages read one at a time into a
    huge-page arena (kernel/ops/hugepages.py) where the system grants one, so the load never holds
    more than one copy of the weights and a tensor."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if huge_pages:
        with safe_open(path, framework="pt", backend="pread") as f:
            keys = f.keys()
            arena = hugepages.arena(path.stat().st_size + hugepages.ALIGN * len(keys))
            if arena is not None:
                return {key: arena.take(f.get_tensor(key)) for key in keys}
    return load_file(path)


def write_program(final: Path, digest: str, fmt: int, config: LlamaConfig, tensors: dict, tokenizer: TextTokenizer,
                  **meta) -> bool:
    """Write a program folder in one rename (extra `meta` goes into program.json); False, and nothing
    left behind, when the cache is not writable."""
    from safetensors.torch import save_file
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: t.contiguous() for k, t in tensors.items()}, tmp / "weights.safetensors")
        tokenizer.save(tmp / "tokenizer.json")
        meta = {"format": fmt, "sha256": digest, "config": config.to_dict(), **meta,
                "chat_template": tokenizer.chat_template, "special_tokens": tokenizer.special_tokens}
        (tmp / "program.json").write_text(json.dumps(meta, indent=1))
        publish_dir(tmp, final)
    except OSError:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True
