"""Write a small model as a GGUF file the way llama.cpp's converter does (test fixture).

Q and K rows are permuted for llama.cpp's RoPE (arch "llama" only), some
tensors are stored quantized (Q8_0, F16), the tokenizer goes in as byte-level
BPE metadata. Tests load the result both through kvos and through transformers.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def permute_for_llama_cpp(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest]}"


def write_gguf(path, config, weights: dict, tokenizer, arch: str = "llama", matrix_type=None) -> None:
    """config: a userspace LlamaConfig; weights: HF names -> float32 tensors; tokenizer: a TextTokenizer.
    matrix_type(hf_name) -> a GGMLQuantizationType for that matrix, or None for the default mix."""
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    spec = json.loads(tokenizer.backend.to_str())
    vocab = spec["model"]["vocab"]
    special = {t["content"]: t["id"] for t in spec["added_tokens"] if t["special"]}
    tokens = [None] * config.vocab_size
    for token, index in {**vocab, **special}.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(config.bos_token_id)
    w.add_eos_token_id(config.eos_token_ids[0])
    w.add_add_bos_token(False)
    w.add_chat_template(tokenizer.chat_template)
    for name, tensor in weights.items():
        if arch == "llama" and ".q_proj." in name:
            tensor = permute_for_llama_cpp(tensor, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            tensor = permute_for_llama_cpp(tensor, config.num_key_value_heads)
        data = tensor.float().numpy()
        # Matrices quantized as llama.cpp files have them (Q8_0 projections, F16 MLP); vectors stay F32.
        kind = matrix_type(name) if matrix_type and data.ndim == 2 else None
        if kind is not None:
            w.add_tensor(gguf_name(name), quantize(data, kind), raw_dtype=kind)
        elif data.ndim == 2 and "mlp" in name:
            w.add_tensor(gguf_name(name), data.astype(np.float16))
        elif data.ndim == 2:
            w.add_tensor(gguf_name(name), quantize(data, GGMLQuantizationType.Q8_0),
                         raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
