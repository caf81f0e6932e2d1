"""One description of a model: a config.json read for a real program and for the simulated device
gives one shape, one set of defaults (transformers') and one parameter count (transformers')."""
import json
from dataclasses import replace

import pytest
import torch

import kernel
from kernel.devices import make_device
from kernel.errors import KvosError
from kernel.program import BINFMTS, exec_program, register_binfmt
from tests.helpers.hf_reference import hf_config_dict
from userspace.programs import loader, tiny
from userspace.programs.config import LlamaConfig
from userspace.programs.loader import load_program
from userspace.programs.sim import PRESETS, SimProgram, sim_model


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A tiny-llama saved as a Hugging Face folder; tests rewrite its config.json."""
    from safetensors.torch import save_file
    monkeypatch.setenv("KVOS_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny-hf"
    path.mkdir()
    save_file(tiny.tiny_weights(tiny.TINY_CONFIG, 0), path / "model.safetensors")
    tiny.tiny_tokenizer().save(path / "tokenizer.json")
    return path


def write_config(folder, hf: dict):
    (folder / "config.json").write_text(json.dumps(hf))


def both(folder):
    """(the real program on the cpu, the program on a simulated A100) of one folder."""
    real = load_program(str(folder), "cpu")
    k = kernel.boot(device="sim:a100")
    return real, k.tenants[k.syscalls().spawn_tenant(str(folder))].program


def assert_same_model(real, simulated):
    assert isinstance(simulated, SimProgram)
    assert simulated.config == real.config
    # weight bytes are each device's storage (float32 on the cpu, the file's dtype on the sim); the rest is one
    assert replace(simulated.cost, weight_bytes=0) == replace(real.cost, weight_bytes=0)
    assert (simulated.kv_shape.num_layers, simulated.kv_shape.num_kv_heads, simulated.kv_shape.head_dim) == \
           (real.kv_shape.num_layers, real.kv_shape.num_kv_heads, real.kv_shape.head_dim)
    assert simulated.max_context == real.max_context and simulated.vocab_size == real.vocab_size
    assert simulated.eos_token_ids == real.eos_token_ids


def test_one_config_json_one_shape_on_both_paths(folder):
    write_config(folder, {**hf_config_dict(tiny.TINY_CONFIG), "torch_dtype": "float32"})
    real, simulated = both(folder)
    assert_same_model(real, simulated)
    assert real.config.total_params == simulated.config.total_params
    assert simulated.resident_weight_bytes == real.config.total_params * 4       # the file's float32
    assert simulated.kv_shape.bytes_per_token == real.kv_shape.bytes_per_token    # float32 both
    assert (real.max_context, real.eos_token_ids, real.config.bos_token_id) == (2048, frozenset({2}), 1)


def test_absent_fields_take_transformers_defaults_on_both_paths(folder):
    from transformers import LlamaConfig as HFLlamaConfig
    hf_defaults = HFLlamaConfig()
    full = hf_config_dict(tiny.TINY_CONFIG)
    bare = {k: v for k, v in full.items() if k not in ("max_position_embeddings", "eos_token_id", "bos_token_id",
                                                       "rms_norm_eps", "rope_theta", "rope_parameters", "head_dim",
                                                       "tie_word_embeddings", "model_type")}
    write_config(folder, bare)
    real, simulated = both(folder)
    assert_same_model(real, simulated)
    c = simulated.config
    assert c.max_position_embeddings == 2048 == hf_defaults.max_position_embeddings
    assert c.eos_token_ids == (2,) and hf_defaults.eos_token_id == 2
    assert c.bos_token_id == 1 == hf_defaults.bos_token_id
    assert c.rms_norm_eps == 1e-6 == hf_defaults.rms_norm_eps
    assert c.rope_theta == 10000.0 == hf_defaults.rope_parameters["rope_theta"]
    assert c.head_dim == 32 and not c.tie_word_embeddings and c.num_experts == 1
    assert LlamaConfig(**{k: bare[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                               "num_hidden_layers", "num_attention_heads")}).max_position_embeddings \
        == 2048                                            # the class's defaults are the reader's
    assert simulated.resident_weight_bytes == c.total_params * 2                  # no dtype stated: fp16

    write_config(folder, {**bare, "eos_token_id": None})                         # null: no EOS at all
    real, simulated = both(folder)
    assert real.eos_token_ids == simulated.eos_token_ids == frozenset()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    real, simulated = both(folder)                                                # generation_config wins
    assert real.eos_token_ids == simulated.eos_token_ids == frozenset({5, 6})


def _hf_count(hf: dict) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):                           # shapes only: no memory for 8B parameters
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_count_parameters_as_transformers(name):
    config = PRESETS[name].config
    assert config.total_params == _hf_count(hf_config_dict(config))


@pytest.mark.parametrize("variant", ["qwen2-bias", "llama-bias", "tied", "mixtral"])
def test_counts_with_biases_ties_and_experts(variant):
    hf = {"tied": hf_config_dict(tiny.tiny_config(tie_word_embeddings=True)),
          "qwen2-bias": hf_config_dict(tiny.tiny_config(attention_bias=True), "qwen2"),
          "llama-bias": hf_config_dict(tiny.tiny_config(attention_bias=True, o_proj_bias=True)),
          "mixtral": {**hf_config_dict(tiny.TINY_CONFIG, "mixtral"), "num_local_experts": 4,
                      "num_experts_per_tok": 2}}[variant]
    config = LlamaConfig.from_hf(hf)
    assert config.total_params == _hf_count(hf)
    dense = replace(config, num_experts=1, experts_per_token=1)
    if variant == "mixtral":                             # each token: two of four experts, and the router
        router = config.num_hidden_layers * config.hidden_size * 4
        assert config.active_params == dense.active_params + config.num_hidden_layers * config.mlp_params + router
        assert config.total_params == dense.total_params + 3 * config.num_hidden_layers * config.mlp_params + router
    untied_embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    assert dense.total_params == dense.active_params + untied_embedding


def test_mixtral_8x7b_published_count(tmp_path):
    hf = {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
          "num_experts_per_tok": 2, "max_position_embeddings": 32768, "torch_dtype": "bfloat16"}
    path = tmp_path / "Mixtral-8x7B" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(hf))
    model = sim_model(str(path))
    assert model.name == "Mixtral-8x7B"
    assert model.config.total_params == 46_702_792_704                # transformers' MixtralForCausalLM
    assert model.weight_bytes == 2 * 46_702_792_704


def test_the_simulator_reads_what_the_forward_pass_refuses(folder):
    mixtral = {**hf_config_dict(tiny.TINY_CONFIG, "mixtral"), "num_local_experts": 4, "num_experts_per_tok": 2}
    write_config(folder, mixtral)
    with pytest.raises(KvosError, match="^EINVAL: config.json: model_type 'mixtral'"):
        load_program(str(folder), "cpu")
    assert sim_model(str(folder)).config.num_experts == 4
    yarn = {**hf_config_dict(tiny.TINY_CONFIG), "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                                    "rope_theta": 10000.0}}
    write_config(folder, yarn)
    with pytest.raises(KvosError, match="^EINVAL: model config: rope scaling 'yarn'"):
        load_program(str(folder), "cpu")
    assert sim_model(str(folder)).config.rope_scaling["rope_type"] == "yarn"
    with pytest.raises(KvosError, match="^EINVAL: model config: a mixture of 4 experts"):
        LlamaConfig.from_hf(mixtral).check_runnable()


def test_one_loader_for_both_kinds_of_device():
    sim, cpu = make_device("sim:h100"), make_device("cpu")
    program = loader.load("smollm2-135m", sim)                     # the name loads the preset, not a GGUF
    assert isinstance(program, SimProgram) and program.config == PRESETS["smollm2-135m"].config
    assert loader.load("SmolLM2", sim) is program                  # aliases, case-insensitive, shared
    assert loader.load("tiny-llama", sim) is None                  # real-only names: another loader's turn
    assert loader.load("model.gguf", sim) is None
    assert loader.load("llama-2-7b", cpu) is None
    with pytest.raises(KvosError, match="^ENOENT: no program named 'tiny-llama'.*simulated model"):
        exec_program("tiny-llama", sim)


def test_register_binfmt_still_adds_loaders_for_sim_devices():
    sim = make_device("sim:a100")
    mine = SimProgram(replace(PRESETS["llama-2-7b"], name="my-model"))

    def my_loader(spec, device):
        return mine if spec == "my-model" else None
    register_binfmt(my_loader)
    try:
        assert exec_program("my-model", sim) is mine
        assert isinstance(exec_program("llama-2-7b", sim), SimProgram)
    finally:
        BINFMTS.remove(my_loader)
