"""SmolLM2-135M-Instruct end to end against transformers loading the same GGUF (slow; CI runs it).

Greedy decoding of chat prompts, 64 new tokens each, must be identical token for
token to HF's LlamaForCausalLM.generate, with logits within 1e-4 relative at
every step, whether the prompts are fed whole or in chunks of 1, 7 or 64 tokens
and when a sequence maps another's prefix pages instead of recomputing them.
"""
import pytest
import torch

from kernel.errors import KvosError
from tests.helpers.hf_reference import rel_error
from tests.helpers.paged_runner import PagedRunner
from userspace.programs import fetch
from userspace.programs.loader import load_program

pytestmark = pytest.mark.slow

TOL = 1e-4
NEW_TOKENS = 64
SYSTEM = "You are a helpful assistant who explains computer systems to curious students in plain words."
CHATS = [
    [{"role": "user", "content": "Write a short story about a fox who learns to share."}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Explain how virtual memory works."}],
    [{"role": "user", "content": "List five fruits and describe each one in a sentence."}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Why do caches make programs faster?"}],
]
TEXTS = ["Hello, world!", "  leading spaces and\ttabs\nnewlines\n\n", "héllo wörld, naïve café",
         "你好，世界。こんにちは", "emoji 🙂🚀 and math ∑∫√",
         "def f(x):\n    return x ** 2  # code", "<|im_start|>user\nhi<|im_end|>",
         "numbers 1234567890 3.14159", "ALL CAPS and MiXeD cAsE", ""]


@pytest.fixture(scope="module")
def program():
    return load_program("smollm2-135m", "cpu")


@pytest.fixture(scope="module")
def gguf_path(program):
    return fetch.model_file("smollm2-135m")[0]


@pytest.fixture(scope="module")
def hf(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def prompts(program, hf):
    tok, _ = hf
    out = []
    for chat in CHATS:
        ids = program.apply_chat_template(chat)
        assert ids == list(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"])
        out.append(ids)
    return out


@pytest.fixture(scope="module")
def reference(hf, prompts):
    """HF greedy continuation of each prompt, and HF's logits at each of those steps."""
    _, model = hf
    refs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            new = out[0, len(ids):].tolist()
            logits = model(torch.tensor([ids + new[:-1]])).logits[0, len(ids) - 1:]
            refs.append((new, logits))
    return refs


def test_tokenizer_matches_hf(program, hf):
    tok, _ = hf
    for text in TEXTS:
        ids = program.encode(text)
        assert ids == tok(text, add_special_tokens=False)["input_ids"], text
        assert program.decode(ids) == tok.decode(ids, skip_special_tokens=True)
    assert program.vocab_size == 49152 and program.eos_token_ids == frozenset({2})


def test_a_continued_final_message_matches_hf(program, hf):
    """continue_final_message (the tokenize syscall's, kvosd's): transformers' ids for the same chat."""
    from kernel.chat import open_final_message_text
    tok, _ = hf
    for content in ("The best fruit is", "Sure: ", "", CHATS[0][0]["content"]):
        chat = CHATS[0] + [{"role": "assistant", "content": content}]
        want = list(tok.apply_chat_template(chat, continue_final_message=True, tokenize=True)["input_ids"])
        assert program.encode(open_final_message_text(program, chat)) == want, content


def test_model_facts(program):
    c = program.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 9, 3, 64)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and program.max_context == 8192
    assert program.kv_shape.bytes_per_token == 2 * 30 * 3 * 64 * 4


def test_the_simulators_preset_is_this_model(program):
    """"smollm2-135m" on a sim device is the same shape and size as the GGUF on the cpu."""
    from dataclasses import replace

    from userspace.programs.sim import PRESETS
    preset = PRESETS["smollm2-135m"].config
    assert program.config.rms_norm_eps == pytest.approx(preset.rms_norm_eps)       # the GGUF's is float32
    assert replace(program.config, rms_norm_eps=preset.rms_norm_eps, torch_dtype=preset.torch_dtype) == preset
    assert program.cost.num_params == preset.active_params and preset.total_params == 134_515_008


@pytest.mark.parametrize("chunk", [None, 1, 7, 64])
def test_greedy_matches_hf(program, prompts, reference, chunk):
    """All prompts run side by side, prompts fed whole or in chunks, then decoded together."""
    runner = PagedRunner(program, num_frames=64)
    news, logits = runner.greedy(prompts, NEW_TOKENS, chunk=chunk, stop_ids=program.eos_token_ids)
    for (ref_new, ref_logits), new, ours in zip(reference, news, logits):
        assert new == ref_new
        assert rel_error(ours, ref_logits) < TOL
    assert sum(len(n) for n in news) >= 3 * NEW_TOKENS           # long answers, not early stops


def test_shared_prefix_pages(program, hf, prompts, reference):
    """Chat 3 maps chat 1's full pages of their common system prompt and computes only the rest."""
    _, model = hf
    a, b = prompts[1], prompts[3]
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    runner = PagedRunner(program, num_frames=64)
    parent = runner.new_seq()
    runner.prefill(parent, a)
    child = runner.fork(parent, common)
    assert child.length >= 16 and child.frames == parent.frames[:child.length // 16]
    (new,), (logits,) = _continue(runner, child, b[child.length:], NEW_TOKENS, program.eos_token_ids)
    ref_new, ref_logits = reference[3]
    assert new == ref_new
    assert rel_error(logits, ref_logits) < TOL


def _continue(runner, seq, rest, num_new, stop_ids):
    """Greedy decode of seq after feeding the rest of its prompt (its prefix already in the cache)."""
    rows = [runner.step([(seq, rest)])[0]]
    new = [int(rows[0].argmax())]
    while len(new) < num_new and new[-1] not in stop_ids:
        rows.append(runner.step([(seq, [new[-1]])])[0])
        new.append(int(rows[-1].argmax()))
    return [new], [torch.stack(rows)]


def test_truncated_copy_is_eio(tmp_path, monkeypatch, gguf_path):
    monkeypatch.setenv("KVOS_CACHE_DIR", str(tmp_path / "cache"))
    cut = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as src:
        cut.write_bytes(src.read(40_000_000))
    with pytest.raises(KvosError, match="^EIO: .*truncated GGUF"):
        load_program(str(cut))
