"""The one description of a LLaMA-family model: shapes, norms, rotary embedding, and its sizes.

Every reader (config.json, GGUF, tiny-llama, the simulator's presets) produces one LlamaConfig;
the forward pass, the converted cache and the simulated device's programs read nothing else.
Field names follow Hugging Face's LlamaConfig so a config round-trips through config.json.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from kernel.errors import EINVAL, KvosError
from kernel.program import ProgramCost

ROPE_TYPES = ("default", "linear", "llama3")
RUNNABLE_MODEL_TYPES = ("llama", "mistral", "qwen2")     # what llama.py computes, bias conventions included
# A config.json without these is not a decoder we can describe; every other field has a default.
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class LlamaConfig:
    """A decoder in LLaMA's shape. The defaults are Hugging Face transformers' LlamaConfig defaults,
    so a config.json that leaves a field out means here what it means to transformers:

        num_key_value_heads  = num_attention_heads (multi-head attention)
        head_dim             = hidden_size // num_attention_heads
        max_position_embeddings = 2048      rms_norm_eps = 1e-6      rope_theta = 10000, no scaling
        tie_word_embeddings  = False        attention_bias = False
        bos_token_id = 1                    eos_token_ids = (2,)     (a JSON null means none)
        num_experts = experts_per_token = 1 (dense)                  torch_dtype = None (unstated)

    The five sizes in REQUIRED have no default: transformers would fill LLaMA-7B's, which would
    describe some other model.
    """
    vocab_size: int
    hidden_size: int
    intermediate_size: int               # of one MLP (one expert's, in a mixture of experts)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # {"rope_type": "linear"|"llama3", "factor": ..., ...}; empty for plain RoPE
    rope_scaling: dict = field(default_factory=dict)
    tie_word_embeddings: bool = False
    attention_bias: bool = False          # q/k/v projections carry biases (Qwen2, LLaMA attention_bias)
    o_proj_bias: bool = False             # the output projection too (LLaMA attention_bias only)
    bos_token_id: int | None = 1
    eos_token_ids: tuple = (2,)
    num_experts: int = 1                  # MoE: MLPs per layer, all held in memory ...
    experts_per_token: int = 1            # ... of which each token runs this many (plus the router)
    torch_dtype: str | None = None        # what config.json says the checkpoint holds; programs choose their own

    def __post_init__(self):
        # None means "as transformers derives it"; resolved here so every reader gets the same numbers
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None and _positive(self.hidden_size) and _positive(self.num_attention_heads):
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        ints = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "num_experts", "experts_per_token")
        for name in ints:
            value = getattr(self, name)
            if not _positive(value):
                raise KvosError(EINVAL, f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise KvosError(EINVAL, f"model config: {self.num_attention_heads} query heads are not a multiple "
                                    f"of {self.num_key_value_heads} KV heads")
        if self.head_dim % 2:
            raise KvosError(EINVAL, f"model config: head_dim {self.head_dim} must be even for rotary embeddings")
        if self.experts_per_token > self.num_experts:
            raise KvosError(EINVAL, f"model config: {self.experts_per_token} experts per token out of "
                                    f"{self.num_experts}")
        if not (_real(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise KvosError(EINVAL, f"model config: rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if not (_real(self.rope_theta) and self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise KvosError(EINVAL, f"model config: rope_theta must be positive, got {self.rope_theta!r}")
        if not all(_token_id(t) for t in self.eos_token_ids) or not (
                self.bos_token_id is None or _token_id(self.bos_token_id)):
            raise KvosError(EINVAL, f"model config: token ids must be integers >= 0, got bos "
                                    f"{self.bos_token_id!r}, eos {list(self.eos_token_ids)!r}")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    # -- sizes: one formula for the real programs and the simulated device --------------------
    @property
    def attention_params(self) -> int:
        """One layer's q, k, v and o projections, with their biases when the model has them."""
        h, qkv = self.hidden_size, self.q_size + 2 * self.kv_size
        return h * qkv + self.q_size * h + qkv * self.attention_bias + h * self.o_proj_bias

    @property
    def mlp_params(self) -> int:
        """One SwiGLU MLP (gate, up, down): a dense layer's, or one expert's."""
        return 3 * self.hidden_size * self.intermediate_size

    def _layer_params(self, experts: int) -> int:
        router = self.hidden_size * self.num_experts if self.num_experts > 1 else 0
        return self.attention_params + experts * self.mlp_params + router + 2 * self.hidden_size   # + 2 norms

    @property
    def total_params(self) -> int:
        """Every parameter held in memory: all experts, the embedding, and the LM head unless it is
        tied to the embedding (then the matrix is held once). Hugging Face's num_parameters()."""
        matrices = 1 if self.tie_word_embeddings else 2
        return (self.num_hidden_layers * self._layer_params(self.num_experts)
                + matrices * self.vocab_size * self.hidden_size + self.hidden_size)

    @property
    def active_params(self) -> int:
        """Parameters one token multiplies through: every layer (its experts_per_token experts and the
        router) and the LM head. The embedding lookup reads one row and costs no FLOPs; a tied LM head
        is the embedding matrix, so it counts here as the head."""
        return (self.num_hidden_layers * self._layer_params(self.experts_per_token)
                + self.vocab_size * self.hidden_size + self.hidden_size)

    @property
    def kv_elements_per_token(self) -> int:
        """K and V of one token over all layers, in elements (times an element's bytes: the cache's)."""
        return 2 * self.num_hidden_layers * self.kv_size

    def program_cost(self, bytes_per_param: int) -> ProgramCost:
        """What the kernel and the simulated device price a step with: the active parameters, read
        once per step at bytes_per_param each."""
        return ProgramCost(num_params=self.active_params, weight_bytes=self.active_params * bytes_per_param,
                           num_layers=self.num_hidden_layers, hidden_size=self.hidden_size,
                           num_heads=self.num_attention_heads, head_dim=self.head_dim)

    # -- what the LLaMA forward pass computes ----------------------------------------------------
    def check_runnable(self) -> None:
        """Refuse a shape llama.py does not compute (the simulator prices it all the same)."""
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise KvosError(EINVAL, f"model config: rope scaling {rope_type!r} is not supported "
                                    f"(supported: {', '.join(ROPE_TYPES)})")
        if self.num_experts != 1:
            raise KvosError(EINVAL, f"model config: a mixture of {self.num_experts} experts is not supported "
                                    f"(LLaMA programs are dense; the simulated device runs it)")

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        """Read back to_dict() (the converted cache, which holds only programs llama.py runs)."""
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["rope_scaling"] = dict(d.get("rope_scaling") or {})
        config = cls(**d)
        config.check_runnable()
        return config

    @classmethod
    def from_hf(cls, hf: dict, eos_token_ids=()) -> LlamaConfig:
        """The one reader of a Hugging Face config.json, for real programs and the simulator alike.

        Reads LLaMA-style fields (LLaMA, Mistral, Qwen2 and Mixtral- or Qwen2-MoE-style experts; a
        multimodal file's text_config); absent fields take the class's defaults (transformers').
        eos_token_ids: from generation_config.json, which overrides config.json's when given.
        It refuses only what is not a decoder shape; check_runnable_hf() and check_runnable() refuse
        what the LLaMA forward pass cannot compute.
        """
        if not isinstance(hf, dict):
            raise KvosError(EINVAL, "config.json: holds one JSON object")
        text = hf.get("text_config") or hf          # multimodal wrappers keep the language model here
        model_type = text.get("model_type") or hf.get("model_type") or "llama"
        missing = [key for key in REQUIRED if key not in text]
        if missing:
            raise KvosError(EINVAL, f"config.json: missing field {', '.join(map(repr, missing))} "
                                    f"(not a LLaMA-style decoder config)")
        # Only what the file states goes in; the class's defaults fill the rest. A null counts as
        # absent, as transformers reads it, except for the token ids, where null means "none".
        given = {key: text[key] for key in (*REQUIRED, "num_key_value_heads", "head_dim",
                                            "max_position_embeddings") if text.get(key) is not None}
        if "bos_token_id" in text:
            given["bos_token_id"] = text["bos_token_id"]
        if eos_token_ids:
            given["eos_token_ids"] = tuple(eos_token_ids)
        elif "eos_token_id" in text:
            eos = text["eos_token_id"]
            given["eos_token_ids"] = tuple(eos) if isinstance(eos, list) else () if eos is None else (eos,)
        if text.get("rms_norm_eps") is not None:
            given["rms_norm_eps"] = _number(text["rms_norm_eps"], "rms_norm_eps")
        # transformers 5 keeps rope facts in rope_parameters; older files in rope_theta + rope_scaling
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", text.get("rope_theta"))
        if theta is not None:
            given["rope_theta"] = _number(theta, "rope_theta")
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        rope.pop("partial_rotary_factor", None)   # not a scaling rule; check_runnable_hf() refuses it
        experts = text.get("num_local_experts") or text.get("num_experts")     # Mixtral's name, Qwen2-MoE's
        if experts is not None:
            given["num_experts"] = experts
            given["experts_per_token"] = text.get("num_experts_per_tok") or 1
            given["intermediate_size"] = text.get("moe_intermediate_size") or text["intermediate_size"]
        dtype = text.get("dtype") or text.get("torch_dtype")    # transformers 5 writes "dtype"
        qwen2 = model_type in ("qwen2", "qwen2_moe")            # q/k/v biases whatever the file says
        return cls(
            **given,
            rope_scaling={} if rope_type == "default" else {"rope_type": rope_type, **rope},
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
            attention_bias=qwen2 or bool(text.get("attention_bias", False)),
            o_proj_bias=not qwen2 and bool(text.get("attention_bias", False)),
            torch_dtype=str(dtype) if dtype is not None else None,
        )


def check_runnable_hf(hf: dict) -> None:
    """Refuse a config.json whose model llama.py does not compute, from the flags the shape does not
    keep (model type, sliding windows, partial rotary embeddings, MLP biases)."""
    if not isinstance(hf, dict):
        raise KvosError(EINVAL, "config.json: holds one JSON object")
    model_type = hf.get("model_type", "llama")
    if model_type not in RUNNABLE_MODEL_TYPES:
        raise KvosError(EINVAL, f"config.json: model_type {model_type!r} is not a LLaMA-family model "
                                f"(supported: {', '.join(RUNNABLE_MODEL_TYPES)})")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if hf.get("partial_rotary_factor", 1.0) != 1.0 or (isinstance(rope, dict)
                                                        and rope.get("partial_rotary_factor", 1.0) != 1.0):
        raise KvosError(EINVAL, "config.json: partial rotary embeddings are not supported")
    if model_type == "mistral" and hf.get("sliding_window"):
        raise KvosError(EINVAL, "config.json: sliding-window attention is not supported")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise KvosError(EINVAL, "config.json: sliding-window attention is not supported")
    if hf.get("mlp_bias"):
        raise KvosError(EINVAL, "config.json: MLP biases are not supported")


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KvosError(EINVAL, f"config.json: {key} must be a number, got {value!r}")
    return float(value)
