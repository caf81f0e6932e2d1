"""Kernel shm segments: a shared prefix prefilled once by a builder process, then pinned.

shmget() queues a builder process that prefills the tokens like any other
process; when its prompt is computed, its address space becomes a memory
manager segment (pinned, pages named) and the builder is reaped. Processes
spawned with shm=shmid wait until the segment is ready and then map its pages.
"""
from dataclasses import dataclass


@dataclass
class ShmSegment:
    shmid: int
    tenant: object
    tokens: list
    builder: int | None = None       # pid prefilling it
    mm_shmid: int | None = None      # the memory manager's segment once built

    @property
    def ready(self) -> bool:
        return self.mm_shmid is not None
