"""Devices whose memories are torch tensors: `cpu` and `cuda`.

The pool is a uint8 tensor (num_frames, frame_bytes) on the device; the swap
area a uint8 tensor (num_slots, frame_bytes) in host memory (pinned for CUDA,
so swap copies are DMA). Copies go through kernel/ops, the one door to
compiled code.
"""
import torch

from kernel import ops
from kernel.devices.base import Device
from kernel.errors import ENODEV, KvosError
from kernel.kvcache import KVShape, KVView


class TorchDevice(Device):
    has_tensors = True

    def __init__(self, name: str):
        super().__init__(name)
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise KvosError(ENODEV, f"device {name!r}: torch sees no CUDA GPU on this machine")
        self.torch_device = torch.device(name)
        self.kind = self.torch_device.type
        self.pool = None
        self.swap = None

    def create_pool(self, num_frames: int, frame_bytes: int) -> None:
        super().create_pool(num_frames, frame_bytes)
        self.pool = torch.empty((num_frames, frame_bytes), dtype=torch.uint8, device=self.torch_device)

    def create_swap(self, num_slots: int) -> None:
        super().create_swap(num_slots)
        pin = self.kind == "cuda"
        self.swap = torch.empty((num_slots, self.frame_bytes), dtype=torch.uint8, pin_memory=pin)

    def default_memory(self, program) -> int:
        """CPU: 256 MiB. CUDA: 80% of what is free once the weights are loaded (as vLLM's
        gpu_memory_utilization does, leaving room for activations)."""
        if self.kind == "cuda":
            free, _ = torch.cuda.mem_get_info(self.torch_device)
            return int(free * 0.8)
        return super().default_memory(program)

    def kv_view(self, shape: KVShape) -> KVView:
        return KVView(self.pool, shape)

    def _index(self, values):
        return torch.tensor(values, dtype=torch.int32)

    def _copy_frames(self, src, dst):
        ops.copy_frames(self.pool, self._index(src), self._index(dst))

    def _swap_out(self, frames, slots):
        ops.swap_out(self.pool, self.swap, self._index(frames), self._index(slots))

    def _swap_in(self, slots, frames):
        ops.swap_in(self.swap, self.pool, self._index(slots), self._index(frames))

    def read_frame(self, frame: int) -> torch.Tensor:
        """A host copy of one frame's bytes (introspection and tests)."""
        return self.pool[frame].cpu()

    def synchronize(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.torch_device)
