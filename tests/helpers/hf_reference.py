"""Independent references from Hugging Face transformers, for the program tests.

hf_model builds transformers' own LlamaForCausalLM / Qwen2ForCausalLM from a
kvos LlamaConfig and HF-named weights; it shares no code with kvos's forward.
"""
from __future__ import annotations

import torch


def hf_config_dict(config, model_type: str = "llama") -> dict:
    rope = {"rope_type": "default", "rope_theta": config.rope_theta, **config.rope_scaling}
    d = dict(
        model_type=model_type, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, rope_parameters=rope,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=list(config.eos_token_ids), hidden_act="silu",
    )
    if model_type == "llama":
        d["attention_bias"] = config.attention_bias
    return d


def hf_model(config, weights: dict, model_type: str = "llama"):
    from transformers import AutoConfig, AutoModelForCausalLM
    hf_config = AutoConfig.for_model(**hf_config_dict(config, model_type))
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # A tied head has no lm_head.weight of its own; anything else missing is a test bug.
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference over the largest reference value, row by row (logits have no natural zero)."""
    ours, ref = ours.float(), ref.float()
    return float(((ours - ref).abs().amax(-1) / ref.abs().amax(-1)).max())
