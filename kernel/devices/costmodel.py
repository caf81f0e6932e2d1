"""The simulated GPU: its presets, and the roofline cost model that prices each step.

A forward pass costs max(FLOPs / sustained throughput, HBM bytes / sustained bandwidth) plus a
fixed overhead; swap bytes cross PCIe, not overlapped. Equations and what they leave out:
docs/simulator.md. Pure data and formulas, no kernel state: userspace may import this module
(the simulator's experiments reason with the same presets and formulas the device uses).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kernel.errors import EINVAL, KvosError


@dataclass(frozen=True)
class GPUSpec:
    """The constants of one simulated accelerator. Every field can be overridden."""
    key: str                         # preset name, e.g. "a100-80g"
    label: str                       # what the preset models
    peak_flops: float                # dense fp16/bf16 tensor-core FLOP/s
    hbm_bandwidth: float             # bytes/s
    memory_bytes: int                # device memory
    pcie_bandwidth: float            # host <-> device bytes/s, as pinned copies achieve (swap)
    step_overhead: float = 1e-3      # seconds per forward pass: scheduling, batch building, launches, sampling
    matmul_efficiency: float = 0.8   # sustained fraction of peak_flops (MFU of large GEMMs)
    bandwidth_efficiency: float = 0.9  # sustained fraction of hbm_bandwidth (MBU of streaming reads)
    memory_utilization: float = 0.9  # fraction of memory the engine may use (vLLM's default; the rest: CUDA context)
    activation_reserve: int = 1 << 30  # bytes kept for one step's activations, besides weights and KV

    @property
    def sustained_flops(self) -> float:
        return self.peak_flops * self.matmul_efficiency

    @property
    def sustained_bandwidth(self) -> float:
        return self.hbm_bandwidth * self.bandwidth_efficiency

    @property
    def ridge_point(self) -> float:
        """FLOPs per byte where a kernel turns from memory-bound to compute-bound."""
        return self.sustained_flops / self.sustained_bandwidth


GiB = 1 << 30

# Datasheet figures (dense fp16/bf16 tensor throughput, HBM bandwidth, memory as nvidia-smi
# shows it); PCIe as pinned host copies achieve: ~25 GB/s on Gen4 x16, ~50 GB/s on Gen5 x16.
GPUS = {
    "a100-80g": GPUSpec("a100-80g", "NVIDIA A100-SXM4-80GB", peak_flops=312e12, hbm_bandwidth=2.0e12,
                        memory_bytes=80 * GiB, pcie_bandwidth=25e9),
    "a100-40g": GPUSpec("a100-40g", "NVIDIA A100-SXM4-40GB", peak_flops=312e12, hbm_bandwidth=1.555e12,
                        memory_bytes=40 * GiB, pcie_bandwidth=25e9),
    "h100-80g": GPUSpec("h100-80g", "NVIDIA H100-SXM5-80GB", peak_flops=989e12, hbm_bandwidth=3.35e12,
                        memory_bytes=80 * GiB, pcie_bandwidth=50e9),
    "h200": GPUSpec("h200", "NVIDIA H200-SXM-141GB", peak_flops=989e12, hbm_bandwidth=4.8e12,
                    memory_bytes=141 * GiB, pcie_bandwidth=50e9),
}
GPU_ALIASES = {"a100": "a100-80g", "a100-80gb": "a100-80g", "a100-sxm4-80gb": "a100-80g", "a100-40gb": "a100-40g",
               "h100": "h100-80g", "h100-80gb": "h100-80g", "h100-sxm": "h100-80g",
               "h200-141g": "h200", "h200-141gb": "h200", "": "a100-80g"}


def gpu_spec(name: str, **overrides) -> GPUSpec:
    """The preset named by `name` ("sim:a100", "H100", "sim:h200,step_overhead=0"), with overrides."""
    if not isinstance(name, str):
        raise KvosError(EINVAL, f"sim device name must be a string, got {name!r}")
    key, *assignments = name.strip().lower().removeprefix("sim").removeprefix(":").split(",")
    key = GPU_ALIASES.get(key, key)
    if key not in GPUS:
        raise KvosError(EINVAL, f"unknown simulated GPU {name!r}: choose one of {', '.join(GPUS)} "
                                f"(aliases: {', '.join(a for a in GPU_ALIASES if a)})")
    for item in assignments:
        field, sep, value = item.partition("=")
        if not sep:
            raise KvosError(EINVAL, f"sim device {name!r}: override {item!r} is not field=value")
        try:
            overrides.setdefault(field.strip(), float(value))
        except ValueError:
            raise KvosError(EINVAL, f"sim device {name!r}: {field.strip()}={value!r} is not a number") from None
    return _override(GPUS[key], overrides)


def _override(spec: GPUSpec, overrides: dict) -> GPUSpec:
    fields = {f.name for f in dataclasses.fields(GPUSpec)} - {"key", "label"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise KvosError(EINVAL, f"unknown GPU constant {unknown[0]!r}: overridable are {', '.join(sorted(fields))}")
    for field, value in overrides.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
            raise KvosError(EINVAL, f"GPU constant {field} must be a finite number >= 0, got {value!r}")
        if value == 0 and field not in ("step_overhead", "activation_reserve"):
            raise KvosError(EINVAL, f"GPU constant {field} must be positive")
        if field.endswith(("_efficiency", "_utilization")) and value > 1:
            raise KvosError(EINVAL, f"GPU constant {field} is a fraction in (0, 1], got {value}")
    if "memory_bytes" in overrides or "activation_reserve" in overrides:
        overrides = {**overrides, **{f: int(overrides[f]) for f in ("memory_bytes", "activation_reserve")
                                     if f in overrides}}
    return dataclasses.replace(spec, **overrides)


@dataclass(frozen=True)
class ModelCost:
    """Per-program constants, computed once: what a token and a step cost."""
    linear_flops_per_token: int      # 2 x parameters touched per token
    attention_flops_unit: int        # 4 x layers x heads x head_dim: FLOPs of one (query, key) pair
    weight_bytes: int                # read once per forward pass
    kv_bytes_per_token: int          # K and V of one token, all layers


@dataclass
class StepCost:
    """What one step cost and why: every term in seconds, plus the work behind them."""
    flops: float = 0.0
    hbm_bytes: float = 0.0
    compute: float = 0.0             # sum over forward passes of FLOPs / sustained throughput
    memory: float = 0.0              # sum over forward passes of bytes / sustained bandwidth
    forward: float = 0.0             # sum over forward passes of max(compute, memory)
    overhead: float = 0.0
    swap: float = 0.0                # swap bytes / PCIe bandwidth
    copy: float = 0.0                # copy-on-write frame copies (read + write over HBM)
    compute_bound: int = 0           # forward passes whose compute term was the larger

    @property
    def total(self) -> float:
        return self.forward + self.overhead + self.swap + self.copy


def forward_work(model: ModelCost, spans, padding_tokens: int = 0) -> tuple:
    """(FLOPs, HBM bytes) of one forward pass over `spans`: (start, count) per sequence.

    A span computes tokens start..start+count-1; token i attends causally to
    keys 0..i, so the span's (query, key) pairs are count*start + count*(count+1)/2.
    Cached K/V (start tokens) is read once, the new K/V written once. Padding
    tokens (legacy padded batches) cost linear FLOPs and a K/V write like real
    tokens; as in the kernel's padded batches, each attends only to itself.
    """
    tokens = padding_tokens
    pairs = padding_tokens
    cached = 0
    for start, count in spans:
        tokens += count
        pairs += count * start + count * (count + 1) // 2
        cached += start
    flops = tokens * model.linear_flops_per_token + pairs * model.attention_flops_unit
    hbm = model.weight_bytes + (cached + tokens) * model.kv_bytes_per_token
    return flops, hbm


def step_cost(gpu: GPUSpec, passes: list, swap_bytes: int = 0, copy_bytes: int = 0) -> StepCost:
    """Price a step: `passes` is [(FLOPs, HBM bytes)] per forward pass (one per program)."""
    cost = StepCost()
    for flops, hbm in passes:
        compute = flops / gpu.sustained_flops
        memory = hbm / gpu.sustained_bandwidth
        cost.flops += flops
        cost.hbm_bytes += hbm
        cost.compute += compute
        cost.memory += memory
        cost.forward += max(compute, memory)
        cost.compute_bound += compute > memory
        cost.overhead += gpu.step_overhead
    cost.swap = swap_bytes / gpu.pcie_bandwidth
    cost.copy = 2 * copy_bytes / gpu.sustained_bandwidth
    return cost


def decode_crossover_batch(gpu: GPUSpec, model: ModelCost, context: int = 0) -> float:
    """Batch size at which a pure decode step turns compute-bound, every sequence at `context`
    cached tokens; inf when it never does (K/V reads grow as fast as the FLOPs)."""
    per_seq_flops = model.linear_flops_per_token + (context + 1) * model.attention_flops_unit
    per_seq_bytes = (context + 1) * model.kv_bytes_per_token
    # B * flops / F = (W + B * bytes) / BW  ->  B = W / (flops * BW / F - bytes)
    denom = per_seq_flops * gpu.sustained_bandwidth / gpu.sustained_flops - per_seq_bytes
    return model.weight_bytes / denom if denom > 0 else float("inf")
