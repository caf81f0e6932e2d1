"""The roofline cost model the simulated device prices each step with.

A forward pass costs max(FLOPs / sustained throughput, HBM bytes / sustained bandwidth) plus a
fixed overhead; swap bytes cross PCIe, not overlapped. Equations and what they leave out:
docs/simulator.md.
"""
from __future__ import annotations

from dataclasses import dataclass


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
