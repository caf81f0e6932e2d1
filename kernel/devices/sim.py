"""The simulated device `sim:<gpu>`: frames are counted, steps are priced, time is virtual.

simulate_step() prices each step with costmodel.py from the programs' step_cost (the optional ABI
in kernel/program.py) and advances the clock the kernel reads for every timestamp. Constants come
from a GPU preset, each overridable: SimDevice("sim:a100", hbm_bandwidth=1.6e12); tp=N prices a
tensor-parallel group of N such GPUs (weights, K/V and FLOPs split, two all-reduces per layer).
"""
from __future__ import annotations

from kernel.devices.base import Device
from kernel.devices.costmodel import GPUS, StepCost, forward_work, gpu_spec, step_cost  # noqa: F401 (GPUS: re-exported)
from kernel.errors import EINVAL, KernelPanic, KvosError


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
        totals = self.totals
        for field, value in vars(cost).items():
            setattr(totals, field, getattr(totals, field) + value)
        return seconds

    # -- memory ------------------------------------------------------------------
    def default_memory(self, program) -> int:
        """KV bytes: the usable share of the devices' memory less the weights and activation reserves."""
        budget = self.memory_budget(program)
        if budget["kv_bytes"] <= 0:
            raise KvosError(EINVAL, f"{getattr(program, 'name', 'the model')} does not fit {self.gpu.label}: "
                                    f"weights {budget['weight_bytes']} bytes, usable {budget['usable_bytes']}")
        return budget["kv_bytes"]

    def memory_budget(self, program) -> dict:
        """The arithmetic behind default_memory, term by term (bytes and tokens). With tp GPUs each
        holds 1/tp of the weights and of every frame (its K/V heads) beside its own activations."""
        gpu = self.gpu
        t = gpu.tp
        cost = getattr(program, "step_cost", None)
        for what, count in (("query heads", getattr(cost, "heads", 0)), ("K/V heads", getattr(cost, "kv_heads", 0))):
            if t > 1 and count % t:
                raise KvosError(EINVAL, f"{getattr(program, 'name', 'the model')}: {count} {what} do not divide "
                                        f"over tp={t} GPUs")
        usable = int(gpu.memory_bytes * gpu.memory_utilization)
        weights = getattr(program, "resident_weight_bytes", None) or program.cost.weight_bytes
        kv = t * (usable - gpu.activation_reserve) - weights
        per_token = program.kv_shape.bytes_per_token
        return {"memory_bytes": gpu.memory_bytes, "memory_utilization": gpu.memory_utilization, "tp": t,
                "usable_bytes": t * usable, "weight_bytes": weights, "activation_reserve": t * gpu.activation_reserve,
                "kv_bytes": kv, "kv_bytes_per_token": per_token, "kv_tokens": max(0, kv) // per_token}

    def kv_view(self, shape):
        raise KernelPanic("SimDevice.kv_view: the simulated device holds no tensors")

