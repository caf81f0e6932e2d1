"""The simulated GPU: its presets, and the calibrated cost model that prices each step.

A forward pass is priced per operator class, each on its own roofline with an efficiency measured
on real GPUs: the linear layers (GEMMs) blend a compute and a weight-streaming term, attention
reads the K/V at its own bandwidth efficiency, elementwise ops (norms, rotary, activation,
residual adds) stream activations, every layer pays kernel-launch floors, and a tensor-parallel
pass adds two all-reduces per layer. The host adds a fixed cost per pass and per sequence, and issues
each pass's kernels (per launch eagerly, one replay for a pure-decode pass with CUDA graphs): when
issuing takes longer than the GPU's work, the GPU waits (host_wait) and the step is host-bound. Swap
bytes cross PCIe, not overlapped. Equations, constants and their sources: docs/simulator.md.
Pure data and formulas, no kernel state: userspace may import this module (the simulator's
experiments reason with the same presets and formulas the device uses).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

from kernel.errors import EINVAL, KvosError


@dataclass(frozen=True)
class GPUSpec:
    """The constants of one simulated accelerator (or of a tensor-parallel group of `tp` of them).
    Every numeric field can be overridden. Where each default comes from: docs/simulator.md."""
    key: str                         # preset name, e.g. "a100-80g"
    label: str                       # what the preset models
    peak_flops: float                # dense fp16/bf16 tensor-core FLOP/s, one GPU
    hbm_bandwidth: float             # bytes/s, one GPU
    memory_bytes: int                # device memory, one GPU
    pcie_bandwidth: float            # host <-> device bytes/s, as pinned copies achieve (swap)
    link: str = "NVLink3"            # the GPU-to-GPU interconnect the link constants describe
    link_bandwidth: float = 200e9    # all-reduce bus bandwidth (NCCL's busbw) between the tp GPUs, bytes/s
    link_latency: float = 50e-6      # seconds per all-reduce of a small message (a decode step's)
    tp: int = 1                      # tensor-parallel degree: GPUs that share every layer
    matmul_efficiency: float = 0.72  # GEMM MFU once compute-bound (large M); attention FLOPs too
    bandwidth_efficiency: float = 0.78  # GEMM MBU while weight-bound (small M)
    gemm_blend: float = 1.5          # p of the p-norm joining a GEMM's compute and weight terms (large: max)
    attention_efficiency: float = 0.7   # fraction of HBM bandwidth attention reaches reading K/V
    elementwise_efficiency: float = 0.6  # fraction of HBM bandwidth norms, rotary, activation, adds reach
    layer_overhead: float = 40e-6    # seconds per layer per pass: launch floors of the small kernels
    step_overhead: float = 1e-3      # host seconds per forward pass: scheduling, batch building, sampling
    seq_overhead: float = 40e-6      # host seconds per sequence in a pass (inputs, sampling, outputs)
    # The host issuing a pass's kernels, which the GPU overlaps with its work until issuing is the slower
    # (kvos's eager forward on an H200: docs/simulator.md, "The host"). 0 s per launch: the engine's issue
    # time hides under the GPU's (the calibrated default); host=eager|graphs names kvos's measured figures.
    launches_per_layer: float = 15.0     # kernel launches per layer of an eager pass
    launch_host: float = 0.0         # host seconds per eager launch (kvos eager on an H200: 20e-6)
    graphs: float = 0.0              # 1: pure-decode passes replay a CUDA graph (prefill passes stay eager)
    graph_launch: float = 50e-6      # host seconds of a graph-replayed pass: staging the inputs and the replay
    memory_utilization: float = 0.9  # fraction of memory the engine may use (vLLM's default; the rest: CUDA context)
    # Speculative decoding (boot's speculate=k): the chance that each draft is the token the model draws,
    # independently of the others (the usual model, e.g. Leviathan et al. 2023), as no tokens are drawn here.
    draft_acceptance: float = 0.7
    activation_reserve: int = 1 << 30  # bytes kept per GPU for one step's activations, besides weights and KV

    @property
    def sustained_flops(self) -> float:
        """The group's compute-bound FLOP/s."""
        return self.peak_flops * self.matmul_efficiency * self.tp

    @property
    def sustained_bandwidth(self) -> float:
        """The group's weight-streaming bytes/s."""
        return self.hbm_bandwidth * self.bandwidth_efficiency * self.tp

    @property
    def ridge_point(self) -> float:
        """FLOPs per byte where a GEMM turns from weight-bound to compute-bound."""
        return self.sustained_flops / self.sustained_bandwidth


GiB = 1 << 30

# Interconnects: (all-reduce busbw bytes/s, small all-reduce seconds). Line rates are the datasheets'
# (NVLink3 600 GB/s and NVLink4 900 GB/s both directions together; PCIe Gen4/Gen5 x16 64/128 GB/s);
# what NCCL reaches is lower, and the model uses that. Sources in docs/simulator.md ("Links"):
#  NVLink3 (A100 SXM): busbw ~200 GB/s on 8 x A100-80GB (NVIDIA/nccl-tests#149), 195 GB/s for a
#    pair (Vidur's profiles, data/profiling/network/a100_pairwise_nvlink); small messages 48-63 us.
#  NVLink4 (H100/H200 SXM): busbw ~370 GB/s with the ring algorithm, 2 to 8 GPUs (NVIDIA/nccl#1455;
#    the NCCL maintainer's figure in NVIDIA/nccl-tests#212); small messages 21-41 us (Vidur, h100_dgx).
#  PCIe Gen4 / Gen5: four GPUs whose all-reduce crosses PCIe reached 24 / 49 GB/s busbw with small
#    messages at 59-66 / 28 us (Vidur's a100/h100_pairwise_nvlink profiles, 4 workers).
LINKS = {"nvlink3": ("NVLink3", 200e9, 50e-6), "nvlink4": ("NVLink4", 370e9, 30e-6),
         "pcie4": ("PCIe Gen4 x16", 24e9, 60e-6), "pcie5": ("PCIe Gen5 x16", 49e9, 30e-6)}


def _preset(key, label, link, **fields) -> GPUSpec:
    name, bandwidth, latency = LINKS[link]
    return GPUSpec(key, label, link=name, link_bandwidth=bandwidth, link_latency=latency, **fields)


# Datasheet figures (dense fp16/bf16 tensor throughput, HBM bandwidth, memory as nvidia-smi
# shows it); PCIe as pinned host copies achieve: ~25 GB/s on Gen4 x16, ~50 GB/s on Gen5 x16.
GPUS = {
    "a100-80g": _preset("a100-80g", "NVIDIA A100-SXM4-80GB", "nvlink3", peak_flops=312e12, hbm_bandwidth=2.039e12,
                        memory_bytes=80 * GiB, pcie_bandwidth=25e9),
    "a100-40g": _preset("a100-40g", "NVIDIA A100-SXM4-40GB", "nvlink3", peak_flops=312e12, hbm_bandwidth=1.555e12,
                        memory_bytes=40 * GiB, pcie_bandwidth=25e9),
    "h100-80g": _preset("h100-80g", "NVIDIA H100-SXM5-80GB", "nvlink4", peak_flops=989e12, hbm_bandwidth=3.35e12,
                        memory_bytes=80 * GiB, pcie_bandwidth=50e9),
    "h200": _preset("h200", "NVIDIA H200-SXM-141GB", "nvlink4", peak_flops=989e12, hbm_bandwidth=4.8e12,
                    memory_bytes=141 * GiB, pcie_bandwidth=50e9),
}
GPU_ALIASES = {"a100": "a100-80g", "a100-80gb": "a100-80g", "a100-sxm4-80gb": "a100-80g", "a100-40gb": "a100-40g",
               "h100": "h100-80g", "h100-80gb": "h100-80g", "h100-sxm": "h100-80g",
               "h200-141g": "h200", "h200-141gb": "h200", "": "a100-80g"}
_ZERO_OK = ("step_overhead", "seq_overhead", "layer_overhead", "link_latency", "activation_reserve", "launch_host",
            "graphs", "graph_launch", "draft_acceptance")
# Host profiles (host=NAME in a sim device name): (launch_host, graphs). "engine" is the calibrated
# default; "eager" and "graphs" are kvos's forward as measured on an H200 (docs/simulator.md, "The host").
HOSTS = {"engine": (0.0, 0.0), "eager": (20e-6, 0.0), "graphs": (20e-6, 1.0)}


def gpu_spec(name: str, **overrides) -> GPUSpec:
    """The preset named by `name` ("sim:a100", "H100", "sim:h200,step_overhead=0,tp=2", "sim:a100,link=pcie4",
    "sim:h200,host=eager"), with overrides."""
    if not isinstance(name, str):
        raise KvosError(EINVAL, f"sim device name must be a string, got {name!r}")
    key, *assignments = name.strip().lower().removeprefix("sim").removeprefix(":").split(",")
    key = GPU_ALIASES.get(key, key)
    profile = {}
    if key not in GPUS:
        raise KvosError(EINVAL, f"unknown simulated GPU {name!r}: choose one of {', '.join(GPUS)} "
                                f"(aliases: {', '.join(a for a in GPU_ALIASES if a)})")
    for item in assignments:
        field, sep, value = item.partition("=")
        field, value = field.strip(), value.strip()
        if not sep:
            raise KvosError(EINVAL, f"sim device {name!r}: override {item!r} is not field=value")
        if field == "link":                    # a named interconnect sets the link's three constants
            if value not in LINKS:
                raise KvosError(EINVAL, f"sim device {name!r}: unknown link {value!r}: "
                                        f"choose one of {', '.join(LINKS)}")
            label, bandwidth, latency = LINKS[value]
            for f, v in (("link_bandwidth", bandwidth), ("link_latency", latency)):
                overrides.setdefault(f, v)
            overrides.setdefault("link", label)
            continue
        if field == "host":                    # a named host profile sets launch_host and graphs
            if value not in HOSTS:
                raise KvosError(EINVAL, f"sim device {name!r}: unknown host {value!r}: "
                                        f"choose one of {', '.join(HOSTS)}")
            profile = dict(zip(("launch_host", "graphs"), HOSTS[value]))    # fields named beside it win
            continue
        try:
            overrides.setdefault(field, float(value))
        except ValueError:
            raise KvosError(EINVAL, f"sim device {name!r}: {field}={value!r} is not a number") from None
    return _override(GPUS[key], {**profile, **overrides})


def _override(spec: GPUSpec, overrides: dict) -> GPUSpec:
    fields = {f.name for f in dataclasses.fields(GPUSpec)} - {"key", "label"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise KvosError(EINVAL, f"unknown GPU constant {unknown[0]!r}: overridable are {', '.join(sorted(fields))}")
    for field, value in overrides.items():
        if field == "link":
            if not isinstance(value, str):
                raise KvosError(EINVAL, f"GPU constant link names an interconnect, got {value!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
            raise KvosError(EINVAL, f"GPU constant {field} must be a finite number >= 0, got {value!r}")
        if value == 0 and field not in _ZERO_OK:
            raise KvosError(EINVAL, f"GPU constant {field} must be positive")
        if field.endswith(("_efficiency", "_utilization")) and value > 1:
            raise KvosError(EINVAL, f"GPU constant {field} is a fraction in (0, 1], got {value}")
        if field == "draft_acceptance" and value > 1:
            raise KvosError(EINVAL, f"GPU constant draft_acceptance is a probability in [0, 1], got {value}")
        if field == "graphs" and value not in (0, 1):
            raise KvosError(EINVAL, f"GPU constant graphs is 0 or 1, got {value}")
        if field == "tp" and (value != int(value) or not 1 <= value <= 1024):
            raise KvosError(EINVAL, f"GPU constant tp is a whole number of GPUs from 1 to 1024, got {value}")
    ints = ("memory_bytes", "activation_reserve", "tp")
    overrides = {**overrides, **{f: int(overrides[f]) for f in ints if f in overrides}}
    return dataclasses.replace(spec, **overrides)


@dataclass(frozen=True)
class ModelCost:
    """Per-program constants, computed once: what a token and a step cost (one GPU's whole model;
    tensor parallelism divides them in step_cost)."""
    linear_flops_per_token: int      # 2 x parameters touched per token
    attention_flops_unit: int        # 4 x layers x heads x head_dim: FLOPs of one (query, key) pair
    weight_bytes: int                # read once per forward pass
    kv_bytes_per_token: int          # K and V of one token, all layers
    layers: int = 0                  # transformer layers: launch floors and all-reduces per pass
    heads: int = 0                   # query heads and K/V heads: what tensor parallelism must divide
    kv_heads: int = 0
    allreduce_bytes_per_token: int = 0       # one token's hidden state (hidden x activation bytes)
    elementwise_bytes_per_token: int = 0     # norms and residual adds, all layers (every rank does them whole)
    elementwise_sharded_bytes_per_token: int = 0  # rotary and the MLP activation, all layers (split by tp)


class PassWork(NamedTuple):
    """The work of one forward pass, by operator class (whole-model figures: step_cost divides by tp)."""
    linear_flops: float
    attention_flops: float
    weight_bytes: float
    kv_bytes: float
    tokens: int = 0
    sequences: int = 0
    layers: int = 0
    elementwise_bytes: float = 0.0           # replicated on every rank
    elementwise_sharded_bytes: float = 0.0   # split across ranks
    allreduce_bytes: float = 0.0             # the hidden states of the pass's tokens: one all-reduce's message

    @property
    def flops(self) -> float:
        return self.linear_flops + self.attention_flops

    @property
    def hbm_bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes


@dataclass
class StepCost:
    """What one step cost and why: every term in seconds, plus the work behind them."""
    flops: float = 0.0
    hbm_bytes: float = 0.0
    compute: float = 0.0             # sum over passes of the compute terms (GEMM and attention FLOPs / sustained)
    memory: float = 0.0              # sum over passes of the memory terms (weights, K/V, activations / bandwidth)
    linear: float = 0.0              # GEMMs: the blend of their compute and weight terms
    attention: float = 0.0           # max(attention FLOPs, K/V bytes) on their own roofline
    elementwise: float = 0.0         # norms, rotary, activation, residual adds
    launch: float = 0.0              # per-layer launch floors
    comm: float = 0.0                # tensor-parallel all-reduces
    forward: float = 0.0             # sum over passes of linear + attention + elementwise + launch + comm
    overhead: float = 0.0            # host: per pass and per sequence
    issue: float = 0.0               # host seconds issuing the passes' kernels (overlapped with the GPU's work)
    host_wait: float = 0.0           # of which the GPU waited for: sum over passes of max(0, issue - forward)
    swap: float = 0.0                # swap bytes / PCIe bandwidth
    copy: float = 0.0                # copy-on-write frame copies (read + write over HBM)
    compute_bound: int = 0           # forward passes whose compute terms were the larger
    host_bound: int = 0              # forward passes the host took longer to issue than the GPU to run

    @property
    def total(self) -> float:
        return self.forward + self.host_wait + self.overhead + self.swap + self.copy


def forward_work(model: ModelCost, spans, padding_tokens: int = 0) -> PassWork:
    """The work of one forward pass over `spans`: (start, count) per sequence.

    A span computes tokens start..start+count-1; token i attends causally to
    keys 0..i, so the span's (query, key) pairs are count*start + count*(count+1)/2.
    Cached K/V (start tokens) is read once, the new K/V written once. Padding
    tokens (legacy padded batches) cost linear FLOPs and a K/V write like real
    tokens; as in the kernel's padded batches, each attends only to itself.
    """
    tokens = padding_tokens
    pairs = padding_tokens
    cached = 0
    sequences = 0
    for start, count in spans:
        tokens += count
        pairs += count * start + count * (count + 1) // 2
        cached += start
        sequences += 1
    return PassWork(tokens * model.linear_flops_per_token, pairs * model.attention_flops_unit, model.weight_bytes,
                    (cached + tokens) * model.kv_bytes_per_token, tokens, sequences, model.layers,
                    tokens * model.elementwise_bytes_per_token, tokens * model.elementwise_sharded_bytes_per_token,
                    tokens * model.allreduce_bytes_per_token)


def blend(compute: float, memory: float, p: float) -> float:
    """The p-norm of two times: max(a, b) as p grows, their sum at p = 1. A GEMM near its ridge point
    overlaps its loads and its math only in part (docs/simulator.md: the fit to measured GEMMs)."""
    hi, lo = max(compute, memory), min(compute, memory)
    return hi * (1 + (lo / hi) ** p) ** (1 / p) if hi > 0 else 0.0


def allreduce_seconds(gpu: GPUSpec, message_bytes: float) -> float:
    """One all-reduce over the tp GPUs: latency + 2(t-1)/t x bytes / bus bandwidth (ring); 0 on one GPU."""
    t = gpu.tp
    if t <= 1:
        return 0.0
    return gpu.link_latency + 2 * (t - 1) / t * message_bytes / gpu.link_bandwidth


def step_cost(gpu: GPUSpec, passes: list, swap_bytes: int = 0, copy_bytes: int = 0) -> StepCost:
    """Price a step: `passes` is one PassWork per forward pass (one per program). With tp GPUs, every
    GPU does 1/tp of the FLOPs and reads 1/tp of the weights and K/V, then two all-reduces per layer
    (after attention's output projection and after the MLP) join the partial sums."""
    cost = StepCost()
    t = gpu.tp
    flops_rate = gpu.peak_flops * gpu.matmul_efficiency
    for work in passes:
        linear_c = work.linear_flops / t / flops_rate
        linear_m = work.weight_bytes / t / (gpu.hbm_bandwidth * gpu.bandwidth_efficiency)
        attn_c = work.attention_flops / t / flops_rate
        attn_m = work.kv_bytes / t / (gpu.hbm_bandwidth * gpu.attention_efficiency)
        elementwise = ((work.elementwise_bytes + work.elementwise_sharded_bytes / t)
                       / (gpu.hbm_bandwidth * gpu.elementwise_efficiency))
        linear = blend(linear_c, linear_m, gpu.gemm_blend)
        attention = max(attn_c, attn_m)
        launch = work.layers * gpu.layer_overhead
        comm = 2 * work.layers * allreduce_seconds(gpu, work.allreduce_bytes)
        cost.flops += work.flops
        cost.hbm_bytes += work.hbm_bytes
        cost.compute += linear_c + attn_c
        cost.memory += linear_m + attn_m + elementwise
        cost.linear += linear
        cost.attention += attention
        cost.elementwise += elementwise
        cost.launch += launch
        cost.comm += comm
        cost.forward += linear + attention + elementwise + launch + comm
        cost.compute_bound += linear_c + attn_c > linear_m + attn_m
        cost.overhead += gpu.step_overhead + work.sequences * gpu.seq_overhead
        issue = issue_seconds(gpu, work)
        device = linear + attention + elementwise + launch + comm
        cost.issue += issue
        cost.host_wait += max(0.0, issue - device)
        cost.host_bound += issue > device
    cost.swap = swap_bytes / t / gpu.pcie_bandwidth        # each GPU swaps its slice over its own link
    cost.copy = 2 * copy_bytes / t / (gpu.hbm_bandwidth * gpu.bandwidth_efficiency)
    return cost


def issue_seconds(gpu: GPUSpec, work: PassWork) -> float:
    """Host seconds to issue one pass: one graph replay for a pure-decode pass when graphs are on (every
    sequence brings one token), else a launch per kernel (layers x launches_per_layer)."""
    if gpu.graphs and work.tokens == work.sequences > 0:
        return gpu.graph_launch
    return work.layers * gpu.launches_per_layer * gpu.launch_host


def decode_crossover_batch(gpu: GPUSpec, model: ModelCost, context: int = 0) -> float:
    """Batch size at which a pure decode step's compute terms outgrow its memory terms, every sequence
    at `context` cached tokens; inf when they never do (K/V reads grow as fast as the FLOPs)."""
    flops_rate = gpu.peak_flops * gpu.matmul_efficiency
    weight_rate = gpu.hbm_bandwidth * gpu.bandwidth_efficiency
    kv_rate = gpu.hbm_bandwidth * gpu.attention_efficiency
    per_seq_s = (model.linear_flops_per_token + (context + 1) * model.attention_flops_unit) / flops_rate
    per_seq_bytes_s = (context + 1) * model.kv_bytes_per_token / kv_rate
    # B * flops / F = W / BW + B * bytes / BW_kv  (tp divides every term alike)
    denom = per_seq_s - per_seq_bytes_s
    return model.weight_bytes / weight_rate / denom if denom > 0 else float("inf")
