"""Quantized weights (--weights gguf): the int4 op against its twin, GGUF block decoding against the
gguf library, and a tiny GGUF model in Q4_0 / Q4_1 / Q8_0 / F16 against the same weights in float32.

Tolerances, and why: qmm (tests/test_ops_qmm.py for the op itself) rounds each activation to int8
per block of 32 (at most half a step, amax / 254), the int4 op rounds activations and the block
scales to bf16 (2^-9 relative) and returns bf16. One layer therefore agrees with x @ W^T of its
dequantized weights to 1e-2 of the output's norm; a whole tiny model's logits with the dequantized
float32 program to 3e-2 (measured: below 1e-2).
"""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize, quantize

from kernel import ops
from kernel.errors import KvosError
from kernel.ops import reference
from tests.helpers.paged_runner import PagedRunner
from tests.helpers.tiny_gguf import write_gguf
from userspace.programs import gguf_blocks, qlinear, tiny
from userspace.programs.loader import load_program

PROMPT = list(range(3, 60, 2))


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("m", [1, 7, 64])
def test_int4_mm_matches_its_twin(m):
    g = torch.Generator().manual_seed(m)
    n, k = 96, 192
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    sz = torch.randn(k // 32, n, 2, generator=g).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    out = ops.int4_mm(x, ops.int4_pack(codes), sz, 32)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert rel(out, reference.int4_mm(x, codes, sz, 32)) < 1e-2


def test_int4_ops_refuse_bad_arguments():
    codes = torch.randint(0, 16, (32, 64), dtype=torch.int32)
    with pytest.raises(KvosError, match="0..15"):
        ops.int4_pack(codes + 1)
    with pytest.raises(KvosError, match="n % 16"):
        ops.int4_pack(codes[:8])
    packed, sz = ops.int4_pack(codes), torch.zeros(2, 32, 2, dtype=torch.bfloat16)
    with pytest.raises(KvosError, match="bf16"):
        ops.int4_mm(torch.zeros(1, 64), packed, sz, 32)
    with pytest.raises(KvosError, match="packed"):
        ops.int4_mm(torch.zeros(1, 128, dtype=torch.bfloat16), packed, sz, 32)
    with pytest.raises(KvosError, match="scale_zeros"):
        ops.int4_mm(torch.zeros(1, 64, dtype=torch.bfloat16), packed, sz[:1], 32)


class _Tensor:          # what gguf_blocks.decode reads of a GGUFReader tensor
    def __init__(self, data, kind, shape):
        self.data, self.tensor_type, self.shape, self.name = data, kind, shape, "t"


@pytest.mark.parametrize("kind", [T.Q4_0, T.Q4_1, T.Q8_0, T.Q5_0, T.Q5_1, T.F16])
def test_blocks_decode_to_what_the_gguf_library_dequantizes(kind):
    k = 128
    w = np.random.default_rng(int(kind)).standard_normal((48, k)).astype(np.float32)
    data = w.astype(np.float16) if kind == T.F16 else quantize(w, kind)
    part = gguf_blocks.decode(_Tensor(data, kind, [k, 48]))
    assert part[0] == {T.Q4_0: "int4", T.Q4_1: "int4", T.Q5_0: "u8", T.Q5_1: "u8", T.Q8_0: "int8"}.get(kind, "float")
    want = torch.from_numpy(np.asarray(dequantize(data, kind), dtype=np.float32))
    assert torch.allclose(gguf_blocks.dequantize_part(part), want, rtol=1e-6, atol=1e-6)
    layer = gguf_blocks.linear(part)
    if isinstance(layer, qlinear.BlockLinear):          # the blocks as stored: fp16 d and m, exact
        assert torch.equal(layer.dequantize(), want)
        if kind in (T.Q4_0, T.Q4_1, T.Q8_0):
            assert rel(layer.with_int4_op().wide.dequantize(), want) < 5e-3    # the int4 op's form: bf16 scales
        else:
            assert layer.with_int4_op().wide is None    # Q5_x: never held by the int4 op
    else:
        assert rel(layer.dequantize(), want) < 5e-3     # bf16 panels
    x = torch.randn(5, k)
    # qmm rounds x to int8 per block (2^-8 of the block's amax at worst), the int4 op to bf16
    assert rel(layer.mm(x), x @ layer.dequantize().t()) < 1e-2


@pytest.mark.parametrize("kind", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_block_linear_switches_to_the_int4_op_past_qmm_max_rows(kind, monkeypatch):
    w = np.random.default_rng(int(kind)).standard_normal((48, 128)).astype(np.float32)
    layer = gguf_blocks.linear(gguf_blocks.decode(_Tensor(quantize(w, kind), kind, [128, 48])))
    assert layer.wide is None
    layer = layer.with_int4_op()
    x = torch.randn(6, 128)
    q, dx = reference.qmm_quantize_rows(x)
    codes, d, m = ops.qmm_unpack(layer.packed, 48, 128, layer.bits)
    monkeypatch.setattr(qlinear, "QMM_MAX_ROWS", 6)
    small = layer.mm(x)
    assert small.dtype == torch.float32 and torch.allclose(small, reference.qmm(x, codes, d, m), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(qlinear, "QMM_MAX_ROWS", 5)
    big = layer.mm(x)
    assert torch.equal(big, layer.wide.mm(x)) and not torch.equal(big.float(), small)
    assert rel(big, small) < 2e-2


def _model(tmp_path, monkeypatch, matrix_type, **overrides):
    monkeypatch.setenv("KVOS_CACHE_DIR", str(tmp_path / "cache"))
    config = tiny.tiny_config(**overrides)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, config, tiny.tiny_weights(config, 5), tiny.tiny_tokenizer(), matrix_type=matrix_type)
    return path


MIXES = {
    "q4_0": lambda name: T.Q4_0,
    "q4_1+q8_0 embed": lambda name: T.Q8_0 if "embed" in name or "lm_head" in name else T.Q4_1,
    "q8_0": lambda name: T.Q8_0,
    "mixed q/k/v": lambda name: T.Q4_1 if "q_proj" in name else (T.F16 if "v_proj" in name else T.Q8_0),
    "q5_0 + q5_1": lambda name: T.Q5_1 if "mlp" in name else T.Q5_0,
    # llama.cpp's _M mixes: q, k and v (gate and up) of different block types in one fused matrix
    "q5_0 q/k + q8_0 v, q4_1 gate + q5_1 up": lambda name: (
        T.Q8_0 if "v_proj" in name else T.Q5_0 if "self_attn" in name else T.Q4_1 if "gate" in name
        else T.Q5_1 if "up_proj" in name else T.Q4_0),
}


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_quantized_matches_its_dequantized_float32(tmp_path, monkeypatch, mix, tied):
    path = _model(tmp_path, monkeypatch, MIXES[mix], tie_word_embeddings=tied)
    exact = load_program(str(path), "cpu", weights="float32")
    quant = load_program(str(path), "cpu", weights="gguf")
    assert quant is not exact and quant.identity != exact.identity
    kinds = {type(layer.qkv_t) for layer in quant.layers} | {type(layer.down_t) for layer in quant.layers}
    assert kinds <= {qlinear.BlockLinear, qlinear.PanelLinear} and torch.Tensor not in kinds
    if mix != "mixed q/k/v":        # every projection on its own blocks (Q5_x in the 8-bit layout)
        assert kinds == {qlinear.BlockLinear}
    held = qlinear.read_bytes(quant.layers, quant.lm_head, quant.norm)
    assert quant.cost.weight_bytes == held < exact.cost.weight_bytes / 2
    r1, r2 = PagedRunner(exact), PagedRunner(quant)
    want = r1.prefill(r1.new_seq(), PROMPT, chunk=7)
    got = r2.prefill(r2.new_seq(), PROMPT, chunk=7)
    assert rel(got, want) < 3e-2, rel(got, want)
    print(f"{mix} tied={tied}: prefill logits rel error {rel(got, want):.4f}")
    # Decode steps (M = 1) too: greedy continuations of a batch of three.
    outs_q, logits_q = PagedRunner(quant).greedy([PROMPT, PROMPT[:5], PROMPT[3:20]], 6)
    outs_f, logits_f = PagedRunner(exact).greedy([PROMPT, PROMPT[:5], PROMPT[3:20]], 6)
    assert rel(logits_q[0][0], logits_f[0][0]) < 3e-2


def test_quantized_cache_holds_no_float32_matrices_and_reloads_the_same(tmp_path, monkeypatch):
    import gc

    from safetensors import safe_open
    path = _model(tmp_path, monkeypatch, MIXES["q4_1+q8_0 embed"], tie_word_embeddings=True)
    program = load_program(str(path), "cpu", weights="gguf")
    runner = PagedRunner(program)
    first = runner.prefill(runner.new_seq(), PROMPT)
    assert not (tmp_path / "cache" / "converted").exists()          # no float32 conversion at all
    (folder,) = (tmp_path / "cache" / "quantized").iterdir()
    with safe_open(folder / "weights.safetensors", "pt") as f:
        for key in f.keys():
            if f.get_slice(key).get_dtype() == "F32":
                assert len(f.get_slice(key).get_shape()) == 1, key   # only norms are float32
        # the tied Q8_0 embedding is held once: its blocks are the head's
        assert all(key.startswith("embed:blocks.") for key in f.keys() if key.startswith("embed:"))
        assert not [key for key in f.keys() if key.startswith("lm_head")]
    assert program.embed.head is program.embed.blocks and program.lm_head is program.embed
    exact = load_program(str(path), "cpu", weights="float32")
    ids = torch.arange(program.embed.shape[0])
    assert torch.equal(qlinear.embedding(ids, program.embed), qlinear.embedding(ids, exact.embed))
    del program, runner
    gc.collect()
    again = load_program(str(path), "cpu", weights="gguf")          # from quantized/, not the GGUF
    runner = PagedRunner(again)
    assert torch.equal(runner.prefill(runner.new_seq(), PROMPT), first)


def test_float_matrices_are_bf16_panels_that_the_c_layer_loop_runs_and_the_cache_keeps(tmp_path, monkeypatch):
    """An F16 v fused with block q and k: the matrix is float, held in bf16 panels (ops.panel_mm), so
    the program still runs its layers as one C call; reloaded from the quantized cache, the same bits."""
    import gc
    path = _model(tmp_path, monkeypatch, MIXES["mixed q/k/v"])
    program = load_program(str(path), "cpu", weights="gguf")
    assert all(isinstance(layer.qkv_t, qlinear.PanelLinear) and layer.qkv_t.dtype == torch.bfloat16
               for layer in program.layers)
    assert program.layer_weights is not None
    runner = PagedRunner(program)
    first = runner.prefill(runner.new_seq(), PROMPT)
    del program, runner
    gc.collect()
    again = load_program(str(path), "cpu", weights="gguf")
    assert isinstance(again.layers[0].qkv_t, qlinear.PanelLinear)
    runner = PagedRunner(again)
    assert torch.equal(runner.prefill(runner.new_seq(), PROMPT), first)


@pytest.mark.parametrize("tied", [False, True])
def test_a_4_bit_embedding_stays_in_its_blocks(tmp_path, monkeypatch, tied):
    """A Q4_1 token table: a BlockTable over 4-bit blocks (not a float32 table), the head too when
    tied; lookups give the float32 program's rows exactly."""
    path = _model(tmp_path, monkeypatch, lambda name: T.Q4_1, tie_word_embeddings=tied)
    quant, exact = load_program(str(path), "cpu", weights="gguf"), load_program(str(path), "cpu", weights="float32")
    assert isinstance(quant.embed, qlinear.BlockTable) and quant.embed.blocks.bits == 4
    assert (quant.lm_head is quant.embed) == tied
    ids = torch.arange(quant.embed.shape[0])
    assert torch.equal(qlinear.embedding(ids, quant.embed), qlinear.embedding(ids, exact.embed))
    r1, r2 = PagedRunner(exact), PagedRunner(quant)
    assert rel(r2.prefill(r2.new_seq(), PROMPT), r1.prefill(r1.new_seq(), PROMPT)) < 3e-2


@pytest.mark.parametrize("damage", ["weights", "kinds"])
def test_a_damaged_cache_folder_is_rebuilt_once(tmp_path, monkeypatch, damage):
    """A quantized/ folder that cannot be read (a truncated weights file; a layer kind this build does
    not know, as a cache written by another build of the same format has) is converted again and
    replaced: the load after that reads the cache, rather than every load converting the file."""
    import gc
    import json
    path = _model(tmp_path, monkeypatch, MIXES["q4_0"])
    conversions = []
    canonical = gguf_blocks.canonical
    monkeypatch.setattr(gguf_blocks, "canonical", lambda *a: conversions.append(1) or canonical(*a))

    def load():
        program = load_program(str(path), "cpu", weights="gguf")
        runner = PagedRunner(program)
        logits = runner.prefill(runner.new_seq(), PROMPT)
        del program, runner
        gc.collect()                        # programs are shared while alive: the next load builds anew
        return logits

    want = load()
    (folder,) = (tmp_path / "cache" / "quantized").iterdir()
    if damage == "weights":
        weights = folder / "weights.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        meta = json.loads((folder / "program.json").read_text())
        meta["kinds"] = {name: "q8table+head:" + kind for name, kind in meta["kinds"].items()}
        (folder / "program.json").write_text(json.dumps(meta))
    assert torch.equal(load(), want) and len(conversions) == 2         # damaged: converted again
    assert torch.equal(load(), want) and len(conversions) == 2         # and the folder replaced
    assert [p.name for p in (tmp_path / "cache" / "quantized").iterdir()] == [folder.name]


def test_weights_option_is_checked(tmp_path, monkeypatch):
    with pytest.raises(KvosError, match="not one of"):
        load_program("tiny-llama", "cpu", weights="int3")
    with pytest.raises(KvosError, match="has none"):
        load_program("tiny-llama", "cpu", weights="gguf")
    monkeypatch.setenv("KVOS_WEIGHTS", "gguf")
    with pytest.raises(KvosError, match="has none"):
        load_program("tiny-llama", "cpu")


def test_gguf_reader_sees_the_requested_types(tmp_path, monkeypatch):
    path = _model(tmp_path, monkeypatch, MIXES["q4_0"])
    types = {t.tensor_type for t in GGUFReader(path).tensors if len(t.shape) == 2}
    assert types == {T.Q4_0}


# K-quant super-blocks of 256 values: bytes a block, offsets of their fp16 d (and dmin)
K_QUANTS = {T.Q4_K: (144, (0, 2)), T.Q5_K: (176, (0, 2)), T.Q6_K: (210, (208,)), T.Q3_K: (110, (108,)),
            T.Q2_K: (84, (80, 82))}


def _k_quant_blocks(kind, rows=32, k=512, seed=0):
    """gguf-py cannot write K-quants, so the blocks are random bytes with sane fp16 d and dmin."""
    rng = np.random.default_rng(seed)
    size, offsets = K_QUANTS[kind]
    raw = rng.integers(0, 256, (rows, k // 256, size), dtype=np.uint8)
    for offset in offsets:
        scales = rng.uniform(0.001, 0.02, (rows, k // 256)).astype(np.float16)
        raw[..., offset:offset + 2] = scales.view(np.uint8).reshape(rows, k // 256, 2)
    data = raw.reshape(rows, -1)
    return data, torch.from_numpy(np.asarray(dequantize(data, kind), dtype=np.float32))


@pytest.mark.parametrize("kind", [T.Q4_K, T.Q5_K])
def test_k_quant_blocks_decode_to_what_the_gguf_library_dequantizes(kind):
    data, want = _k_quant_blocks(kind)
    part = gguf_blocks.decode(_Tensor(data, kind, [512, 32]))
    assert part[0] == {T.Q4_K: "int4", T.Q5_K: "u8"}[kind]
    assert torch.allclose(gguf_blocks.dequantize_part(part), want, rtol=1e-6, atol=1e-6)
    layer = gguf_blocks.linear(part)
    assert isinstance(layer, qlinear.BlockLinear) and rel(layer.dequantize(), want) < 1e-3  # d*sc, dmin*m in fp16
    wide = layer.with_int4_op().wide
    if kind == T.Q4_K:
        assert isinstance(wide, qlinear.Int4Linear) and rel(wide.dequantize(), want) < 5e-3
    else:
        assert wide is None                         # 5-bit codes: never held by the int4 op


@pytest.mark.parametrize("kind", [T.Q6_K, T.Q3_K, T.Q2_K])
def test_other_quantized_types_are_requantized_to_q8_0_within_half_a_step(kind):
    """Scales per 16 do not fit the layout's blocks of 32: the values are rounded again to Q8_0,
    each by at most half of its block's step d = amax / 127 (an fp16 at or above it)."""
    data, want = _k_quant_blocks(kind)
    part = gguf_blocks.decode(_Tensor(data, kind, [512, 32]))
    assert part[0] == "int8"
    _, q, d = part
    blocks = want.view(32, -1, 32)
    amax = blocks.abs().amax(-1)
    assert torch.equal(d, d.half().float()) and (d * 127 >= amax).all() and (d <= amax / 127 * (1 + 2 ** -10)).all()
    assert q.abs().max() <= 127
    error = (gguf_blocks.dequantize_part(part) - want).abs().view(32, -1, 32)
    assert (error <= d[..., None] / 2 * (1 + 1e-6)).all()
    layer = gguf_blocks.linear(part)
    assert isinstance(layer, qlinear.BlockLinear) and layer.bits == 8
    assert torch.equal(layer.dequantize(), gguf_blocks.dequantize_part(part))
    assert isinstance(layer.with_int4_op().wide, qlinear.Int8Linear)    # Q8_0's offset: the int4 op holds it


def test_requantizing_keeps_zero_blocks_and_q8_0_blocks_as_they_are():
    codes = torch.randint(-127, 128, (2, 64), dtype=torch.int8)
    codes[:, ::32] = 127                                # every block reaches amax = 127 d
    scales = torch.tensor([[0.25, 0.0], [0.0078125, 3.0]])
    w = codes.float() * scales.repeat_interleave(32, 1)
    _, q, d = gguf_blocks.requantized_q8_0(w)
    assert torch.equal(d, scales)
    assert torch.equal(q[0, :32], codes[0, :32]) and torch.equal(q[1], codes[1])
    assert torch.equal(q[0, 32:], torch.zeros(32, dtype=torch.int8))       # the zero block: codes 0, d 0


def test_block_parts_of_different_types_fuse_exactly_in_the_8_bit_layout():
    rng = np.random.default_rng(1)
    parts = [gguf_blocks.decode(_Tensor(quantize(rng.standard_normal((rows, 64)).astype(np.float32), kind),
                                        kind, [64, rows]))
             for kind, rows in ((T.Q4_0, 16), (T.Q5_0, 8), (T.Q8_0, 24))]
    assert [p[0] for p in parts] == ["int4", "u8", "int8"]
    fused = gguf_blocks._fuse(parts)
    assert fused[0] == "u8"
    want = torch.cat([gguf_blocks.dequantize_part(p) for p in parts])
    assert torch.equal(gguf_blocks.dequantize_part(fused), want)
    assert torch.equal(gguf_blocks.linear(fused).dequantize(), want)
    with_float = gguf_blocks._fuse([parts[0], ("float", torch.ones(4, 64))])
    assert with_float[0] == "float"                    # a float part: the matrix is float (bf16 when held)
