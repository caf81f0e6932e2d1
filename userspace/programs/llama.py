"""The LLaMA-family program: a forward pass over a packed batch on paged KV memory.

Weights are program text: loaded once, fused for speed (QKV in one matrix,
gate/up in one), shared read-only by every tenant running the model. The
forward pass has no padding and no Python loop over sequences: K/V go into the
frame pool through kernel/ops.write_kv and attention reads them back through
the page tables with kernel/ops.paged_attention (the MMU).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F

from kernel import ops
from kernel.batch import ForwardBatch
from kernel.errors import EINVAL, KvosError
from kernel.kvcache import KVShape, KVView
from kernel.ops import fused
from kernel.ops.step_ops import CpuStep, LayerWeights, NormWeights
from kernel.program import Program
from userspace.programs import lora, qlinear, tp_shard
from userspace.programs.config import LlamaConfig
from userspace.programs.rope import RopeTables


def fuse_hf_weights(config: LlamaConfig, hf, *, matrix=None, vector=None, embed=None) -> dict:
    """Canonical (fused) weights from tensors under Hugging Face names.

    The canonical names are what LlamaProgram and the converted cache use:
    embed, norm, lm_head (untied only), freq_factors (optional), and per layer
    layers.{i}.{attn_norm, qkv, qkv_bias?, o, o_bias?, mlp_norm, gate_up, down}.
    `hf` is any mapping of names to tensors; the hooks build each kind from what it holds (the
    quantized loader, gguf_blocks.py, passes its own): matrix(parts) a projection from its parts
    stacked by rows (default torch.cat), vector(t) a norm or bias, embed(t) the embedding table.
    """
    matrix = matrix or (lambda parts: parts[0] if len(parts) == 1 else torch.cat(parts))
    vector = vector or (lambda t: t)
    embed = embed or (lambda t: t)

    def take(name):
        if name not in hf:
            raise KvosError(EINVAL, f"model weights: tensor {name!r} is missing")
        return hf[name]

    out = {"embed": embed(take("model.embed_tokens.weight")), "norm": vector(take("model.norm.weight"))}
    if not config.tie_word_embeddings:
        out["lm_head"] = matrix([take("lm_head.weight")])
    if "rope_freqs" in hf:
        out["freq_factors"] = vector(hf["rope_freqs"])
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        out[f"layers.{i}.attn_norm"] = vector(take(p + "input_layernorm.weight"))
        out[f"layers.{i}.qkv"] = matrix([take(a + f"{x}_proj.weight") for x in "qkv"])
        if config.attention_bias:
            out[f"layers.{i}.qkv_bias"] = torch.cat([vector(take(a + f"{x}_proj.bias")) for x in "qkv"])
        out[f"layers.{i}.o"] = matrix([take(a + "o_proj.weight")])
        if config.o_proj_bias:
            out[f"layers.{i}.o_bias"] = vector(take(a + "o_proj.bias"))
        out[f"layers.{i}.mlp_norm"] = vector(take(p + "post_attention_layernorm.weight"))
        out[f"layers.{i}.gate_up"] = matrix([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        out[f"layers.{i}.down"] = matrix([take(p + "mlp.down_proj.weight")])
    return out


def check_weight_shapes(config: LlamaConfig, w: dict) -> None:
    """EINVAL when a canonical tensor's shape disagrees with the config (a mislabelled or foreign file)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    qkv = config.q_size + 2 * config.kv_size
    want = {"embed": (v, h), "norm": (h,)}
    if not config.tie_word_embeddings:
        want["lm_head"] = (v, h)
    if "freq_factors" in w:
        want["freq_factors"] = (config.head_dim // 2,)
    for n in range(config.num_hidden_layers):
        want.update({
            f"layers.{n}.attn_norm": (h,), f"layers.{n}.qkv": (qkv, h), f"layers.{n}.o": (h, config.q_size),
            f"layers.{n}.mlp_norm": (h,), f"layers.{n}.gate_up": (2 * i, h), f"layers.{n}.down": (h, i),
        })
        if config.attention_bias:
            want[f"layers.{n}.qkv_bias"] = (qkv,)
        if config.o_proj_bias:
            want[f"layers.{n}.o_bias"] = (h,)
    for name, shape in want.items():
        if name not in w:
            raise KvosError(EINVAL, f"model weights: tensor {name!r} is missing")
        if tuple(w[name].shape) != shape:
            raise KvosError(EINVAL, f"model weights: {name} has shape {tuple(w[name].shape)}, "
                                    f"the config says {shape}")


add_matmul = qlinear.add_mm     # x += a @ w for a tensor (in, out) or a quantized layer


def _setting(name: str, default: str, allowed: tuple) -> str:
    """$name, checked against its allowed values (EINVAL naming them), or its default."""
    value = os.environ.get(name, default)
    if value not in allowed:
        raise KvosError(EINVAL, f"{name} must be {' or '.join(allowed)}, not {value!r}")
    return value


def layer_loop() -> str:
    """$KVOS_LAYER_LOOP: "c" (the default: a CPU step's layers in one C call) or "python"."""
    return _setting("KVOS_LAYER_LOOP", "c", ("c", "python"))


def cuda_fused() -> bool:
    """$KVOS_CUDA_FUSED: "1" (the default: a one-rank CUDA forward on kernel/ops/fused.py's kernels,
    forward_device) or "0" (torch's ops, forward_torch: what the device script compares)."""
    return _setting("KVOS_CUDA_FUSED", "1", ("0", "1")) == "1"


class _Layer:
    """One decoder layer's tensors, as attributes (a dict lookup per use would cost in the hot loop).

    The four projection matrices are kept transposed, (in, out) and contiguous, for torch.mm and
    addmm (in the matmul dtype): 1.0 to 1.2x faster than F.linear on the (out, in) layout at
    SmolLM2's decode shapes (weights cold in cache, as in a step). In float32 on the CPU they are
    packed in column panels for ops.panel_mm instead (qlinear.PanelLinear: 1.2x to 2.9x faster
    than MKL's sgemm at every M measured, docs/performance.md 7b), in bfloat16 panels when the
    matmuls are bf16 under float32 activations (7c)."""
    __slots__ = ("attn_norm", "qkv_t", "qkv_bias", "o_t", "o_bias", "mlp_norm", "gate_up_t", "down_t")

    def __init__(self, w: dict, i: int, matmul_dtype: torch.dtype, panels: bool):
        for name in self.__slots__:
            if name.endswith("_t") and qlinear.is_quantized(w[f"layers.{i}.{name[:-2]}"]):
                setattr(self, name, w[f"layers.{i}.{name[:-2]}"])     # the GGUF's blocks (qlinear.py)
            elif name.endswith("_t") and panels:     # float32 / bf16 on the CPU: packed for ops.panel_mm
                setattr(self, name, qlinear.PanelLinear.from_float(w[f"layers.{i}.{name[:-2]}"], matmul_dtype))
            elif name.endswith("_t"):
                setattr(self, name, w[f"layers.{i}.{name[:-2]}"].t().to(matmul_dtype).contiguous())
            else:
                setattr(self, name, w.get(f"layers.{i}.{name}"))
        if self.qkv_bias is not None and not panels:   # added inside the GEMM, so in its dtype (panels: float32)
            self.qkv_bias = self.qkv_bias.to(matmul_dtype)


class LlamaProgram(Program):
    """A LLaMA-family model: RMSNorm, RoPE, GQA attention on paged KV, SwiGLU MLP, tied or untied head."""

    def __init__(self, name: str, config: LlamaConfig, weights: dict, tokenizer, identity: bytes,
                 device: torch.device, dtype: torch.dtype, matmul_dtype: torch.dtype | None = None,
                 kv_dtype: torch.dtype | None = None, tp=None):
        config.check_runnable()
        check_weight_shapes(config, weights)
        # tp: this rank's tensor-parallel group (kernel/devices/tp.py), or None on one rank; a rank
        # keeps its slice of the weights and runs its share of the heads (userspace/programs/tp_shard.py)
        self.tp = tp
        self.local = config if tp is None else tp_shard.local_config(config, tp.size)
        if tp is not None:
            weights = tp_shard.shard_weights(config, weights, tp.rank, tp.size)
        self.name = name
        self.config = config
        self.tokenizer = tokenizer
        self.identity = identity
        self.device = device
        self.dtype = dtype
        # The cache may hold bfloat16 under float32 activations (CPU): write_kv rounds, attention widens.
        self.kv_dtype = kv_dtype or dtype
        self.kv_shape = KVShape(config.num_hidden_layers, self.local.num_key_value_heads, config.head_dim,
                                self.kv_dtype)
        self.max_context = config.max_position_embeddings
        self.vocab_size = config.vocab_size
        self.eos_token_ids = frozenset(config.eos_token_ids)
        self.bos_token_id = config.bos_token_id
        self.vocab_bytes = tokenizer.vocab_bytes          # built here, at load: never under the kernel lock
        self.max_token_bytes = tokenizer.max_token_bytes  # bounds how few tokens a text can be
        self.cost = config.program_cost(torch.empty((), dtype=dtype).element_size())
        # Norm weights and biases stay in the compute dtype too: one dtype end to end, no casts per step.
        w = {k: t if qlinear.is_quantized(t) else t.to(device=device, dtype=dtype).contiguous()
             for k, t in weights.items() if k != "freq_factors"}
        for t in w.values():
            if not qlinear.is_quantized(t):
                t.requires_grad_(False)
        self.embed = w["embed"]
        self.norm = w["norm"]
        # The linear layers may run in another dtype than the rest (bfloat16 on a CPU with AMX:
        # 2 to 4x faster GEMMs); activations, norms, RoPE and the KV cache stay in `dtype`.
        self.matmul_dtype = matmul_dtype or dtype
        head = w["embed"] if config.tie_word_embeddings else w["lm_head"]
        self.lm_head = head if qlinear.is_quantized(head) else head.to(self.matmul_dtype)
        # float32 on the CPU (one rank): every GEMM is ops.panel_mm over packed panels, the one place
        # that choice is made (docs/performance.md, 7b); bf16 matmuls under float32 activations run
        # it on bf16 panels (7c). A tied embedding reads its rows from the head's panels, so the table
        # is held once (with bf16 matmuls its rows are then the bf16-rounded ones, widened).
        panels = (torch.device(device).type == "cpu" and tp is None and dtype == torch.float32
                  and self.matmul_dtype in (torch.float32, torch.bfloat16))
        if panels and not qlinear.is_quantized(head):
            self.lm_head = qlinear.PanelLinear.from_float(head, self.matmul_dtype)
            if config.tie_word_embeddings:
                self.embed = self.lm_head
        self.layers = [_Layer(w, i, self.matmul_dtype, panels) for i in range(config.num_hidden_layers)]
        self.rope = RopeTables(config, dtype, device, weights.get("freq_factors"))
        # float32 activations on the CPU (one rank): the fused C ops of kernel/ops/step_ops.py, their norm
        # weights checked here once (layer i's input norm at 2i, its MLP norm at 2i + 1, the final one last).
        self.norms = None
        if torch.device(device).type == "cpu" and dtype == torch.float32 and tp is None:
            self.norms = NormWeights([t for layer in self.layers for t in (layer.attn_norm, layer.mlp_norm)]
                                     + [self.norm], config.hidden_size)
        # CUDA, one rank: the fused kernels (add + RMSNorm, RoPE + write_kv, SiLU x up) per layer,
        # about half of forward_torch's launches (forward_device).
        self.device_fused = torch.device(device).type == "cuda" and tp is None and cuda_fused()
        self.scale = config.head_dim ** -0.5
        # Where every GEMM is one the C layer loop runs (panels, qmm blocks), the layers of a step are one
        # C call (csrc/cpu/layers.c) up to layer_rows rows (None: any), not ~9 Python calls each.
        # KVOS_LAYER_LOOP=python keeps the loop in Python (its twin; what a per-op profile can see).
        self.layer_weights, self.layer_rows = None, None
        self.lora_rows = None          # with LoRA deltas in layer_weights: each adapter's rows (lora.with_c_loop)
        if self.norms is not None and layer_loop() == "c":
            gemms = [[qlinear.c_gemm(layer.qkv_t, layer.qkv_bias), qlinear.c_gemm(layer.o_t, layer.o_bias),
                      qlinear.c_gemm(layer.gate_up_t), qlinear.c_gemm(layer.down_t)] for layer in self.layers]
            if all(g is not None for layer in gemms for g in layer):
                limits = [g[6] for layer in gemms for g in layer if g[6] is not None]
                self.layer_rows = min(limits) if limits else None
                self.layer_weights = LayerWeights(
                    [[g[:6] for g in layer] for layer in gemms], hidden=config.hidden_size,
                    inter=config.intermediate_size, num_heads=config.num_attention_heads,
                    kv_heads=config.num_key_value_heads, head_dim=config.head_dim)
        # What a step reads, as held (bf16 linear layers read half the fp32 bytes, quantized ones their
        # blocks): the roofline of the bench and the simulated device's price of a step.
        self.cost = dataclasses.replace(self.cost, weight_bytes=qlinear.read_bytes(self.layers, self.lm_head,
                                                                                   self.norm))

    # -- text ---------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def token_bytes(self, token_id: int) -> bytes:
        table = self.vocab_bytes
        return table[token_id] if token_id < len(table) else b""     # padded embedding rows: no text

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None) -> str:
        return self.tokenizer.render_chat(messages, add_generation_prompt, tools)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list | None = None) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt, tools)

    @property
    def chat_tools(self) -> str | None:
        return self.tokenizer.chat_tools

    @property
    def special_tokens(self) -> dict:
        return dict(self.tokenizer.special_tokens)

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template

    def mixed(self, segments: list):
        """This step's program for a batch shared with this model's LoRA adapters (lora.py): on the
        C layer loop, with the adapters' deltas, where this program runs it."""
        view = lora.with_c_loop(lora.mixed(self, segments), self, segments)
        view.mixed_from = (self, segments)     # what a tensor-parallel device tells its workers to make
        return view

    # -- the forward pass ---------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVView) -> torch.Tensor:
        if self.norms is not None:
            return self.forward_fused(batch, kv)
        if self.device_fused:
            return self.forward_device(batch, kv)
        return self.forward_torch(batch, kv)

    def forward_fused(self, batch: ForwardBatch, kv: KVView) -> torch.Tensor:
        """The CPU float32 forward: each layer is its GEMMs and four fused C ops on step-bound buffers
        (kernel/ops/step_ops.py), the residual add inside the next RMSNorm; no other op per layer."""
        c = self.config
        md = self.matmul_dtype
        mixed = md != torch.float32             # bfloat16 GEMMs: their inputs narrowed, outputs widened
        step = CpuStep(num_tokens=batch.token_ids.shape[0], hidden=c.hidden_size, eps=c.rms_norm_eps,
                       norms=self.norms, num_heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                       head_dim=c.head_dim, inter=c.intermediate_size, cos=self.rope.cos, sin=self.rope.sin,
                       positions=batch.positions, slot_mapping=batch.slot_mapping, page_table=batch.page_table,
                       query_start=batch.query_start, context_lens=batch.context_lens, scale=self.scale, kv=kv)

        def mm(a, w, bias=None):     # a GEMM in the matmul dtype; its output (bf16 from some layers) in float32
            y = qlinear.mm(a.to(md) if mixed else a, w, bias)
            return y if y.dtype is torch.float32 else y.float()

        x = qlinear.embedding(batch.token_ids, self.embed)
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        h = step.rms_norm(x, 0)
        if self.layer_weights is not None and (self.layer_rows is None or step.n <= self.layer_rows):
            h = step.layers(self.layer_weights, x, self.lora_rows)   # the loop below, in one C call
            return qlinear.head(h.index_select(0, batch.sample_indices), self.lm_head, md)
        for index, layer in enumerate(self.layers):
            step.rope_write_kv(index, mm(h, layer.qkv_t, layer.qkv_bias))   # q rotated in place, k and v cached
            o = mm(step.attention(index), layer.o_t, layer.o_bias)
            h = step.add_rms_norm(o, 2 * index + 1)                    # x += o; h = norm(x)
            down = mm(step.silu_mul(mm(h, layer.gate_up_t)), layer.down_t)
            h = step.add_rms_norm(down, 2 * index + 2)                 # x += down; the next norm, or the final
        # Only the rows that will be sampled go through the LM head (the final norm ran on every row).
        return qlinear.head(h.index_select(0, batch.sample_indices), self.lm_head, md)

    def forward_device(self, batch: ForwardBatch, kv: KVView) -> torch.Tensor:
        """The one-rank CUDA forward on kernel/ops/fused.py's kernels: a layer is its four GEMMs, RoPE +
        write_kv, attention, SiLU x up and two residual-add + RMSNorms (each add inside the next norm):
        9 launches (10 with split-K attention) where forward_torch made 15 on an H200. The ops check their
        arguments on the host; index ranges once a step, or never when the batch builder checked its host
        arrays (a captured graph cannot sync). Runs on any device the ops run on (the CPU tests use it)."""
        c = self.config
        num_tokens = batch.token_ids.shape[0]
        eps, dtype, md = c.rms_norm_eps, self.dtype, self.matmul_dtype
        nq, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_end, k_end = c.q_size, c.q_size + c.kv_size

        def mm(a, w, bias=None):     # a GEMM in the matmul dtype, its output in the activations' dtype
            return qlinear.mm(a.to(md), w, bias).to(dtype)

        x = qlinear.embedding(batch.token_ids, self.embed).to(dtype).contiguous()   # the residual stream
        h = F.rms_norm(x, (c.hidden_size,), self.layers[0].attn_norm, eps)         # every later norm is fused
        following = [layer.attn_norm for layer in self.layers[1:]] + [self.norm]
        for index, layer in enumerate(self.layers):
            qkv = mm(h, layer.qkv_t, layer.qkv_bias)                      # (tokens, q | k | v), dense rows
            q = qkv[:, :q_end].view(num_tokens, nq, d)
            k = qkv[:, q_end:k_end].view(num_tokens, nkv, d)
            v = qkv[:, k_end:].view(num_tokens, nkv, d)
            k_cache, v_cache = kv.layer(index)
            check = index == 0 and not batch.checked
            fused.rope_write_kv(q, k, v, self.rope.cos, self.rope.sin, batch.positions, k_cache, v_cache,
                                batch.slot_mapping, check=check)          # q rotated in place, k and v cached
            attn = ops.paged_attention(q, k_cache, v_cache, batch.page_table, batch.query_start,
                                       batch.context_lens, self.scale, check=check)
            fused.add_rms_norm(x, mm(attn.view(num_tokens, q_end), layer.o_t, layer.o_bias), layer.mlp_norm,
                               eps, out=h)                                # x += o; h = norm(x)
            act = fused.silu_mul(mm(h, layer.gate_up_t))
            fused.add_rms_norm(x, mm(act, layer.down_t), following[index], eps, out=h)   # x += down; next norm
        # Only the rows that will be sampled go through the LM head (the final norm ran on every row).
        return qlinear.head(h.index_select(0, batch.sample_indices), self.lm_head, md)

    def forward_torch(self, batch: ForwardBatch, kv: KVView) -> torch.Tensor:
        """The forward in torch ops and kernel/ops' two MMU kernels: CUDA, tensor parallel, bf16 activations."""
        c, tp = self.local, self.tp             # the shapes of this rank's share of the model
        num_tokens = batch.token_ids.shape[0]
        hidden, eps = c.hidden_size, c.rms_norm_eps
        nq, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_end, k_end = c.q_size, c.q_size + c.kv_size
        inter = c.intermediate_size
        rope, md = self.rope, self.matmul_dtype
        cos, sin = rope.lookup(batch.positions)

        x = (qlinear.embedding(batch.token_ids, self.embed) if tp is None       # the residual stream (tokens, hidden)
             else tp_shard.embed(tp, batch.token_ids, self.embed))
        for index, layer in enumerate(self.layers):
            h = F.rms_norm(x, (hidden,), layer.attn_norm, eps)
            h = h.to(md)                                                 # a no-op unless mixed
            qkv = qlinear.mm(h, layer.qkv_t, layer.qkv_bias).to(self.dtype)   # (tokens, q | k | v)
            # One rotation for the q and k heads together; q, k and v stay views (the ops take any
            # row stride as long as each head vector is dense).
            qk = rope.apply(qkv[:, :k_end].view(num_tokens, nq + nkv, d), cos, sin)
            q, k = qk[:, :nq], qk[:, nq:]
            v = qkv[:, k_end:].view(num_tokens, nkv, d)
            k_cache, v_cache = kv.layer(index)
            # Index ranges are the same for every layer: check them once per step (a host sync on CUDA),
            # or never when the batch builder checked its host arrays (a captured graph cannot sync).
            check = index == 0 and not batch.checked
            ops.write_kv(k_cache, v_cache, k, v, batch.slot_mapping, check=check)
            attn = ops.paged_attention(q, k_cache, v_cache, batch.page_table, batch.query_start,
                                       batch.context_lens, self.scale, check=check)
            add_matmul(x, attn.view(num_tokens, q_end), layer.o_t) if tp is None \
                else tp_shard.row_add(tp, x, attn.view(num_tokens, q_end), layer.o_t)   # x += attn @ o
            if layer.o_bias is not None:
                x.add_(layer.o_bias)
            h = F.rms_norm(x, (hidden,), layer.mlp_norm, eps)
            gate_up = qlinear.mm(h.to(md), layer.gate_up_t)
            act = F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:])
            add_matmul(x, act, layer.down_t) if tp is None else tp_shard.row_add(tp, x, act, layer.down_t)

        # Only the rows that will be sampled go through the final norm and the LM head.
        x = F.rms_norm(x.index_select(0, batch.sample_indices), (hidden,), self.norm, eps)
        if tp is not None:
            return tp_shard.lm_head(tp, x, self.lm_head, self.vocab_size)
        return qlinear.head(x, self.lm_head, md)
