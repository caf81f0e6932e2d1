"""tiny-llama: a built-in LLaMA-shaped program with small seeded random weights.

It needs no download and loads in milliseconds, for fast tests and examples.
Same seed, same weights, same tokenizer: a byte-level BPE trained by the
`tokenizers` library on the fixed text below, padded with reserved special
tokens to a 512-token vocabulary (ids 0-2 are <|endoftext|>, <|im_start|>,
<|im_end|>, as in SmolLM2).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from userspace.programs.config import LlamaConfig
from userspace.programs.tokenizer import TextTokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

TINY_CONFIG = LlamaConfig(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,),
)

_CORPUS = """\
kvos is an operating system for LLM inference. The accelerator is the machine, the KV cache is its
memory, one forward pass is its time slice, and every request is a process. A page holds sixteen
tokens; its storage is a frame. The page table maps virtual page numbers to frames, and the frame
allocator keeps a free list with reference counts. Full pages are named by their content and kept in
the page cache while memory allows. Fork shares every page copy-on-write; swap moves pages to the host.
The scheduler runs decodes first, then prefill chunks of waiting processes until the budget is spent.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris is.
Once upon a time there was a little fox who lived in the forest with her mother and three brothers.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024. Unicode: héllo wörld, naïve café, 你好, こんにちは, 🙂.
def main(): return sum(x * x for x in range(10)) if True else None  # code too
"""


def tiny_config(**overrides) -> LlamaConfig:
    """TINY_CONFIG with some fields changed (tests build variants: tied head, RoPE scaling, biases)."""
    return replace(TINY_CONFIG, **overrides)


def tiny_tokenizer(vocab_size: int = TINY_CONFIG.vocab_size) -> TextTokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([_CORPUS], trainer)
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - backend.get_vocab_size())]
    backend.add_special_tokens(reserved)
    special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    return TextTokenizer(backend, None, special)


def tiny_weights(config: LlamaConfig = TINY_CONFIG, seed: int = 0) -> dict:
    """Seeded float32 weights under Hugging Face names, scaled so logits are O(1) and far from uniform."""
    g = torch.Generator().manual_seed(seed)
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size

    def linear(out_features, in_features):
        return torch.randn(out_features, in_features, generator=g) / in_features ** 0.5

    def norm():
        return 1.0 + 0.1 * torch.randn(h, generator=g)

    w = {"model.embed_tokens.weight": torch.randn(v, h, generator=g)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = linear(config.q_size, h)
        w[p + "self_attn.k_proj.weight"] = linear(config.kv_size, h)
        w[p + "self_attn.v_proj.weight"] = linear(config.kv_size, h)
        if config.attention_bias:
            for name, size in (("q", config.q_size), ("k", config.kv_size), ("v", config.kv_size)):
                w[p + f"self_attn.{name}_proj.bias"] = 0.1 * torch.randn(size, generator=g)
        w[p + "self_attn.o_proj.weight"] = linear(h, config.q_size)
        if config.o_proj_bias:
            w[p + "self_attn.o_proj.bias"] = 0.1 * torch.randn(h, generator=g)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = linear(i, h)
        w[p + "mlp.up_proj.weight"] = linear(i, h)
        w[p + "mlp.down_proj.weight"] = linear(h, i)
    w["model.norm.weight"] = norm()
    if not config.tie_word_embeddings:
        w["lm_head.weight"] = 2.0 * linear(v, h)
    return w


def tiny_identity(config: LlamaConfig, seed: int, tokenizer: TextTokenizer) -> str:
    """Names the weights and vocabulary: config, seed and the trained tokenizer."""
    h = hashlib.sha256(b"tiny-llama\0")
    h.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    h.update(f"\0seed={seed}\0".encode())
    h.update(tokenizer.backend.to_str().encode())
    return h.hexdigest()
