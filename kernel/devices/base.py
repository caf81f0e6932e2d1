"""The small device interface the memory manager and the kernel use.

A device owns two memories: the frame pool (KV cache) and the host swap area.
The memory manager never touches bytes itself; it queues memory operations
(copy-on-write copies, swap traffic) and the device runs them in order, each run
of same-kind operations as one batched call. Running them in queue order keeps
every hazard simple: a frame freed by a swap-out and reused in the same step is
read before it is written.
"""
from dataclasses import dataclass, field


class DeviceLost(Exception):
    """The device can run no more forward passes (a tensor-parallel rank died or hung). The kernel
    ends the processes of the step with EIO; memory bookkeeping goes on as before."""


@dataclass(frozen=True)
class MemOp:
    kind: str   # "copy" (frame -> frame), "swap_out" (frame -> slot), "swap_in" (slot -> frame)
    src: int
    dst: int


@dataclass
class DeviceStats:
    """Bytes moved by memory operations since boot (the simulator prices them)."""
    copy_bytes: int = 0
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    batches: dict = field(default_factory=dict)   # kind -> number of batched calls


class Device:
    """Base class: bookkeeping of sizes and stats; subclasses move the bytes.

    A device without tensors (the simulator) runs no forward pass: the kernel
    asks it to price each step (simulate_step) and reads time from its clock.
    """

    kind = "none"
    has_tensors = False

    def default_memory(self, program) -> int:
        """KV memory in bytes when boot() was given memory=None."""
        return 256 * 1024**2

    def clock(self) -> float:
        """Seconds on this device's clock: wall time here, virtual time on the simulator."""
        import time
        return time.monotonic()

    def simulate_step(self, groups: list, plan) -> float:
        """Devices without tensors: advance the clock by the cost of one step and return it.
        `groups` is [(program, works)] per program in the step; `plan` the scheduler's plan."""
        from kernel.errors import KernelPanic
        raise KernelPanic(f"{type(self).__name__} runs real forward passes; simulate_step is for the simulator")

    def __init__(self, name: str):
        self.name = name
        self.num_frames = 0
        self.frame_bytes = 0
        self.num_swap_slots = 0
        self.stats = DeviceStats()

    def forward(self, program, batch, kv):
        """Run one program's forward pass on this device (a tensor-parallel device first tells its
        other ranks to run the same one)."""
        return program.forward(batch, kv)

    def attach_program(self, spec, program) -> None:
        """A program was loaded for this device from `spec` (a tensor-parallel device has its other
        ranks load it too)."""

    def close(self) -> None:
        """Release what the device holds outside this process (tensor-parallel workers)."""

    # -- memory -------------------------------------------------------------
    def create_pool(self, num_frames: int, frame_bytes: int) -> None:
        self.num_frames, self.frame_bytes = num_frames, frame_bytes

    def create_swap(self, num_slots: int) -> None:
        self.num_swap_slots = num_slots

    def run(self, ops: list) -> None:
        """Run queued MemOps in order, batching runs of the same kind.

        A run is cut where batching could reorder two operations: a destination
        written twice (a swap slot freed and reused within the step), or a
        location read after the run wrote it. Every batch is then free of
        hazards and may copy its entries in parallel.
        """
        i = 0
        while i < len(ops):
            kind = ops[i].kind
            same_memory = kind == "copy"      # swap ops read one memory and write the other
            sources, targets = set(), set()
            j = i
            while j < len(ops) and ops[j].kind == kind and ops[j].dst not in targets and not (
                    same_memory and (ops[j].src in targets or ops[j].dst in sources)):
                sources.add(ops[j].src)
                targets.add(ops[j].dst)
                j += 1
            self._run_batch(kind, ops[i:j])
            i = j

    def _run_batch(self, kind: str, run: list) -> None:
        src, dst = [op.src for op in run], [op.dst for op in run]
        self.stats.batches[kind] = self.stats.batches.get(kind, 0) + 1
        moved = len(run) * self.frame_bytes
        if kind == "copy":
            self.stats.copy_bytes += moved
            self._copy_frames(src, dst)
        elif kind == "swap_out":
            self.stats.swap_out_bytes += moved
            self._swap_out(src, dst)
        elif kind == "swap_in":
            self.stats.swap_in_bytes += moved
            self._swap_in(src, dst)
        else:
            from kernel.errors import KernelPanic
            raise KernelPanic(f"Device.run: unknown memory op {kind!r}")

    def _copy_frames(self, src, dst):
        pass

    def _swap_out(self, frames, slots):
        pass

    def _swap_in(self, slots, frames):
        pass

    def synchronize(self) -> None:
        pass
