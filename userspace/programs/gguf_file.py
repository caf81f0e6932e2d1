"""Reading a GGUF model file: metadata, dequantized weights, tokenizer.

Everything goes through the `gguf` library (GGUFReader for the container,
gguf.quants.dequantize for Q4_0/Q4_1/Q8_0/F16/K-quants). llama.cpp's converter
permutes the rows of the Q and K projections of "llama" models to suit its own
RoPE kernel; read_gguf undoes that, as transformers' GGUF loader does, so the
standard rotate-half RoPE applies. A file that cannot be parsed is EIO; a
well-formed file of a kind we do not run is EINVAL.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kernel.errors import EINVAL, EIO, ENOENT, KvosError
from userspace.programs.config import LlamaConfig
from userspace.programs.tokenizer import TextTokenizer, byte_level_bpe

# Architectures we run, and whether llama.cpp permuted their Q/K rows.
ARCHITECTURES = {"llama": True, "qwen2": False}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")


@dataclass
class GGUFModel:
    config: LlamaConfig
    tensors: dict            # Hugging Face names -> float32 tensors, Q/K already un-permuted
    tokenizer: TextTokenizer
    permuted: bool = False   # raw tensors only: whether the Q/K rows still carry llama.cpp's permutation


def open_gguf(path: Path):
    """A GGUFReader over the file, or KvosError: ENOENT (missing), EIO (not a readable GGUF)."""
    from gguf import GGUFReader
    path = Path(path)
    if not path.is_file():
        raise KvosError(ENOENT, f"{path}: no such model file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise KvosError(EIO, f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = GGUFReader(path)
    except Exception as exc:    # the gguf library raises whatever numpy does on a short or garbled file
        raise KvosError(EIO, f"{path}: corrupt or truncated GGUF file ({type(exc).__name__}: {exc})") from None
    for t in reader.tensors:
        if t.data.nbytes != t.n_bytes:
            raise KvosError(EIO, f"{path}: truncated GGUF file (tensor {t.name} has {t.data.nbytes} "
                                 f"of its {t.n_bytes} bytes)")
    return reader


def read_gguf(path: Path, dequantize: bool = True) -> GGUFModel:
    """The model in the file. dequantize=False leaves `tensors` as the reader's raw tensors under
    Hugging Face names (not permuted; gguf_blocks keeps them quantized)."""
    reader = open_gguf(path)
    meta = _Metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise KvosError(EINVAL, f"{path}: GGUF architecture {arch!r} is not supported "
                                f"(supported: {', '.join(ARCHITECTURES)})")
    tokenizer, vocab_size = _read_tokenizer(meta, path)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    config = _read_config(meta, arch, vocab_size, tie=not has_output,
                          has_bias=any(t.name.endswith("attn_q.bias") for t in reader.tensors))
    if not dequantize:
        return GGUFModel(config, {_hf_name(t.name, path): t for t in reader.tensors}, tokenizer,
                         permuted=ARCHITECTURES[arch])
    tensors = _read_tensors(reader, config, permuted=ARCHITECTURES[arch], path=path)
    return GGUFModel(config, tensors, tokenizer)


def _hf_name(gguf_name: str, path) -> str:
    name = _GLOBAL_NAMES.get(gguf_name)
    if name is None:
        m = _LAYER_TENSOR.fullmatch(gguf_name)
        leaf = _LAYER_NAMES.get(m.group(2)) if m else None
        if leaf is None:
            raise KvosError(EINVAL, f"{path}: unexpected tensor {gguf_name!r} for a LLaMA-family model")
        name = f"model.layers.{m.group(1)}.{leaf}"
    return name


class _Metadata:
    def __init__(self, reader, path):
        self.fields, self.path = reader.fields, path

    def get(self, key, default=KeyError):
        field = self.fields.get(key)
        if field is None:
            if default is KeyError:
                raise KvosError(EINVAL, f"{self.path}: GGUF metadata has no {key!r}")
            return default
        try:
            return field.contents()
        except Exception as exc:
            raise KvosError(EIO, f"{self.path}: corrupt GGUF metadata {key!r} ({exc})") from None


def _read_config(meta: _Metadata, arch: str, vocab_size: int, tie: bool, has_bias: bool) -> LlamaConfig:
    hidden = meta.get(f"{arch}.embedding_length")
    heads = meta.get(f"{arch}.attention.head_count")
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    if not isinstance(heads, int) or not isinstance(kv_heads, int):
        raise KvosError(EINVAL, f"{meta.path}: per-layer head counts are not supported")
    head_dim = meta.get(f"{arch}.attention.key_length", hidden // heads if heads else 0)
    rope_dim = meta.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise KvosError(EINVAL, f"{meta.path}: partial rotary embeddings ({rope_dim} of {head_dim}) "
                                "are not supported")
    scaling = {}
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(meta.get(f"{arch}.rope.scaling.factor"))}
    elif kind != "none":
        raise KvosError(EINVAL, f"{meta.path}: rope scaling {kind!r} is not supported")
    eos = [meta.get(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=meta.get(f"{arch}.feed_forward_length"),
        num_hidden_layers=meta.get(f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=meta.get(f"{arch}.context_length"),
        rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings=tie,
        attention_bias=has_bias,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id", None),
        eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
    )


def _read_tokenizer(meta: _Metadata, path) -> tuple[TextTokenizer, int]:
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise KvosError(EINVAL, f"{path}: GGUF tokenizer {kind!r} is not supported (byte-level BPE, 'gpt2', is); "
                                "use a Hugging Face folder with a tokenizer.json instead")
    tokens = meta.get("tokenizer.ggml.tokens")
    backend = byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges"),
                             meta.get("tokenizer.ggml.token_type", None), meta.get("tokenizer.ggml.pre", None))
    special = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        index = meta.get(f"tokenizer.ggml.{key}_token_id", None)
        if index is not None and 0 <= index < len(tokens):
            special[f"{name}_token"] = tokens[index]
    template = meta.get("tokenizer.chat_template", None)
    return TextTokenizer(backend, template, special), len(tokens)


def _read_tensors(reader, config: LlamaConfig, permuted: bool, path) -> dict:
    from gguf.quants import dequantize
    out = {}
    for t in reader.tensors:
        name = _hf_name(t.name, path)
        try:
            values = dequantize(t.data, t.tensor_type)
        except Exception as exc:
            raise KvosError(EINVAL, f"{path}: cannot dequantize {t.name} ({t.tensor_type.name}: {exc})") from None
        # F32 data come back as read-only views of the memory-mapped file: copy those out.
        if values.dtype != np.float32 or not values.flags.writeable or not values.flags.c_contiguous:
            values = np.array(values, dtype=np.float32, copy=True)
        tensor = torch.from_numpy(values)
        heads = rope_heads(name, config, permuted)
        out[name] = tensor if heads is None else unpermute_rope_rows(tensor, heads)
    return out


def rope_heads(name: str, config: LlamaConfig, permuted: bool) -> int | None:
    """The head count to un-permute a tensor's rows by (Q and K of a permuted file), or None."""
    if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
        return config.num_attention_heads
    if permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
        return config.num_key_value_heads
    return None


def unpermute_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's permute of Q/K rows.

    llama.cpp stores each head's rows as interleaved pairs (x0, x_half, x1, ...),
    which its rope kernel rotates pairwise; HF's rotate-half RoPE wants the two
    halves apart. convert_hf_to_gguf did w.reshape(heads, 2, d/2, ...).swapaxes(1, 2);
    this is its inverse.
    """
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()
