"""A Hugging Face hub cache built by hand in a temporary folder (the machine that runs the tests
cannot reach the hub): the layout huggingface_hub writes, checked with its own scan_cache_dir.

    models--ORG--NAME/blobs/<sha256>                 the files' bytes, named by content
    models--ORG--NAME/snapshots/<commit>/<file>      relative symlinks to the blobs
    models--ORG--NAME/refs/<revision>                the commit a branch or tag points at
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tests.helpers.hf_reference import hf_config_dict


def put(cache: Path, repo_id: str, files: dict, revision: str = "main", commit: str | None = None) -> Path:
    """Store files ({name in the repo: local path}) as one commit of repo_id; point `revision` at it.
    -> the snapshot folder"""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repr(sorted((k, str(v)) for k, v in files.items())).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        data = Path(source).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def check(cache: Path, repo_id: str) -> set:
    """The revisions' commits huggingface_hub sees for repo_id (its scan raises on a broken layout)."""
    from huggingface_hub import scan_cache_dir
    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    (repo,) = [r for r in info.repos if r.repo_id == repo_id]
    return {rev.commit_hash for rev in repo.revisions}


def write_tiny_folder(folder: Path, config=None, seed: int = 0) -> Path:
    """tiny-llama as a Hugging Face folder, written without transformers: config.json,
    model.safetensors, tokenizer.json, tokenizer_config.json."""
    from safetensors.torch import save_file

    from userspace.programs import tiny
    config = config or tiny.TINY_CONFIG
    folder.mkdir(parents=True, exist_ok=True)
    hf = {**hf_config_dict(config), "architectures": ["LlamaForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(hf))
    save_file({k: v.contiguous() for k, v in tiny.tiny_weights(config, seed=seed).items()},
              str(folder / "model.safetensors"))
    tokenizer = tiny.tiny_tokenizer()
    tokenizer.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tokenizer.chat_template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    return folder
