"""The swap area: slots of host memory, one frame each, for preempted processes."""
from kernel.errors import KernelPanic


class SwapArea:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.used = set()

    @property
    def num_free(self) -> int:
        return len(self.free_slots)

    def alloc(self) -> int:
        if not self.free_slots:
            raise KernelPanic("SwapArea.alloc: no free slot (caller did not check num_free)")
        slot = self.free_slots.pop()
        self.used.add(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot not in self.used:
            raise KernelPanic(f"SwapArea.release: slot {slot} is not in use")
        self.used.remove(slot)
        self.free_slots.append(slot)
