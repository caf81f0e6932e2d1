"""Programs for the simulated device: a model is its shapes and its cost, no weights.

Built from a preset or a Hugging Face config.json. forward() is never called; every sampled
token is `filler_token`, so workloads prescribe lengths (max_tokens, ignore_eos). The binfmt
loader (registered by kernel.devices.sim) claims specs only on sim devices.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kernel.devices.costmodel import ModelCost
from kernel.errors import EINVAL, ENOENT, KernelPanic, KvosError
from kernel.kvcache import KVShape
from kernel.program import Program, ProgramCost


@dataclass(frozen=True)
class SimModelConfig:
    """A decoder-only transformer in LLaMA's shape (Hugging Face field names)."""
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    num_experts: int = 1             # MoE: experts per layer (all resident) ...
    experts_per_token: int = 1       # ... of which each token runs this many
    bytes_per_param: int = 2         # fp16 / bf16 weights
    kv_bytes_per_element: int = 2    # fp16 / bf16 K/V
    eos_token_id: int = 2

    def __post_init__(self):
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                      "num_experts", "experts_per_token", "bytes_per_param", "kv_bytes_per_element"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KvosError(EINVAL, f"model config {self.name!r}: {field} must be a positive integer, "
                                        f"got {value!r}")
        if self.kv_bytes_per_element not in (1, 2, 4):
            raise KvosError(EINVAL, f"model config {self.name!r}: K/V elements of {self.kv_bytes_per_element} "
                                    f"bytes are not supported (1, 2 or 4)")

    # -- parameter counts (LLaMA layout: q, k, v, o projections; gate, up, down MLP; two norms) --
    @property
    def attention_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        return h * self.num_attention_heads * d * 2 + h * self.num_key_value_heads * d * 2

    @property
    def mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """Every parameter held in memory."""
        per_layer = self.attention_params + self.num_experts * self.mlp_params + 2 * self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.num_hidden_layers * per_layer + self.embedding_params + lm_head + self.hidden_size

    @property
    def active_params(self) -> int:
        """Parameters one token multiplies through: all layers and the LM head (the embedding
        lookup reads one row and costs no FLOPs; a tied LM head is the embedding matrix)."""
        per_layer = self.attention_params + self.experts_per_token * self.mlp_params + 2 * self.hidden_size
        return self.num_hidden_layers * per_layer + self.embedding_params + self.hidden_size

    @property
    def weight_bytes(self) -> int:
        """Bytes resident on the device."""
        return self.num_params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * self.kv_bytes_per_element


# The presets. Sources: each model's config.json on the Hugging Face hub.
PRESETS = {
    "llama-2-7b": SimModelConfig("llama-2-7b", 4096, 11008, 32, 32, 32, 128, 32000, 4096),
    "llama-2-13b": SimModelConfig("llama-2-13b", 5120, 13824, 40, 40, 40, 128, 32000, 4096),
    "llama-7b": SimModelConfig("llama-7b", 4096, 11008, 32, 32, 32, 128, 32000, 2048),
    "llama-3-8b": SimModelConfig("llama-3-8b", 4096, 14336, 32, 32, 8, 128, 128256, 8192, eos_token_id=128001),
    "smollm2-135m": SimModelConfig("smollm2-135m", 576, 1536, 30, 9, 3, 64, 49152, 8192,
                                   tie_word_embeddings=True, eos_token_id=0),
}
ALIASES = {"llama2-7b": "llama-2-7b", "llama-2-7b-hf": "llama-2-7b", "llama2-13b": "llama-2-13b",
           "llama-2-13b-hf": "llama-2-13b", "llama3-8b": "llama-3-8b", "llama-3.1-8b": "llama-3-8b",
           "smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "fp16": 2, "bf16": 2, "fp32": 4}


def config_from_hf(path) -> SimModelConfig:
    """A SimModelConfig from a Hugging Face config.json (or the folder holding it).

    Reads LLaMA-style fields (LLaMA, Mistral, Qwen2, Mixtral-style MoE); K/V are
    stored in the config's torch_dtype, fp16 when it names none.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise KvosError(ENOENT, f"{path}: no such config.json")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise KvosError(EINVAL, f"{path}: not a readable JSON config ({err})") from None
    if not isinstance(raw, dict):
        raise KvosError(EINVAL, f"{path}: a config.json holds one JSON object")
    raw = raw.get("text_config", raw)            # multimodal wrappers keep the LM here
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in raw]
    if missing:
        raise KvosError(EINVAL, f"{path}: not a LLaMA-style decoder config (missing {', '.join(missing)})")
    heads = raw["num_attention_heads"]
    eos = raw.get("eos_token_id", 2)
    eos = eos[0] if isinstance(eos, list) and eos else eos
    dtype_bytes = _DTYPE_BYTES.get(str(raw.get("torch_dtype", "float16")), 2)
    return SimModelConfig(
        name=path.parent.name or path.stem, hidden_size=raw["hidden_size"],
        intermediate_size=raw.get("moe_intermediate_size") or raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads, vocab_size=raw["vocab_size"],
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        num_experts=raw.get("num_local_experts") or raw.get("num_experts") or 1,
        experts_per_token=raw.get("num_experts_per_tok") or 1,
        bytes_per_param=dtype_bytes, kv_bytes_per_element=dtype_bytes,
        eos_token_id=eos if isinstance(eos, int) else 2)


def model_config(spec: str) -> SimModelConfig:
    """The config named by spec: a preset name (case-insensitive, aliases) or a config.json path."""
    key = spec.lower()
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    if spec.endswith(".json") or Path(spec).expanduser().is_dir():
        return config_from_hf(spec)
    raise KvosError(ENOENT, f"no simulated model {spec!r}: choose one of {', '.join(PRESETS)} "
                            f"or a Hugging Face config.json path")


class SimProgram(Program):
    """A model on the simulated device: KV shape, cost and context, no weights and no tokenizer."""

    def __init__(self, config: SimModelConfig):
        self.config = config
        self.name = config.name
        self.identity = hashlib.sha256(b"kvos-sim\0" + json.dumps(asdict(config), sort_keys=True).encode()).digest()
        dtype = {1: torch.uint8, 2: torch.float16, 4: torch.float32}[config.kv_bytes_per_element]
        self.kv_shape = KVShape(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, dtype)
        self.max_context = config.max_position_embeddings
        self.vocab_size = config.vocab_size
        self.eos_token_ids = frozenset({config.eos_token_id})
        # the token every sampling step yields: any id that is not EOS, so a process runs its length
        self._token_names: dict = {}
        self.filler_token = next(t for t in (config.vocab_size - 1, 1) if t != config.eos_token_id)
        self.cost = ProgramCost(num_params=config.active_params, weight_bytes=config.active_params
                                * config.bytes_per_param, num_layers=config.num_hidden_layers,
                                hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                                head_dim=config.head_dim)
        self.step_cost = ModelCost(
            linear_flops_per_token=self.cost.linear_flops_per_token,
            attention_flops_unit=self.cost.attention_flops(1, 1),
            weight_bytes=self.cost.weight_bytes, kv_bytes_per_token=config.kv_bytes_per_token)

    @property
    def resident_weight_bytes(self) -> int:
        return self.config.weight_bytes

    def forward(self, batch, kv):
        raise KernelPanic(f"SimProgram.forward: {self.name} runs on the simulated device, which prices "
                          f"steps instead of running them")

    def encode(self, text: str) -> list[int]:
        raise KvosError(EINVAL, f"{self.name} on the simulated device has no tokenizer: sim workloads pass "
                                f"prompts as lists of token ids")

    def decode(self, token_ids: list[int]) -> str:
        names = self._token_names          # the kernel decodes every exiting process's output
        return "".join([names.get(t) or names.setdefault(t, f"<tok {t}>") for t in token_ids])

    def render_chat(self, messages, add_generation_prompt=True) -> str:
        raise KvosError(EINVAL, f"{self.name} on the simulated device has no chat template: sim workloads "
                                f"pass prompts as lists of token ids")


_programs: dict = {}             # config -> SimProgram: tenants running one model share it


def load(spec, device):
    """binfmt: a SimProgram for `spec` on a sim device; None elsewhere, so the real loaders run."""
    if getattr(device, "kind", None) != "sim" or not isinstance(spec, str):
        return None
    config = model_config(spec)
    program = _programs.get(config)
    if program is None:
        program = _programs[config] = SimProgram(config)
    return program
