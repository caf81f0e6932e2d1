"""Programs for the simulated device (sim:<gpu>): a model is its LlamaConfig and how it is stored, no weights.

Named by a preset or a Hugging Face config.json, read by the reader real programs use. loader.load
hands sim devices' specs here. forward() is never called; every sampled token is `filler_token`,
so workloads prescribe lengths (max_tokens, ignore_eos).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kernel.devices.costmodel import ModelCost
from kernel.errors import EINVAL, ENOENT, KernelPanic, KvosError
from kernel.kvcache import KVShape
from kernel.program import Program
from userspace.programs import hf_folder
from userspace.programs.config import LlamaConfig

# Bytes of a stored weight or K/V element, by the dtype config.json names. A file that names none
# is taken as fp16: what a serving engine runs a LLaMA in, whatever precision it was saved in.
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "fp16": 2, "bf16": 2, "fp32": 4}
_KV_DTYPES = {1: torch.uint8, 2: torch.float16, 4: torch.float32}     # what KVShape counts bytes with


@dataclass(frozen=True)
class SimModel:
    """A model as the simulated device holds it: the shape (sizes come from it), and the storage
    assumptions, which are the simulator's: bytes per weight and per K/V element."""
    name: str
    config: LlamaConfig
    bytes_per_param: int = 2
    kv_bytes_per_element: int = 2

    def __post_init__(self):
        for field in ("bytes_per_param", "kv_bytes_per_element"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KvosError(EINVAL, f"simulated model {self.name!r}: {field} must be a positive integer, "
                                        f"got {value!r}")
        if self.kv_bytes_per_element not in _KV_DTYPES:
            raise KvosError(EINVAL, f"simulated model {self.name!r}: K/V elements of {self.kv_bytes_per_element} "
                                    f"bytes are not supported (1, 2 or 4)")

    @classmethod
    def stored_as_saved(cls, name: str, config: LlamaConfig) -> SimModel:
        """Weights and K/V in the dtype the config names (fp16 when it names none)."""
        size = DTYPE_BYTES.get(str(config.torch_dtype), 2)
        return cls(name, config, bytes_per_param=size, kv_bytes_per_element=size)

    @property
    def weight_bytes(self) -> int:
        """Bytes resident on the device: every parameter held, experts and all."""
        return self.config.total_params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        return self.config.kv_elements_per_token * self.kv_bytes_per_element

    def to_dict(self) -> dict:
        return {"name": self.name, "config": self.config.to_dict(), "bytes_per_param": self.bytes_per_param,
                "kv_bytes_per_element": self.kv_bytes_per_element}


def _preset(name: str, **fields) -> SimModel:
    return SimModel.stored_as_saved(name, LlamaConfig(**fields))


# Each model's config.json on the Hugging Face hub (smollm2-135m: the Instruct model, which is what
# the name loads on a real device). Fields a file leaves out take LlamaConfig's defaults, as there.
PRESETS = {m.name: m for m in (
    _preset("llama-2-7b", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, torch_dtype="float16"),
    _preset("llama-2-13b", vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
            num_attention_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5, torch_dtype="float16"),
    _preset("llama-7b", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, torch_dtype="float16"),
    _preset("llama-3-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
            rope_theta=500000.0, bos_token_id=128000, eos_token_ids=(128001,), torch_dtype="bfloat16"),
    _preset("llama-2-70b", vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
            num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5,
            torch_dtype="float16"),
    _preset("codellama-34b", vocab_size=32000, hidden_size=8192, intermediate_size=22016, num_hidden_layers=48,
            num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=16384, rms_norm_eps=1e-5,
            rope_theta=1000000.0, torch_dtype="bfloat16"),
    _preset("smollm2-135m", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
            rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
            torch_dtype="bfloat16"),
)}
ALIASES = {"llama2-7b": "llama-2-7b", "llama-2-7b-hf": "llama-2-7b", "llama2-13b": "llama-2-13b",
           "llama-2-13b-hf": "llama-2-13b",
           "llama2-70b": "llama-2-70b", "llama-2-70b-hf": "llama-2-70b", "codellama-34b-hf": "codellama-34b",
           "codellama-34b-instruct-hf": "codellama-34b", "llama3-8b": "llama-3-8b", "llama-3.1-8b": "llama-3-8b",
           "smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}


def _preset_key(spec: str) -> str:
    key = spec.lower()
    return ALIASES.get(key, key)


def claims(spec) -> bool:
    """A preset name (case-insensitive, aliases), a .json path, or a folder holding a config.json."""
    if not isinstance(spec, str) or not spec:
        return False
    return (_preset_key(spec) in PRESETS or spec.endswith(".json")
            or hf_folder.is_hf_folder(Path(spec).expanduser()))


def sim_model(spec: str) -> SimModel:
    """The model named by spec: a preset, or a config.json (a path to it or to its folder)."""
    if isinstance(spec, str) and _preset_key(spec) in PRESETS:
        return PRESETS[_preset_key(spec)]
    if not claims(spec):
        raise KvosError(ENOENT, f"no simulated model {spec!r}: choose one of {', '.join(PRESETS)} "
                                f"or a Hugging Face config.json path")
    path = Path(spec).expanduser()
    name = path.name if path.is_dir() else path.parent.name if path.name == "config.json" else path.stem
    # runnable=False: the simulator prices what the LLaMA forward pass cannot run (experts, windows)
    return SimModel.stored_as_saved(name or path.stem, hf_folder.read_config(path, runnable=False))


class SimProgram(Program):
    """A model on the simulated device: KV shape, cost and context, no weights and no tokenizer.

    What the simulated device reads besides the Program interface: step_cost (a ModelCost) and
    resident_weight_bytes (kernel/program.py names them)."""

    def __init__(self, model: SimModel):
        config = model.config
        self.model = model
        self.config = config
        self.name = model.name
        self.identity = hashlib.sha256(b"kvos-sim\0" + json.dumps(model.to_dict(), sort_keys=True).encode()).digest()
        self.kv_shape = KVShape(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                                _KV_DTYPES[model.kv_bytes_per_element])
        self.max_context = config.max_position_embeddings
        self.vocab_size = config.vocab_size
        self.eos_token_ids = frozenset(config.eos_token_ids)
        # the token every sampling step yields: any id that is not EOS, so a process runs its length
        self.filler_token = next((t for t in range(config.vocab_size - 1, -1, -1) if t not in self.eos_token_ids),
                                 None)
        if self.filler_token is None:
            raise KvosError(EINVAL, f"{self.name}: every token id is an EOS id, nothing is left to sample")
        self._token_names: dict = {}
        self.cost = config.program_cost(model.bytes_per_param)
        # activations in the weights' dtype; per token and layer, elementwise traffic (read + write):
        # two RMS norms and two residual adds of the hidden state (replicated on every tensor-parallel
        # rank), rotary on q and k and the gated activation (read gate and up, write one; split by tp)
        act, hidden, layers = model.bytes_per_param, config.hidden_size, config.num_hidden_layers
        q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        mlp = config.intermediate_size * config.experts_per_token
        self.step_cost = ModelCost(
            linear_flops_per_token=self.cost.linear_flops_per_token,
            attention_flops_unit=self.cost.attention_flops(1, 1),
            weight_bytes=self.cost.weight_bytes, kv_bytes_per_token=model.kv_bytes_per_token,
            layers=layers, heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
            allreduce_bytes_per_token=int(hidden * act),
            elementwise_bytes_per_token=int(layers * (2 * 2 + 2 * 3) * hidden * act),
            elementwise_sharded_bytes_per_token=int(layers * (2 * (q + kv) + 3 * mlp) * act))

    @property
    def resident_weight_bytes(self) -> int:
        return self.model.weight_bytes

    def forward(self, batch, kv):
        raise KernelPanic(f"SimProgram.forward: {self.name} runs on the simulated device, which prices "
                          f"steps instead of running them")

    def encode(self, text: str) -> list[int]:
        raise KvosError(EINVAL, f"{self.name} on the simulated device has no tokenizer: sim workloads pass "
                                f"prompts as lists of token ids")

    def decode(self, token_ids: list[int]) -> str:
        names = self._token_names          # the kernel decodes every exiting process's output
        return "".join([names.get(t) or names.setdefault(t, f"<tok {t}>") for t in token_ids])

    def render_chat(self, messages, add_generation_prompt=True, tools=None) -> str:
        raise KvosError(EINVAL, f"{self.name} on the simulated device has no chat template: sim workloads "
                                f"pass prompts as lists of token ids")


_programs: dict = {}             # SimModel identity -> SimProgram: tenants running one model share it


def load(spec, device) -> SimProgram | None:
    """binfmt: a SimProgram for spec on a sim device; None for other devices and for specs that name
    no simulated model, so other loaders get their turn."""
    if getattr(device, "kind", None) != "sim" or not claims(spec):
        return None
    program = SimProgram(sim_model(spec))
    return _programs.setdefault(program.identity, program)
