"""The small device interface the memory manager and the kernel use.

A device owns two memories: the frame pool (KV cache) and the host swap area.
The memory manager never touches bytes itself; it queues memory operations
(copy-on-write copies, swap traffic) and the device runs them in order, each run
of same-kind operations as one batched call. Running them in queue order keeps
every hazard simple: a frame freed by a swap-out and reused in the same step is
read before it is written.
"""
from dataclasses import dataclass, field


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
    """Base class: bookkeeping of sizes and stats; subclasses move the bytes."""

    kind = "none"
    has_tensors = False

    def __init__(self, name: str):
        self.name = name
        self.num_frames = 0
        self.frame_bytes = 0
        self.num_swap_slots = 0
        self.stats = DeviceStats()

    # -- memory -------------------------------------------------------------
    def create_pool(self, num_frames: int, frame_bytes: int) -> None:
        self.num_frames, self.frame_bytes = num_frames, frame_bytes

    def create_swap(self, num_slots: int) -> None:
        self.num_swap_slots = num_slots

    def run(self, ops: list) -> None:
        """Run queued MemOps in order, batching runs of the same kind."""
        i = 0
        while i < len(ops):
            j = i
            while j < len(ops) and ops[j].kind == ops[i].kind:
                j += 1
            run = ops[i:j]
            src, dst = [op.src for op in run], [op.dst for op in run]
            kind = ops[i].kind
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
            i = j

    def _copy_frames(self, src, dst):
        pass

    def _swap_out(self, frames, slots):
        pass

    def _swap_in(self, slots, frames):
        pass

    def synchronize(self) -> None:
        pass
