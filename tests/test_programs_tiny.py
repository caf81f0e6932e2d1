"""tiny-llama on paged memory against transformers' own LLaMA: every loading path, every batch shape.

The reference is HF's LlamaForCausalLM / Qwen2ForCausalLM built from the same
config and weights (or loaded by HF from the same GGUF file), sharing no code
with the kvos forward pass. Logits must agree to 1e-4 relative.
"""
import gc
import json

import pytest
import torch

from kernel.devices.torchdev import TorchDevice
from kernel.errors import KvosError
from kernel.program import exec_program
from tests.helpers.hf_reference import hf_model, rel_error
from tests.helpers.paged_runner import PagedRunner
from tests.helpers.tiny_gguf import write_gguf
from userspace.programs import qlinear, tiny
from userspace.programs.llama import LlamaProgram, fuse_hf_weights
from userspace.programs.loader import load_program

TOL = 1e-4
PROMPT_TEXT = ("kvos is an operating system for LLM inference. The page table maps virtual pages to frames; "
               "fork shares every page copy-on-write. Hello, world! héllo 你好 🙂 " * 3)


@pytest.fixture(scope="module")
def program():
    return exec_program("tiny-llama", TorchDevice("cpu"))


@pytest.fixture(scope="module")
def reference():
    return hf_model(tiny.TINY_CONFIG, tiny.tiny_weights(tiny.TINY_CONFIG, 0))


@pytest.fixture(scope="module")
def prompt(program):
    ids = program.encode(PROMPT_TEXT)
    assert len(ids) > 100        # long enough for several pages and every chunk size
    return ids


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_loaded_through_binfmt_and_shared(program):
    again = exec_program("tiny-llama", TorchDevice("cpu"))
    assert again is program                                   # one copy of the program text
    assert isinstance(program, LlamaProgram)
    assert program.kv_shape.num_layers == 3 and program.kv_shape.num_kv_heads == 2
    assert program.kv_shape.head_dim == 32 and program.kv_shape.dtype == torch.float32
    assert program.vocab_size == 512 == program.tokenizer.backend.get_vocab_size()
    assert program.eos_token_ids == frozenset({2}) and program.max_context == 2048
    assert len(program.identity) == 32
    assert program.cost.num_params == tiny.TINY_CONFIG.active_params > 0


def test_deterministic_across_loads(program):
    """Same seed, same weights and vocabulary: a fresh build has the same identity and logits."""
    config = tiny.TINY_CONFIG
    tokenizer = tiny.tiny_tokenizer()
    assert tokenizer.backend.to_str() == program.tokenizer.backend.to_str()
    fresh = LlamaProgram("t", config, fuse_hf_weights(config, tiny.tiny_weights(config, 0)), tokenizer,
                         program.identity, torch.device("cpu"), torch.float32)
    ids = program.encode("deterministic")
    _, fresh_logits = PagedRunner(fresh).greedy([ids], 3)
    _, logits = PagedRunner(program).greedy([ids], 3)
    assert torch.equal(fresh_logits[0], logits[0])


def test_tokenizer_round_trip_and_chat(program):
    text = "Hello, world! héllo 你好 🙂"
    assert program.decode(program.encode(text)) == text
    ids = program.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids[0] == 1 and 2 in ids                         # <|im_start|> ... <|im_end|>
    assert program.decode(ids).endswith("assistant\n")      # specials skipped, text kept


def test_whole_prompt_matches_hf(program, reference, prompt):
    runner = PagedRunner(program)
    ours = runner.prefill(runner.new_seq(), prompt)
    assert ours.shape == (len(prompt), 512) and ours.dtype == torch.float32
    assert rel_error(ours, hf_logits(reference, prompt)) < TOL


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_matches_whole(program, prompt, chunk):
    whole_runner = PagedRunner(program, seed=1)
    whole = whole_runner.prefill(whole_runner.new_seq(), prompt)
    runner = PagedRunner(program, seed=2)                    # other frames, same results
    chunked = runner.prefill(runner.new_seq(), prompt, chunk)
    assert rel_error(chunked, whole) < TOL


def test_greedy_decode_matches_hf(program, reference, prompt):
    (new,), (logits,) = PagedRunner(program).greedy([prompt[:40]], 24)
    assert len(new) == 24 and logits.shape == (24, 512)
    ref = hf_logits(reference, prompt[:40] + new[:-1])[39:]
    assert rel_error(logits, ref) < TOL
    assert new == ref.argmax(-1).tolist()


def test_batched_sequences_match_separate_runs(program, reference, prompt):
    """Prompts of different lengths share every step (prefill chunks and decodes packed together)."""
    prompts = [prompt[:5], prompt[10:60], prompt[3:20], prompt[:1]]
    together_new, together_logits = PagedRunner(program).greedy(prompts, 12, chunk=16)
    for p, new, logits in zip(prompts, together_new, together_logits):
        alone_new, alone_logits = PagedRunner(program, seed=9).greedy([p], 12)
        assert new == alone_new[0]
        assert rel_error(logits, alone_logits[0]) < TOL
        assert rel_error(logits, hf_logits(reference, p + new[:-1])[len(p) - 1:]) < TOL


def test_prefix_pages_shared_not_recomputed(program, reference, prompt):
    """A child maps the parent's full prefix pages and computes only its own suffix."""
    runner = PagedRunner(program)
    parent = runner.new_seq()
    runner.prefill(parent, prompt[:50])
    shared = 48                                              # three full pages of 16
    child = runner.fork(parent, shared)
    assert child.frames == parent.frames[:3] and child.length == shared
    suffix = prompt[60:80]
    child_logits = runner.prefill(child, suffix)             # only 20 tokens computed
    assert rel_error(child_logits, hf_logits(reference, prompt[:shared] + suffix)[shared:]) < TOL
    # The parent still reads its own pages intact: its continuation matches a fresh run.
    parent_next = runner.step([(parent, prompt[50:52])], sample_all=True)
    assert rel_error(parent_next, hf_logits(reference, prompt[:52])[50:]) < TOL


@pytest.mark.parametrize("page_size", [1, 5, 16, 64])
def test_page_sizes(program, reference, prompt, page_size):
    runner = PagedRunner(program, num_frames=600, page_size=page_size)
    ours = runner.prefill(runner.new_seq(), prompt[:70], chunk=13)
    assert rel_error(ours, hf_logits(reference, prompt[:70])) < TOL


VARIANTS = {
    "tied-head": (tiny.tiny_config(tie_word_embeddings=True), "llama"),
    "rope-llama3": (tiny.tiny_config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 64}), "llama"),
    "rope-linear": (tiny.tiny_config(rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=500.0), "llama"),
    "qwen2-bias": (tiny.tiny_config(attention_bias=True, tie_word_embeddings=True), "qwen2"),
    "llama-bias": (tiny.tiny_config(attention_bias=True, o_proj_bias=True), "llama"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_folder_variants(tmp_path, monkeypatch, prompt, variant):
    """save_pretrained folders (safetensors + tokenizer.json) load as programs and match HF."""
    monkeypatch.setenv("KVOS_CACHE_DIR", str(tmp_path / "cache"))
    config, model_type = VARIANTS[variant]
    weights = tiny.tiny_weights(config, seed=3)
    model = hf_model(config, weights, model_type)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer = tiny.tiny_tokenizer()
    tokenizer.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tokenizer.chat_template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    program = load_program(str(folder), "cpu")
    assert program.config.rope_scaling == config.rope_scaling
    assert program.config.tie_word_embeddings == config.tie_word_embeddings
    assert program.encode(PROMPT_TEXT) == prompt
    runner = PagedRunner(program)
    ours = runner.prefill(runner.new_seq(), prompt, chunk=50)
    assert rel_error(ours, hf_logits(model, prompt)) < TOL


def test_bfloat16_panels_with_bias_and_a_tied_head(tmp_path, monkeypatch, prompt):
    """bf16 matmuls on bf16 panels with a QKV bias (kept float32) and a tied table read from the head's
    panels (its rows rounded to bf16): close to HF through prefill and decode."""
    monkeypatch.setenv("KVOS_CACHE_DIR", str(tmp_path / "cache"))
    config, model_type = VARIANTS["qwen2-bias"]
    model = hf_model(config, tiny.tiny_weights(config, seed=3), model_type)
    model.save_pretrained(tmp_path / "model")
    tiny.tiny_tokenizer().save(tmp_path / "model" / "tokenizer.json")
    fast = load_program(str(tmp_path / "model"), "cpu", matmul="bfloat16")
    assert fast.embed is fast.lm_head and fast.lm_head.dtype == torch.bfloat16
    assert fast.layers[0].qkv_bias.dtype == torch.float32
    runner = PagedRunner(fast)
    seq = runner.new_seq()
    logits = runner.prefill(seq, prompt[:80], chunk=7)
    err = rel_error(logits, hf_logits(model, prompt[:80]))
    assert 1e-4 < err < 3e-2, err
    decoded = [runner.step([(seq, [t])])[0] for t in prompt[80:90]]
    assert rel_error(torch.stack(decoded), hf_logits(model, prompt[:90])[80:]) < 3e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_file_matches_hf_gguf_loader(tmp_path, monkeypatch, prompt, arch):
    """A GGUF written as llama.cpp does (Q/K permuted, Q8_0 and F16 tensors) loads like transformers loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    monkeypatch.setenv("KVOS_CACHE_DIR", str(tmp_path / "cache"))
    config = tiny.TINY_CONFIG if arch == "llama" else tiny.tiny_config(attention_bias=True, tie_word_embeddings=True)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, config, tiny.tiny_weights(config, 5), tiny.tiny_tokenizer(), arch=arch)

    program = load_program(str(path), "cpu")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in (PROMPT_TEXT, " leading space", "<|im_start|>user\nhi<|im_end|>", "tabs\tand\nnewlines  "):
        assert program.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    assert program.apply_chat_template(chat) == list(
        hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"])

    runner = PagedRunner(program)
    ours = runner.prefill(runner.new_seq(), prompt, chunk=7)
    assert rel_error(ours, hf_logits(model, prompt)) < TOL

    # The second load comes from the converted cache: the GGUF is not parsed again.
    converted = list((tmp_path / "cache" / "converted").iterdir())
    assert len(converted) == 1 and (converted[0] / "weights.safetensors").is_file()
    del program, runner
    gc.collect()

    def no_parse(path):
        raise AssertionError("the GGUF was parsed again despite the converted cache")
    monkeypatch.setattr("userspace.programs.gguf_file.read_gguf", no_parse)
    again = load_program(str(path), "cpu")
    runner = PagedRunner(again)
    assert torch.equal(runner.prefill(runner.new_seq(), prompt, chunk=7), ours)


def test_unpermute_inverts_llama_cpp_permute():
    from tests.helpers.tiny_gguf import permute_for_llama_cpp
    from userspace.programs.gguf_file import unpermute_rope_rows
    w = torch.randn(6 * 8, 5)
    permuted = permute_for_llama_cpp(w, 6)
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rope_rows(permuted, 6), w)
    b = torch.randn(6 * 8)
    assert torch.equal(unpermute_rope_rows(permute_for_llama_cpp(b, 6), 6), b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_cuda_matches_hf(reference, prompt, dtype, tol):
    program = load_program("tiny-llama", "cuda", dtype=dtype)
    assert program.kv_shape.dtype == dtype
    runner = PagedRunner(program, device="cuda")
    ours = runner.prefill(runner.new_seq(), prompt, chunk=7)
    assert ours.dtype == torch.float32 and ours.device.type == "cuda"
    assert rel_error(ours.cpu(), hf_logits(reference, prompt)) < tol


def test_bfloat16_matmuls_on_the_cpu(program, reference, prompt, monkeypatch):
    """matmul=bfloat16: the linear layers in bf16, the rest float32; close to HF, and its own program."""
    fast = load_program("tiny-llama", "cpu", matmul="bfloat16")
    assert fast is not program and fast.matmul_dtype == torch.bfloat16
    assert fast.kv_shape.dtype == torch.float32                  # the KV cache and the C kernels: float32
    assert fast.identity != program.identity                     # other K/V: never shared through the page cache
    assert fast.layers[0].qkv_t.dtype == torch.bfloat16
    assert isinstance(fast.layers[0].qkv_t, qlinear.PanelLinear)     # bf16 panels (ops.panel_mm), the only copy
    assert isinstance(fast.lm_head, qlinear.PanelLinear) and fast.lm_head.dtype == torch.bfloat16
    runner = PagedRunner(fast)
    logits = runner.prefill(runner.new_seq(), prompt, chunk=7)
    err = rel_error(logits, hf_logits(reference, prompt))
    assert 1e-4 < err < 3e-2, err                              # bf16 rounding, not a different function
    monkeypatch.setenv("KVOS_MATMUL", "bf16")
    assert load_program("tiny-llama", "cpu") is fast             # the environment picks the same program
    for bad, message in (("float16", "float32 or bfloat16"), ("int8", "is not one of")):
        with pytest.raises(KvosError, match=message):
            load_program("tiny-llama", "cpu", matmul=bad)


def test_bfloat16_kv_cache_on_the_cpu(program, reference, prompt, monkeypatch):
    """kv=bfloat16: K and V stored as bf16 (half the bytes per token), everything else float32;
    close to HF through chunked prefill and decode, and a program of its own."""
    small = load_program("tiny-llama", "cpu", kv="bfloat16")
    assert small is not program and small.kv_shape.dtype == torch.bfloat16
    assert small.kv_shape.bytes_per_token * 2 == program.kv_shape.bytes_per_token
    assert small.identity != program.identity                    # other K/V: never shared through the page cache
    assert isinstance(small.layers[0].qkv_t, qlinear.PanelLinear)    # float32 GEMMs: packed panels
    runner = PagedRunner(small)
    seq = runner.new_seq()
    logits = runner.prefill(seq, prompt[:80], chunk=7)
    err = rel_error(logits, hf_logits(reference, prompt[:80]))
    assert 1e-5 < err < 3e-2, err                                # bf16 rounding, not a different function
    decoded = [runner.step([(seq, [t])])[0] for t in prompt[80:90]]     # one token a step: decode
    err = rel_error(torch.stack(decoded), hf_logits(reference, prompt[:90])[80:])
    assert err < 3e-2, err
    monkeypatch.setenv("KVOS_KV", "bf16")
    assert load_program("tiny-llama", "cpu") is small            # the environment picks the same program
    both = load_program("tiny-llama", "cpu", matmul="bfloat16")
    assert both.kv_shape.dtype == torch.bfloat16 and both.matmul_dtype == torch.bfloat16
    assert len({both.identity, small.identity, program.identity}) == 3
    for bad, message in (("float16", "float32 or bfloat16"), ("uint8", "is not one of")):
        with pytest.raises(KvosError, match=message):
            load_program("tiny-llama", "cpu", kv=bad)


def test_int8_kv_cache_on_the_cpu(program, reference, prompt, monkeypatch):
    """kv=int8: each K and V row stored as int8 codes and a float32 scale ((d + 4) / 4d of float32's
    bytes), everything else float32; close to HF through chunked prefill and decode, a program of
    its own, and refused where no kernel stores it."""
    small = load_program("tiny-llama", "cpu", kv="int8")
    assert small is not program and small.kv_shape.dtype == torch.int8
    d = program.config.head_dim
    assert small.kv_shape.bytes_per_token * 4 * d == program.kv_shape.bytes_per_token * (d + 4)
    assert small.identity != program.identity                    # other K/V: never shared through the page cache
    runner = PagedRunner(small)
    seq = runner.new_seq()
    logits = runner.prefill(seq, prompt[:80], chunk=7)
    err = rel_error(logits, hf_logits(reference, prompt[:80]))
    assert 1e-5 < err < 5e-2, err                                # int8 rounding, not a different function
    decoded = [runner.step([(seq, [t])])[0] for t in prompt[80:90]]     # one token a step: decode
    err = rel_error(torch.stack(decoded), hf_logits(reference, prompt[:90])[80:])
    assert err < 5e-2, err
    monkeypatch.setenv("KVOS_KV", "int8")
    assert load_program("tiny-llama", "cpu") is small            # the environment picks the same program
    with pytest.raises(KvosError, match="is not one of"):
        load_program("tiny-llama", "cpu", matmul="int8")         # an int8 cache, not int8 matmuls
    from userspace.programs.loader import _kv_dtype
    with pytest.raises(KvosError, match="runs on the cpu"):                 # no CUDA kernel stores it yet
        _kv_dtype("int8", torch.device("cuda"), torch.bfloat16)
