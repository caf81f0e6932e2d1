"""The facts of a LLaMA-family model: shapes, norms, rotary embedding.

Every loader (GGUF, Hugging Face folder, tiny-llama) produces one LlamaConfig;
the forward pass and the converted cache read nothing else. Field names follow
Hugging Face's LlamaConfig so a config round-trips through config.json.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from kernel.errors import EINVAL, KvosError

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # {"rope_type": "linear"|"llama3", "factor": ..., ...}; empty for plain RoPE
    rope_scaling: dict = field(default_factory=dict)
    tie_word_embeddings: bool = False
    attention_bias: bool = False          # q/k/v projections carry biases (Qwen2, LLaMA attention_bias)
    o_proj_bias: bool = False             # the output projection too (LLaMA attention_bias only)
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()

    def __post_init__(self):
        ints = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise KvosError(EINVAL, f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise KvosError(EINVAL, f"model config: {self.num_attention_heads} query heads are not a multiple "
                                    f"of {self.num_key_value_heads} KV heads")
        if self.head_dim % 2:
            raise KvosError(EINVAL, f"model config: head_dim {self.head_dim} must be even for rotary embeddings")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise KvosError(EINVAL, f"model config: rope_theta must be positive, got {self.rope_theta!r}")
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise KvosError(EINVAL, f"model config: rope scaling {rope_type!r} is not supported "
                                    f"(supported: {', '.join(ROPE_TYPES)})")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def num_params(self) -> int:
        """Parameters touched per token: every layer and the LM head, not the embedding lookup."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        mlp = 3 * h * i
        return self.num_hidden_layers * (attn + mlp + 2 * h) + h + self.vocab_size * h

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["rope_scaling"] = dict(d.get("rope_scaling") or {})
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict, eos_token_ids=()) -> LlamaConfig:
        """Read a Hugging Face config.json (llama, mistral, qwen2 model types)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise KvosError(EINVAL, f"config.json: model_type {model_type!r} is not a LLaMA-family model "
                                    "(supported: llama, mistral, qwen2)")
        try:
            heads = hf["num_attention_heads"]
            # transformers 5 keeps rope facts in rope_parameters; older files in rope_theta + rope_scaling
            rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
            theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
            rope_type = rope.pop("rope_type", rope.pop("type", "default"))
            scaling = {} if rope_type == "default" else {"rope_type": rope_type, **rope}
            if hf.get("partial_rotary_factor", 1.0) != 1.0 or rope.get("partial_rotary_factor", 1.0) != 1.0:
                raise KvosError(EINVAL, "config.json: partial rotary embeddings are not supported")
            if model_type == "mistral" and hf.get("sliding_window"):
                raise KvosError(EINVAL, "config.json: sliding-window attention is not supported")
            if model_type == "qwen2" and hf.get("use_sliding_window"):
                raise KvosError(EINVAL, "config.json: sliding-window attention is not supported")
            if hf.get("mlp_bias"):
                raise KvosError(EINVAL, "config.json: MLP biases are not supported")
            bos = hf.get("bos_token_id")
            eos = hf.get("eos_token_id")
            if not eos_token_ids:
                eos_token_ids = tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else ()
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
                o_proj_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
                bos_token_id=bos,
                eos_token_ids=tuple(eos_token_ids),
            )
        except KeyError as missing:
            raise KvosError(EINVAL, f"config.json: missing field {missing}") from None
