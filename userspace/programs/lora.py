"""LoRA adapters: a program that is its base model's text plus a small private delta.

A model spec `BASE+lora:ADAPTER` names the base program (any spec the loader takes) and a PEFT
LoRA adapter (a folder with adapter_config.json and adapter_model.safetensors, or a hub id of one).
The adapted program shares every tensor of the base program, which stays loaded while any of its
adapters runs (the way processes share a library's text pages): only the adapter's A and B
matrices are new, tens of MB where the base is hundreds. The projections the adapter targets
compute y = x W + s (x A) B, unmerged (LoraWeights, LoraLinear), so several adapters of one base
cost one copy of the base; the scale s is lora_alpha / r (over sqrt(r) with use_rslora) and is
folded into B at load.

The adapted program's K/V differ from the base's, so its identity (the page cache's name for
what computed a page) is the base's and the adapter's digest together: base and adapter tenants
never map each other's prefixes. It names its base as its base_program, so a step forwards the
base's processes and every adapter's in one batch (kernel/step.py), through mixed(): the base's
layers with each adapter's delta on its own processes' rows. Where the base runs the C layer loop
(float32 activations on the CPU), so does an adapted step: with_c_loop hands it the adapters'
deltas (LayerWeights.with_deltas), which it adds after each GEMM as LoraLinear.mm does, to the
bit; LoraLinear and mixed()'s layers are its Python twin (KVOS_LAYER_LOOP=python, and the lab's).

What PEFT can express and this does not compute is refused when the adapter loads (EINVAL naming
it): DoRA, trained biases, modules_to_save, alpha_pattern, fan_in_fan_out, targets outside the
seven projections of a LLaMA layer. Under tensor parallelism each rank holds its share of A and B
(tp_shard.lora_piece).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import weakref
from pathlib import Path

import torch

from kernel import ops
from kernel.errors import EINVAL, EIO, ENOENT, KernelPanic, KvosError
from kernel.ops import hugepages
from userspace.programs import qlinear, tp_shard
from userspace.programs.cachedir import file_digest

MARK = "+lora:"
# PEFT's module names -> (the kvos projection that holds it, which of its parts: index, parts)
TARGETS = {"q_proj": ("qkv_t", 0), "k_proj": ("qkv_t", 1), "v_proj": ("qkv_t", 2), "o_proj": ("o_t", 0),
           "gate_proj": ("gate_up_t", 0), "up_proj": ("gate_up_t", 1), "down_proj": ("down_t", 0)}
KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


def split(spec: str) -> tuple[str, str] | None:
    """(base spec, adapter) of a `BASE+lora:ADAPTER` spec, or None for any other spec."""
    if not isinstance(spec, str) or MARK not in spec:
        return None
    base, adapter = spec.rsplit(MARK, 1)
    if not base or not adapter:
        raise KvosError(EINVAL, f"{spec!r}: a LoRA spec is BASE+lora:ADAPTER (a folder or a hub id)")
    return base, adapter


class LoraWeights:
    """One adapter's delta on one layer slot of `width` output columns: pieces (start, end, A (r, in),
    B (end - start, r)), B scaled. delta(x) is x [A_1; A_2; ...]^T (one GEMM for every piece) times
    the pieces' B laid block-diagonally in one (width, r_1 + r_2 + ...) matrix (one more GEMM): two
    GEMMs a slot however many of its projections the adapter targets (q, k and v are three).

    On the CPU both GEMMs are ops.panel_mm (float32 panels): a row's bits then do not depend on the
    rows beside it, as the base's panels' do not, so a row computes the same in a speculative step's
    rows of 5, in plain decoding's 1, and beside other adapters' rows. Elsewhere they are torch.mm."""

    def __init__(self, pieces: list, width: int, panels: bool):
        a = torch.cat([a for _, _, a, _ in pieces]).float().contiguous()
        b = torch.zeros(width, a.shape[0], device=a.device)
        at = 0
        for start, end, piece_a, piece_b in pieces:
            r = piece_a.shape[0]
            b[start:end, at:at + r] = piece_b
            at += r
        self.panels = panels
        self.c_delta = None          # (A's narrow panels, B's panels, r): the C loop's form of it (panels only)
        if panels:
            # A has r_1 + r_2 + ... rows (8 to 24): narrow panels read them, where 64-column ones pad them
            self.a = qlinear.PanelLinear.from_float(a, width=ops.NARROW)
            self.b = qlinear.PanelLinear.from_float(b)
            self.c_delta = (self.a.packed, self.b.packed, a.shape[0])
        else:
            self.a, self.b = a.t().contiguous(), b.t().contiguous()

    def move_to(self, arena) -> None:
        """Its panels copied into a huge-page arena (kernel/ops/hugepages.py), before C takes their addresses."""
        self.a = qlinear.PanelLinear(arena.take(self.a.packed), *self.a.shape)
        self.b = qlinear.PanelLinear(arena.take(self.b.packed), *self.b.shape)
        self.c_delta = (self.a.packed, self.b.packed, self.c_delta[2])

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear.mm(qlinear.mm(x, self.a), self.b)

    def tensors(self) -> dict:       # what the adapter holds (qlinear.weight_bytes)
        return {"a": self.a.packed, "b": self.b.packed} if self.panels else {"a": self.a, "b": self.b}


class LoraLinear:
    """A base projection (any weight qlinear.mm runs: a tensor, panels, GGUF blocks) and the deltas
    of the adapters whose rows share its GEMM: (rows, LoraWeights), rows a LongTensor of the batch
    rows the delta applies to, or None for every row (an adapter's own program)."""

    def __init__(self, base, deltas: list):
        self.base = base
        self.deltas = deltas

    def mm(self, a: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = qlinear.mm(a, self.base, bias)
        # LAB(lora): BEGIN -> pass
        x = a if a.dtype == torch.float32 else a.float()
        for rows, weights in self.deltas:
            if rows is None:
                y += weights.delta(x).to(y.dtype)
            else:                          # the same sums as over every row, on these rows' own
                y.index_add_(0, rows, weights.delta(x.index_select(0, rows)).to(y.dtype))
        # LAB(lora): END
        return y


SLOTS = ("qkv_t", "o_t", "gate_up_t", "down_t")


def layers_with(base, deltas_at) -> list:
    """Copies of base's layers where each slot with deltas (deltas_at(layer index, slot): a list of
    LoraLinear's (rows, LoraWeights), empty for none) is a LoraLinear over the base's weight; every
    other object is the base's."""
    layers = []
    for i, layer in enumerate(base.layers):
        mine = copy.copy(layer)
        for slot in SLOTS:
            deltas = deltas_at(i, slot)
            if deltas:
                setattr(mine, slot, LoraLinear(getattr(layer, slot), deltas))
        layers.append(mine)
    return layers


def mixed(base, segments: list):
    """The program that forwards one step's batch of `base`'s processes and its adapters': segments
    are (first row, end row, adapted program) of the rows that are not base's. The base's layers,
    each slot with the deltas of the adapters that have one there, on their rows only."""
    for _, _, program in segments:
        if getattr(program, "base_program", None) is not base:
            raise KernelPanic(f"{program.name} is not an adapter of {base.name}")
    # LAB(lora): BEGIN -> raise NotImplementedError
    rows: dict = {}
    for start, end, program in segments:
        rows.setdefault(id(program), (program, []))[1].append(torch.arange(start, end))
    adapters = [(program, torch.cat(spans).to(base.device)) for program, spans in rows.values()]
    view = copy.copy(base)
    view.layer_weights, view.layer_rows = None, None
    view.layers = layers_with(base, lambda i, slot: [(index, p.lora_weights[i][slot]) for p, index in adapters
                                                     if slot in p.lora_weights.get(i, {})])
    return view
    # LAB(lora): END


C_NAMES = dict(zip(SLOTS, ("qkv", "o", "gate_up", "down")))    # kernel/ops/step_ops.LayerWeights.NAMES


def with_c_loop(view, base, segments: list | None):
    """view (an adapter's program, or mixed()'s for a step: the Python layer loop's) running base's C layer
    loop with the adapters' deltas (csrc/cpu/layers.c adds them after each GEMM, as LoraLinear.mm does,
    to the bit), where base has that loop and each targeted GEMM takes deltas there (not bf16 panels);
    else view as it was. segments: mixed()'s, or None for an adapter's own program (every row its).
    The weights of a set of adapters are made once (c_weights), their rows every step (lora_rows)."""
    programs = [view] if segments is None else list({id(p): p for _, _, p in segments}.values())
    weights = c_weights(base, programs)
    if weights is None:
        return view
    view.layer_weights, view.layer_rows = weights, base.layer_rows
    view.lora_rows = [None] if segments is None else [[(start, end) for start, end, p in segments if p is program]
                                                      for program in programs]
    return view


def c_weights(base, programs: list):
    """base's LayerWeights with the deltas of these adapter programs (in this order), or None where the
    C loop cannot run them. Kept on base per set of adapters while every one of them lives (a weak
    reference each: an adapter unloaded takes its entries with it)."""
    if base.layer_weights is None:
        return None
    key = tuple(id(p) for p in programs)
    cache = base.__dict__.setdefault("_lora_c_weights", {})
    hit = cache.get(key)
    if hit is not None and all(ref() is p for ref, p in zip(hit[0], programs)):
        return hit[1]
    if any(w.c_delta is None for p in programs for slots in p.lora_weights.values() for w in slots.values()):
        return None
    adapters = [{(i, C_NAMES[slot]): w.c_delta for i, slots in p.lora_weights.items() for slot, w in slots.items()}
                for p in programs]
    if not all(base.layer_weights.takes_deltas(i, name) for deltas in adapters for i, name in deltas):
        return None
    weights = base.layer_weights.with_deltas(adapters)
    refs = tuple(weakref.ref(p, lambda _, key=key: cache.pop(key, None)) for p in programs)
    cache[key] = (refs, weights)
    return weights


def locate(adapter: str) -> tuple[Path, bytes]:
    """The adapter's folder (a hub id downloaded, or found in the hub cache) and the digest of its
    two files: what names it in the program cache and in the page cache."""
    folder = _folder(adapter)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise KvosError(ENOENT, f"{folder}: no adapter_model.safetensors")
    digest = hashlib.sha256(b"lora\0" + file_digest(folder / "adapter_config.json").encode() + b"\0"
                            + file_digest(weights).encode()).digest()
    return folder, digest


def adapted(base, folder: Path, digest: bytes):
    """The program `base` with the LoRA adapter in `folder` (located by locate()) on its layers."""
    adapter = str(folder)
    config = _read_config(folder)
    tensors = _read_tensors(folder)
    pieces = _pieces(base, config, tensors, adapter)
    program = copy.copy(base)                   # every tensor shared; the layers below are new objects
    program.base_program = base                 # keeps the base loaded (and cached); shares its batches
    program.name = f"{base.name}{MARK}{folder.name}"
    # LAB(lora): BEGIN -> program.identity = base.identity
    program.identity = hashlib.sha256(base.identity + digest).digest()
    # LAB(lora): END
    program.layer_weights, program.layer_rows = None, None       # the Python loop's; with_c_loop, below
    # ops.panel_mm where the CPU forward runs float32 activations (its GEMMs' own panels or blocks)
    panels = torch.device(base.device).type == "cpu" and base.dtype == torch.float32
    parts, _ = _slot_shapes(base.local)               # a tensor-parallel rank's widths: its share
    program.lora_weights = {i: {slot: LoraWeights(slot_pieces, sum(parts[slot]), panels)
                                for slot, slot_pieces in slots.items()} for i, slots in pieces.items()}
    if panels:      # the deltas in 2 MiB pages, as the GGUF base's blocks (docs/performance.md section 22)
        every = [w for slots in program.lora_weights.values() for w in slots.values()]
        arena = hugepages.arena(sum(qlinear.weight_bytes(w.a) + qlinear.weight_bytes(w.b) + 2 * hugepages.ALIGN
                                    for w in every))
        if arena is not None:
            for w in every:
                w.move_to(arena)
    program.layers = layers_with(base, lambda i, slot: [(None, program.lora_weights[i][slot])]
                                 if slot in program.lora_weights.get(i, {}) else [])
    program.adapter_bytes = sum(qlinear.weight_bytes(w) for slots in program.lora_weights.values()
                                for w in slots.values())
    program.cost = dataclasses.replace(base.cost, weight_bytes=base.cost.weight_bytes + program.adapter_bytes)
    return with_c_loop(program, base, None)


def _folder(adapter: str) -> Path:
    from userspace.programs import hub
    try:
        path = Path(adapter).expanduser()
        if not path.exists() and hub.parse(adapter) is not None:
            path = hub.resolve(adapter)
        found = (path / "adapter_config.json").is_file()
    except OSError as err:             # a name too long for the file system, a folder it may not read
        raise KvosError(ENOENT, f"{adapter[:200]}: no LoRA adapter here ({err.strerror})") from None
    if not found:
        raise KvosError(ENOENT, f"{adapter[:200]}: no LoRA adapter here (a folder with adapter_config.json and "
                                f"adapter_model.safetensors, or a hub id of one)")
    return path


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as err:
        raise KvosError(EIO, f"{folder}/adapter_config.json: {err}") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise KvosError(EINVAL, f"{folder}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    refused = {"use_dora": bool(config.get("use_dora")), "bias": config.get("bias", "none") != "none",
               "modules_to_save": bool(config.get("modules_to_save")),
               "alpha_pattern": bool(config.get("alpha_pattern")), "fan_in_fan_out": bool(config.get("fan_in_fan_out"))}
    for name, given in refused.items():
        if given:
            raise KvosError(EINVAL, f"{folder}: a LoRA adapter with {name} is not supported")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise KvosError(EINVAL, f"{folder}: lora_alpha must be a positive number, got {alpha!r}")
    return config


def _read_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file
    path = folder / "adapter_model.safetensors"
    try:
        return load_file(path)
    except Exception as exc:    # safetensors raises its own error type on a damaged file
        raise KvosError(EIO, f"{path}: corrupt safetensors file ({exc})") from None


def _slot_shapes(c) -> tuple[dict, dict]:
    """Per layer slot: the output widths of the projections fused in it (in TARGETS' order), its input width."""
    parts = {"qkv_t": [c.q_size, c.kv_size, c.kv_size], "o_t": [c.hidden_size],
             "gate_up_t": [c.intermediate_size, c.intermediate_size], "down_t": [c.hidden_size]}
    inputs = {"qkv_t": c.hidden_size, "o_t": c.q_size, "gate_up_t": c.hidden_size, "down_t": c.intermediate_size}
    return parts, inputs


def _pieces(base, config: dict, tensors: dict, adapter: str) -> dict:
    """layer -> slot -> [(start, end, A (r, in), B (end - start, r) x scale)] from PEFT's tensors,
    float32 on the base's device whatever the base holds (a few MB)."""
    c = base.config
    parts, inputs = _slot_shapes(c)
    found = {}
    for key, t in tensors.items():
        m = KEY.fullmatch(key)
        if m is None or m[2] not in TARGETS:
            raise KvosError(EINVAL, f"{adapter}: tensor {key!r} is not a LoRA A or B of a LLaMA layer's projection")
        found.setdefault((int(m[1]), m[2]), {})[m[3]] = t
    if not found:
        raise KvosError(EINVAL, f"{adapter}: the adapter holds no LoRA weights")
    out = {}
    for (layer, module), ab in sorted(found.items()):
        if layer >= c.num_hidden_layers or set(ab) != {"A", "B"}:
            raise KvosError(EINVAL, f"{adapter}: layer {layer} {module} needs lora_A and lora_B of a layer "
                                    f"below {c.num_hidden_layers}")
        slot, index = TARGETS[module]
        start = sum(parts[slot][:index])
        width = parts[slot][index]
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if a.shape != (r, inputs[slot]) or b.shape != (width, r):
            raise KvosError(EINVAL, f"{adapter}: layer {layer} {module}'s A {tuple(a.shape)} and B {tuple(b.shape)} "
                                    f"do not fit the base model ({inputs[slot]} in, {width} out)")
        scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
        b = b.float() * scale
        a = a.float()
        if getattr(base, "tp", None) is not None:        # this rank's share: its columns, or its inputs
            start, a, b = tp_shard.lora_piece(c, slot, index, a, b, base.tp.rank, base.tp.size)
            width = b.shape[0]
        out.setdefault(layer, {}).setdefault(slot, []).append(
            (start, start + width, a.contiguous().to(base.device), b.contiguous().to(base.device)))
    return out
