"""Reading a Hugging Face model folder: config.json (for LLaMA programs and simulated ones alike),
*.safetensors, tokenizer.json. The weights are read with the `safetensors` library under their HF
names; the chat template comes from tokenizer_config.json or chat_template.jinja, the stop ids
from generation_config.json when it has them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from kernel.errors import EINVAL, EIO, ENOENT, KvosError
from userspace.programs.cachedir import file_digest
from userspace.programs.config import LlamaConfig, check_runnable_hf
from userspace.programs.tokenizer import TextTokenizer


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _read_json(path: Path, required: bool = True):
    if not path.is_file():
        if required:
            raise KvosError(ENOENT, f"{path}: no such file")
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KvosError(EIO, f"{path}: not readable JSON ({exc})") from None


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise KvosError(ENOENT, f"{folder}: no *.safetensors weights (only safetensors folders load)")
    return files


def folder_digest(folder: Path) -> str:
    """sha256 over every file a program is built from (configs, tokenizer, chat template, weights):
    names the folder's contents, so an edited stop id or template is another program."""
    h = hashlib.sha256(b"hf-folder\0")
    meta = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    for path in [*(folder / name for name in meta), *weight_files(folder)]:
        if path.is_file():
            h.update(path.name.encode() + b"\0" + file_digest(path).encode())
    return h.hexdigest()


def read_config(path: Path, runnable: bool = True) -> LlamaConfig:
    """The model's LlamaConfig from a folder's config.json (or a config.json path), with the stop ids
    of generation_config.json beside it when that file names some.

    runnable: also refuse what the LLaMA forward pass does not compute (model types, sliding
    windows, mixtures of experts...); the simulated device reads any LLaMA-shaped decoder.
    """
    path = Path(path).expanduser()
    folder, config_json = (path, path / "config.json") if path.is_dir() else (path.parent, path)
    hf = _read_json(config_json)
    # A stray foo.json is a config of its own; only a config.json's neighbour belongs to it.
    gen = _read_json(folder / "generation_config.json", required=False) if config_json.name == "config.json" else {}
    eos = gen.get("eos_token_id") if isinstance(gen, dict) else None
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,) if isinstance(eos, int) else ()
    if runnable:
        check_runnable_hf(hf)
    config = LlamaConfig.from_hf(hf, eos_ids)
    if runnable:
        config.check_runnable()
    return config


def read_weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    tensors = {}
    for path in weight_files(folder):
        try:
            tensors.update(load_file(path))
        except Exception as exc:    # safetensors raises its own error type on a damaged file
            raise KvosError(EIO, f"{path}: corrupt safetensors file ({exc})") from None
    return tensors


def read_tokenizer(folder: Path) -> TextTokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise KvosError(ENOENT, f"{folder}: no tokenizer.json")
    cfg = _read_json(folder / "tokenizer_config.json", required=False)
    template = cfg.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if isinstance(template, list):     # named templates: use the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise KvosError(EINVAL, f"{folder}: chat_template is not a string")
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = cfg.get(name)
        if isinstance(value, dict):    # serialized AddedToken
            value = value.get("content")
        if isinstance(value, str):
            special[name] = value
    return TextTokenizer.load(path, template, special)
