"""kernel/ops/step_ops.py: the CPU forward's fused C ops, checked once a step. The fused forward
against the forward in torch ops (LlamaProgram.forward_torch) on tiny-llama; bad per-layer tensors,
norm weights and indices refused with EINVAL before anything is written."""
import pytest
import torch

from kernel.devices.torchdev import TorchDevice
from kernel.errors import KvosError
from kernel.ops.step_ops import CpuStep, LayerWeights, NormWeights
from kernel.program import exec_program
from tests.helpers.hf_reference import rel_error
from tests.helpers.paged_runner import PagedRunner
from userspace.programs import qlinear


@pytest.fixture(scope="module")
def program():
    return exec_program("tiny-llama", TorchDevice("cpu"))


def _prefill_then_decode(program, forward):
    """Logits of a 40-token prefill, then of 3 decode steps of two sequences, through `forward`."""
    runner = PagedRunner(program, num_frames=64, page_size=16, seed=3)
    runner.program = type("P", (), {"forward": lambda self, b, kv: forward(b, kv)})()
    a, b = runner.new_seq(), runner.new_seq()
    out = [runner.step([(a, list(range(5, 45))), (b, list(range(50, 61)))], sample_all=True)]
    for t in range(3):
        out.append(runner.step([(a, [100 + t]), (b, [200 + t])]))
    return torch.cat(out)


def test_fused_forward_matches_the_torch_forward(program):
    assert program.norms is not None      # float32 on the CPU: the fused path is the forward
    fused = _prefill_then_decode(program, program.forward)
    plain = _prefill_then_decode(program, torch.inference_mode()(program.forward_torch))
    assert rel_error(fused, plain) < 1e-5


def _python_loop(program):
    """The program with its layer loop in Python (the C loop's twin: the same kernels, one call each)."""
    import copy
    plain = copy.copy(program)
    plain.layer_weights = None
    return plain


def test_the_layer_loop_in_c_gives_the_python_loops_bits(program):
    """csrc/cpu/layers.c runs the kernels the Python loop calls, in its order, on its buffers: the
    logits of a prefill and of decode steps are the same to the bit."""
    assert program.layer_weights is not None and program.layer_rows is None     # float32 panels: every step
    assert torch.equal(_prefill_then_decode(program, program.forward),
                       _prefill_then_decode(program, _python_loop(program).forward))


@pytest.mark.parametrize("part, dtype", [("matmul", "bfloat16"), ("kv", "bfloat16"), ("kv", "int8")])
def test_the_layer_loop_in_c_in_bf16_gives_the_python_loops_bits(part, dtype):
    """bf16 matmuls (float32 activations): the loop hands panel_mm_bf16 float32 rows to round, the
    Python loop rounds them with torch first; both round to nearest even, so the logits agree to the
    bit. A bf16 KV cache: the loop addresses its layers in 2-byte elements; an int8 one in bytes,
    rows of codes and their scale."""
    from userspace.programs.loader import load_program
    program = load_program("tiny-llama", "cpu", **{part: dtype})
    assert program.layer_weights is not None
    want = getattr(torch, dtype)
    assert (program.layers[0].qkv_t.dtype if part == "matmul" else program.kv_dtype) == want
    assert torch.equal(_prefill_then_decode(program, program.forward),
                       _prefill_then_decode(program, _python_loop(program).forward))


def test_layer_weights_refuse_what_the_loop_cannot_run(program):
    c = program.config
    dims = dict(hidden=c.hidden_size, inter=c.intermediate_size, num_heads=c.num_attention_heads,
                kv_heads=c.num_key_value_heads, head_dim=c.head_dim)
    layer = program.layers[0]
    good = [qlinear.c_gemm(w)[:6] for w in (layer.qkv_t, layer.o_t, layer.gate_up_t, layer.down_t)]
    LayerWeights([good], **dims)
    swapped = [good[1], good[0], good[2], good[3]]
    bad_bias = [good[0][:5] + (torch.randn(3),), *good[1:]]
    wrong_kind = [("int4",) + good[0][1:], *good[1:]]
    for match, layers in (("the model's", [swapped]), ("bias", [bad_bias]), ("kind", [wrong_kind]),
                          ("GEMMs", [good[:3]])):
        with pytest.raises(KvosError, match=match):
            LayerWeights(layers, **dims)
    runner = PagedRunner(program, num_frames=4)
    step = _step(program, runner)
    with pytest.raises(KvosError, match="rms_norm"):
        step.layers(program.layer_weights, torch.randn(2, c.hidden_size))
    x = torch.randn(2, c.hidden_size)
    step.rms_norm(x, 0)
    with pytest.raises(KvosError, match="same x"):
        step.layers(program.layer_weights, x.clone())
    with pytest.raises(KvosError, match="norm weights"):
        step.layers(LayerWeights([good], **dims), x)


def test_the_layer_loop_refuses_bad_indices_before_writing(program):
    runner = PagedRunner(program, num_frames=4)
    c = program.config
    pool = runner.device.pool.clone()
    for where, value, match in (("positions", program.rope.cos.shape[0], "positions"), ("slots", 10**6, "slot_mapping"),
                                ("page_table", 99, "page_table")):
        step = _step(program, runner)
        getattr(step, where).view(-1)[-1] = value
        x = torch.randn(2, c.hidden_size)
        step.rms_norm(x, 0)
        with pytest.raises(KvosError, match=match):
            step.layers(program.layer_weights, x)
        if where != "page_table":           # the cache write comes before attention's check, as in the Python loop
            assert torch.equal(runner.device.pool, pool)


def _step(program, runner, n=2):
    c = program.config
    pos = torch.arange(n)
    return CpuStep(num_tokens=n, hidden=c.hidden_size, eps=c.rms_norm_eps, norms=program.norms,
                   num_heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                   inter=c.intermediate_size, cos=program.rope.cos, sin=program.rope.sin, positions=pos,
                   slot_mapping=pos.to(torch.int32), page_table=torch.zeros(1, 1, dtype=torch.int32),
                   query_start=torch.tensor([0, n], dtype=torch.int32),
                   context_lens=torch.tensor([n], dtype=torch.int32), scale=0.1, kv=runner.kv)


def test_bad_per_layer_tensors_are_refused_before_writing(program):
    runner = PagedRunner(program, num_frames=4)
    c = program.config
    step = _step(program, runner)
    x = torch.randn(2, c.hidden_size)
    pool = runner.device.pool.clone()
    qkv_width = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    step.rms_norm(x, 0)
    x_before = x.clone()
    for call, bad in ((lambda t: step.add_rms_norm(t, 0), torch.randn(2, c.hidden_size + 1)),
                      (lambda t: step.add_rms_norm(t, 0), torch.randn(2, c.hidden_size, dtype=torch.float64)),
                      (lambda t: step.add_rms_norm(t, 0), torch.randn(2, 2 * c.hidden_size)[:, ::2]),
                      (lambda t: step.rope_write_kv(0, t), torch.randn(3, qkv_width)),
                      (lambda t: step.rope_write_kv(0, t), torch.randn(2, qkv_width).bfloat16()),
                      (lambda t: step.silu_mul(t), torch.randn(2, c.intermediate_size)),
                      (lambda t: step.rms_norm(t, 0), torch.randn(2, c.hidden_size, 3))):
        with pytest.raises(KvosError) as e:
            call(bad)
        assert e.value.errno == "EINVAL"
    assert torch.equal(x, x_before) and torch.equal(runner.device.pool, pool)


def test_bad_indices_and_weights_are_refused(program):
    runner = PagedRunner(program, num_frames=4)
    c = program.config
    step = _step(program, runner)
    qkv = torch.randn(2, (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim)
    before = (qkv.clone(), runner.device.pool.clone())
    with pytest.raises(KvosError, match="rope_write_kv"):
        step.attention(0)                                   # no q yet
    step.positions[1] = program.rope.cos.shape[0]          # past the RoPE tables
    with pytest.raises(KvosError, match="positions"):
        step.rope_write_kv(0, qkv)
    step.positions[1], step.slots[0] = 1, 10**6              # outside the pool
    with pytest.raises(KvosError, match="slot_mapping"):
        step.rope_write_kv(0, qkv)
    assert torch.equal(qkv, before[0]) and torch.equal(runner.device.pool, before[1])
    step.slots[0] = 0
    step.rope_write_kv(0, qkv)
    step.page_table[0, 0] = 99                              # not a frame of the pool
    step.attn.fill_(-3.0)            # a known value: the buffer is torch.empty's, NaN != NaN
    attn_before = step.attn.clone()
    with pytest.raises(KvosError, match="page_table"):
        step.attention(0)
    assert torch.equal(step.attn, attn_before)
    for bad in ([torch.randn(c.hidden_size + 1)], [torch.randn(c.hidden_size).double()],
                [torch.randn(2 * c.hidden_size)[::2]]):
        with pytest.raises(KvosError):
            NormWeights(bad, c.hidden_size)
    with pytest.raises(KvosError):
        _step(program, runner, n=0).rope_write_kv(0, qkv)


def test_kvos_layer_loop_picks_the_loop(monkeypatch):
    monkeypatch.setenv("KVOS_LAYER_LOOP", "python")
    assert exec_program("tiny-llama", TorchDevice("cpu")).layer_weights is None
    monkeypatch.setenv("KVOS_LAYER_LOOP", "fast")
    with pytest.raises(KvosError, match="KVOS_LAYER_LOOP"):
        exec_program("tiny-llama", TorchDevice("cpu"))
