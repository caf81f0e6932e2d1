"""SmolLM2-135M-Instruct Q4_1 run on its own blocks (--weights gguf) against the same file dequantized
to float32 (the default path, itself exact against Hugging Face). Slow; CI runs it.

Measured (docs/programs.md): logits within a few percent of float32's norm (up to ~10%: int8
activations); perplexity on a fixed text within 1% of float32's; greedy continuations that agree
for a while, then drift where two tokens are nearly tied. The asserts are the tolerances stated there.
"""
import pytest
import torch

from tests.helpers.paged_runner import PagedRunner
from userspace.programs import qlinear
from userspace.programs.loader import load_program

pytestmark = pytest.mark.slow

TEXT = ("The operating system manages the computer's memory and processes, as well as all of its software and "
        "hardware. It also allows you to communicate with the computer without knowing how to speak the "
        "computer's language. Without an operating system, a computer is useless. Virtual memory gives each "
        "process the illusion of a large, private address space, while the kernel maps its pages to frames of "
        "physical memory and moves the least recently used ones to disk when memory runs short.")
CHATS = ["Write a short story about a fox who learns to share.", "Explain how virtual memory works.",
         "List five fruits and describe each one in a sentence.", "Why do caches make programs faster?",
         "What is the capital of France?", "Give me three tips for learning to code."]
NEW = 32
# Relative norm, any prefill position. ops.qmm rounds every GEMM's input to int8 per block of 32
# (as llama.cpp's CPU path does): measured median 0.032, max 0.098 (the int4 op's bf16 inputs:
# 0.010, 0.053); half of it comes from down_proj, whose input has the largest outliers. The max is
# noise-sensitive: int8 rounding flips on last-bit changes and the flips grow through 30 layers (the
# torch forward with its embedding scaled by 1 + 2^-22 moves its own logits by median 0.034, max
# 0.184; the fused C layer ops' rounding gave 0.030 / 0.164 against float32). So the max is bounded
# loosely and the median, which moved by 10% in both cases, tightly.
LOGIT_TOL = 0.25
MEDIAN_TOL = 0.05
PPL_TOL = 0.03          # relative perplexity difference on TEXT (measured below 0.01)


@pytest.fixture(scope="module")
def programs():
    return load_program("smollm2-135m", "cpu"), load_program("smollm2-135m", "cpu", weights="gguf")


def perplexity(program, ids):
    runner = PagedRunner(program)
    logits = runner.prefill(runner.new_seq(), ids)
    return torch.exp(torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]))).item()


def test_quantized_program_holds_blocks_not_floats(programs):
    _, quant = programs
    assert all(isinstance(layer.gate_up_t, qlinear.BlockLinear) and layer.gate_up_t.bits == 4
               and layer.gate_up_t.wide is None for layer in quant.layers)
    assert isinstance(quant.embed, qlinear.BlockTable) and quant.embed.head is not None


def int4_mode(quant):
    """The same program with every BlockLinear on the int4 op (the path before ops.qmm): a context
    manager, since it sets qlinear.QMM_MAX_ROWS for the program's calls."""
    import contextlib

    @contextlib.contextmanager
    def mode():
        names = ("qkv_t", "o_t", "gate_up_t", "down_t")
        saved = [(layer, n, getattr(layer, n)) for layer in quant.layers for n in names]
        head, rows = quant.embed.head, qlinear.QMM_MAX_ROWS
        try:
            for layer, n, w in saved:
                setattr(layer, n, w.with_int4_op())
            quant.embed.head, qlinear.QMM_MAX_ROWS = head.with_int4_op(), 0
            yield quant
        finally:
            for layer, n, w in saved:
                setattr(layer, n, w)
            quant.embed.head, qlinear.QMM_MAX_ROWS = head, rows
    return mode()


def test_logits_and_perplexity_against_float32(programs):
    exact, quant = programs
    ids = exact.encode(TEXT)
    r1, r2 = PagedRunner(exact), PagedRunner(quant)
    a, b = r1.prefill(r1.new_seq(), ids), r2.prefill(r2.new_seq(), ids)
    errors = ((a - b).norm(dim=1) / a.norm(dim=1))
    ppl_f, ppl_q = perplexity(exact, ids), perplexity(quant, ids)
    with int4_mode(quant):
        r3 = PagedRunner(quant)
        c = r3.prefill(r3.new_seq(), ids)
        ppl_4 = perplexity(quant, ids)
    errors_4 = ((a - c).norm(dim=1) / a.norm(dim=1))
    print(f"logits rel error vs float32: qmm median {errors.median():.4f} max {errors.max():.4f} "
          f"(max abs {(a - b).abs().max():.3f}), int4 op median {errors_4.median():.4f} max {errors_4.max():.4f} "
          f"(max abs {(a - c).abs().max():.3f}); perplexity float32 {ppl_f:.3f} gguf qmm {ppl_q:.3f} "
          f"gguf int4 op {ppl_4:.3f}")
    assert errors.max() < LOGIT_TOL
    assert errors.median() < MEDIAN_TOL
    assert abs(ppl_q - ppl_f) / ppl_f < PPL_TOL


def test_greedy_agreement_over_chats(programs):
    exact, quant = programs
    prompts = [exact.apply_chat_template([{"role": "user", "content": c}]) for c in CHATS]
    outs_f, _ = PagedRunner(exact).greedy(prompts, NEW)
    outs_q, _ = PagedRunner(quant).greedy(prompts, NEW)
    prefix = [next((i for i, (x, y) in enumerate(zip(f, q)) if x != y), NEW) for f, q in zip(outs_f, outs_q)]
    same = sum(x == y for f, q in zip(outs_f, outs_q) for x, y in zip(f, q))
    print(f"greedy: identical prefixes {prefix} of {NEW}; {same} of {NEW * len(CHATS)} tokens equal "
          "position by position")
    # The quantized model's own continuation is likely under the float32 model: it is the same model.
    for p, q in zip(prompts, outs_q):
        ids = p + q
        runner = PagedRunner(exact)
        logits = runner.prefill(runner.new_seq(), ids)[len(p) - 1:-1]
        ranks = (logits > logits.gather(1, torch.tensor(q)[:, None])).sum(1)
        assert (ranks <= 4).float().mean() > 0.9        # float32 ranks quantized greedy tokens in its top 5
    assert sum(prefix) / len(prefix) >= 4
    with int4_mode(quant):
        outs_4, _ = PagedRunner(quant).greedy(prompts, NEW)
    prefix_4 = [next((i for i, (x, y) in enumerate(zip(f, q)) if x != y), NEW) for f, q in zip(outs_4, outs_q)]
    same_4 = sum(x == y for f, q in zip(outs_4, outs_q) for x, y in zip(f, q))
    prefix_4f = [next((i for i, (x, y) in enumerate(zip(f, q)) if x != y), NEW) for f, q in zip(outs_f, outs_4)]
    print(f"greedy qmm vs int4 op: identical prefixes {prefix_4}, {same_4} tokens equal; "
          f"int4 op vs float32: prefixes {prefix_4f}")


def test_the_layer_loop_in_c_gives_the_python_loops_bits(programs):
    """The quantized program's layers run as one C call (csrc/cpu/layers.c) at every row count (no wide
    forms): a prefill's and two decode steps' logits equal the Python loop's (the same qmm, attention
    and fused kernels, one call each) to the bit."""
    import copy
    _, quant = programs
    assert quant.layer_weights is not None and quant.layer_rows is None
    plain = copy.copy(quant)
    plain.layer_weights = None
    ids = quant.encode(TEXT)[:70]
    outs = []
    for program in (quant, plain):
        runner = PagedRunner(program)
        seq = runner.new_seq()
        steps = [runner.prefill(seq, ids)]
        steps += [runner.step([(seq, [ids[i]])]) for i in (5, 6)]
        outs.append(torch.cat(steps))
    assert torch.equal(outs[0], outs[1])


def test_an_int8_kv_cache_against_float32(programs):
    """kv=int8 (rows of int8 codes and a float32 scale) on the exact program and on the quantized one:
    measured on this text, the float32 program's logits move by a median 0.012 (max 0.063) of their
    norm and its perplexity by +0.06%; the gguf program with int8 K/V stays as close to float32 as
    the gguf program itself (median 0.029 against 0.031), so the tolerances are the gguf ones."""
    exact, quant = programs
    exact8 = load_program("smollm2-135m", "cpu", kv="int8")
    quant8 = load_program("smollm2-135m", "cpu", weights="gguf", kv="int8")
    assert exact8.kv_shape.bytes_per_token * 64 * 4 == exact.kv_shape.bytes_per_token * 68
    ids = exact.encode(TEXT)

    def prefill(program):
        runner = PagedRunner(program)
        return runner.prefill(runner.new_seq(), ids)

    a, a8, b8 = prefill(exact), prefill(exact8), prefill(quant8)
    err_exact = (a - a8).norm(dim=1) / a.norm(dim=1)
    err_quant = (a - b8).norm(dim=1) / a.norm(dim=1)
    ppl, ppl8, pplq8 = perplexity(exact, ids), perplexity(exact8, ids), perplexity(quant8, ids)
    print(f"int8 K/V: float32 program median {err_exact.median():.4f} max {err_exact.max():.4f}; gguf "
          f"program vs float32 median {err_quant.median():.4f} max {err_quant.max():.4f}; perplexity "
          f"{ppl:.3f} / {ppl8:.3f} / {pplq8:.3f}")
    assert err_exact.median() < 0.03 and err_exact.max() < 0.15
    assert err_quant.median() < MEDIAN_TOL and err_quant.max() < LOGIT_TOL
    assert abs(ppl8 - ppl) / ppl < 0.01 and abs(pplq8 - ppl) / ppl < PPL_TOL
    prompts = [exact.apply_chat_template([{"role": "user", "content": c}]) for c in CHATS[:3]]
    outs8, _ = PagedRunner(exact8).greedy(prompts, NEW)
    for p, q in zip(prompts, outs8):        # float32 ranks the int8-K/V greedy tokens in its top 5
        runner = PagedRunner(exact)
        logits = runner.prefill(runner.new_seq(), p + q)[len(p) - 1:-1]
        ranks = (logits > logits.gather(1, torch.tensor(q)[:, None])).sum(1)
        assert (ranks <= 4).float().mean() > 0.9


def test_a_k_quant_mix_runs_on_blocks(tmp_path, monkeypatch):
    """A Q4_K_M file as llama.cpp's own quantizer writes it (from the Q4_1 file; SmolLM2's 576 columns
    leave most tensors on Q5_0 / Q8_0 fallbacks, and ffn_down on Q4_K and Q6_K): every projection is
    a BlockLinear (Q5_0 q/k fused with a Q8_0 v in the 8-bit layout, Q6_K requantized to Q8_0), the
    C layer loop runs, and the logits stay within the Q4_1 file's tolerances of the same file in
    float32. Needs llama-cpp-python (the bench extra) for the quantizer."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    from gguf import GGUFReader

    from userspace.programs import fetch
    monkeypatch.setenv("KVOS_CACHE_DIR", str(tmp_path / "cache"))
    source, _ = fetch.model_file("smollm2-135m", progress=False)
    path = tmp_path / "smollm2-q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, True, 2
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(path).encode(), ctypes.byref(params)) == 0
    assert {"Q6_K", "Q4_K", "Q5_0", "Q8_0"} <= {t.tensor_type.name for t in GGUFReader(path).tensors}
    exact, quant = load_program(str(path), "cpu"), load_program(str(path), "cpu", weights="gguf")
    names = ("qkv_t", "o_t", "gate_up_t", "down_t")
    assert all(isinstance(getattr(layer, n), qlinear.BlockLinear) for layer in quant.layers for n in names)
    assert quant.layer_weights is not None
    ids = exact.encode(TEXT)
    r1, r2 = PagedRunner(exact), PagedRunner(quant)
    a, b = r1.prefill(r1.new_seq(), ids), r2.prefill(r2.new_seq(), ids)
    errors = (a - b).norm(dim=1) / a.norm(dim=1)
    print(f"Q4_K_M on blocks vs the same file in float32: logits median {errors.median():.4f} max {errors.max():.4f}")
    assert errors.median() < MEDIAN_TOL and errors.max() < LOGIT_TOL
    assert abs(perplexity(quant, ids) - perplexity(exact, ids)) / perplexity(exact, ids) < PPL_TOL
