"""The simulated device `sim:<gpu>`: frames are counted, steps are priced, time is virtual.

simulate_step() prices each step with costmodel.py from the programs' step_cost (the optional ABI
in kernel/program.py) and advances the clock the kernel reads for every timestamp. Constants come
from a GPU preset, each overridable: SimDevice("sim:a100", hbm_bandwidth=1.6e12).
"""
from __future__ import annotations

import dataclasses

from kernel.devices.base import Device
from kernel.devices.costmodel import GPUSpec, StepCost, forward_work, step_cost
from kernel.errors import EINVAL, KernelPanic, KvosError

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


class SimDevice(Device):
    kind = "sim"
    has_tensors = False

    def __init__(self, name: str = "sim:a100-80g", **overrides):
        self.gpu = gpu_spec(name, **overrides)
        super().__init__(f"sim:{self.gpu.key}")
        self.now = 0.0                    # virtual seconds since boot
        self.last_plan = None             # the plan of the last priced step (drivers read it)
        self.last_cost: StepCost | None = None
        self.busy = 0.0                   # seconds spent in steps, and in each term
        self.totals = StepCost()
        self._priced = (0, 0, 0)          # (swap out, swap in, copy) bytes already charged to a step

    # -- time ------------------------------------------------------------------
    def clock(self) -> float:
        return self.now

    def advance_to(self, t: float) -> None:
        """Let virtual time pass while the device is idle (a driver waiting for the next arrival)."""
        if t > self.now:
            self.now = t

    def simulate_step(self, groups: list, plan) -> float:
        """Price one step: each program's forward pass, plus the swap and copy bytes the memory
        manager moved since the last step; advance the clock by it."""
        stats = self.stats
        out_b, in_b, copy_b = stats.swap_out_bytes, stats.swap_in_bytes, stats.copy_bytes
        swap = (out_b - self._priced[0]) + (in_b - self._priced[1])
        copied = copy_b - self._priced[2]
        self._priced = (out_b, in_b, copy_b)
        padding = plan.padding_tokens                  # all of a step's padding goes to its first pass
        passes = []
        for program, works in groups:
            model = getattr(program, "step_cost", None)
            if model is None:
                raise KernelPanic(f"SimDevice.simulate_step: program {getattr(program, 'name', program)!r} "
                                  f"has no cost model for the simulated device")
            passes.append(forward_work(model, [(w.start, w.count) for w in works], padding))
            padding = 0
        cost = step_cost(self.gpu, passes, swap, copied)
        seconds = cost.total
        self.now += seconds
        self.busy += seconds
        self.last_plan, self.last_cost = plan, cost
        for field in ("flops", "hbm_bytes", "compute", "memory", "forward", "overhead", "swap", "copy",
                      "compute_bound"):
            setattr(self.totals, field, getattr(self.totals, field) + getattr(cost, field))
        return seconds

    # -- memory ------------------------------------------------------------------
    def default_memory(self, program) -> int:
        """KV bytes: the usable share of device memory less the weights and an activation reserve."""
        budget = self.memory_budget(program)
        if budget["kv_bytes"] <= 0:
            raise KvosError(EINVAL, f"{getattr(program, 'name', 'the model')} does not fit {self.gpu.label}: "
                                    f"weights {budget['weight_bytes']} bytes, usable {budget['usable_bytes']}")
        return budget["kv_bytes"]

    def memory_budget(self, program) -> dict:
        """The arithmetic behind default_memory, term by term (bytes and tokens)."""
        gpu = self.gpu
        usable = int(gpu.memory_bytes * gpu.memory_utilization)
        weights = getattr(program, "resident_weight_bytes", None) or program.cost.weight_bytes
        kv = usable - weights - gpu.activation_reserve
        per_token = program.kv_shape.bytes_per_token
        return {"memory_bytes": gpu.memory_bytes, "memory_utilization": gpu.memory_utilization,
                "usable_bytes": usable, "weight_bytes": weights, "activation_reserve": gpu.activation_reserve,
                "kv_bytes": kv, "kv_bytes_per_token": per_token, "kv_tokens": max(0, kv) // per_token}

    def kv_view(self, shape):
        raise KernelPanic("SimDevice.kv_view: the simulated device holds no tensors")

