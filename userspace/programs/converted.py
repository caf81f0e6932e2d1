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

from userspace.programs.cachedir import cache_dir, publish_dir
from userspace.programs.config import LlamaConfig
from userspace.programs.tokenizer import TextTokenizer

FORMAT = 1


def converted_dir(digest: str) -> Path:
    return cache_dir() / "converted" / f"{digest[:32]}-v{FORMAT}"


def load_converted(digest: str):
    """(config, weights, tokenizer) from the cache, or None when absent or unreadable."""
    from safetensors.torch import load_file
    folder = converted_dir(digest)
    try:
        meta = json.loads((folder / "program.json").read_text())
        if meta.get("format") != FORMAT or meta.get("sha256") != digest:
            return None
        config = LlamaConfig.from_dict(meta["config"])
        weights = load_file(folder / "weights.safetensors")
        tokenizer = TextTokenizer.load(folder / "tokenizer.json", meta.get("chat_template"), meta.get("special_tokens"))
    except Exception:       # any damage to the cache (safetensors, json, a KvosError) means: convert again
        return None
    return config, weights, tokenizer


def save_converted(digest: str, config: LlamaConfig, weights: dict, tokenizer: TextTokenizer) -> bool:
    """Write the converted form; False (and nothing left behind) when the cache is not writable."""
    from safetensors.torch import save_file
    final = converted_dir(digest)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: t.contiguous() for k, t in weights.items()}, tmp / "weights.safetensors")
        tokenizer.save(tmp / "tokenizer.json")
        meta = {"format": FORMAT, "sha256": digest, "config": config.to_dict(),
                "chat_template": tokenizer.chat_template, "special_tokens": tokenizer.special_tokens}
        (tmp / "program.json").write_text(json.dumps(meta, indent=1))
        publish_dir(tmp, final)
    except OSError:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True
