"""The roofline of a kvos run: the least time its real steps could take on this machine.

A kvos system records, for every step it ran (from the trace() step records), what that step had to
do: FLOPs in the linear layers, FLOPs in attention, and bytes read (every weight once, and the K/V of
each sequence's context). The parent prices the steps with the rates measured in the same run (the
ceiling): per step the larger of compute time and read time, summed over the steps. The run's wall
time over that sum is how far the software is from the machine (`roofline_fraction`, 1.0 = at it).

Per step, over its works (sequence i computes count_i tokens after start_i cached ones):
  tokens   = sum count_i;  sampled = works that drew a token (only their rows reach the LM head)
  linear   = 2 x ((params - head) x tokens + head x sampled)       head = vocab x hidden
  pairs    = sum (count_i x start_i + count_i (count_i + 1) / 2)      causal (query, key) pairs
  attention = 4 x layers x heads x head_dim x pairs
  bytes    = weight_bytes + (sum start_i + tokens) x kv_bytes_per_token
  seconds  = max(linear / matmul rate + attention / fp32 rate, bytes / read rate)
"""
from __future__ import annotations


class StepWork:
    """Accumulates (linear FLOPs, attention FLOPs, bytes) per step from a tenant's TenantInfo."""

    def __init__(self, info):
        cost = info.cost or {}
        self.ok = bool(cost)
        self.params = cost.get("num_params", 0)
        self.head = info.vocab_size * cost.get("hidden_size", 0)
        self.weight_bytes = cost.get("weight_bytes", 0)
        self.attention_unit = 4 * cost.get("num_layers", 0) * cost.get("num_heads", 0) * cost.get("head_dim", 0)
        self.kv_bytes_per_token = info.kv_bytes_per_token
        self.matmul_dtype = info.matmul_dtype
        self.steps = []                   # [linear FLOPs, attention FLOPs, bytes] per step

    def add(self, record) -> None:
        tokens = pairs = cached = sampled = 0
        for w in record.works:
            tokens += w.count
            cached += w.start
            pairs += w.count * w.start + w.count * (w.count + 1) // 2
            sampled += w.token is not None
        if not tokens:
            return
        linear = 2 * ((self.params - self.head) * tokens + self.head * sampled)
        self.steps.append([linear, pairs * self.attention_unit,
                           self.weight_bytes + (cached + tokens) * self.kv_bytes_per_token])

    def to_json(self) -> dict | None:
        """What the child reports; None when the program states no cost."""
        if not self.ok:
            return None
        return {"matmul_dtype": self.matmul_dtype, "weight_bytes": self.weight_bytes,
                "kv_bytes_per_token": self.kv_bytes_per_token, "steps": self.steps}


def matmul_rate(ceiling: dict, matmul_dtype: str) -> float | None:
    """The measured GEMM rate for the linear layers' dtype: bf16 (the faster of oneDNN and bf16 panels)
    or the fp32 ceiling."""
    if matmul_dtype == "bfloat16" and ceiling.get("bf16_gemm_flops"):
        return ceiling["bf16_gemm_flops"]
    return ceiling.get("flops")


def roofline_seconds(work: dict | None, ceiling: dict) -> dict | None:
    """{seconds, compute_bound_steps, steps} of the recorded steps at the measured rates; None
    without a record or a ceiling."""
    if not work or not ceiling.get("ok") or not ceiling.get("flops") or not ceiling.get("read_bytes_per_s"):
        return None
    linear_rate, fp32, read = matmul_rate(ceiling, work["matmul_dtype"]), ceiling["flops"], ceiling["read_bytes_per_s"]
    total, compute_bound = 0.0, 0
    for linear, attention, nbytes in work["steps"]:
        compute, memory = linear / linear_rate + attention / fp32, nbytes / read
        total += max(compute, memory)
        compute_bound += compute > memory
    return {"seconds": total, "compute_bound_steps": compute_bound, "steps": len(work["steps"])}
