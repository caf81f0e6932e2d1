"""The kernel log: a bounded ring of events (admissions, preemptions, swaps, faults, exits)."""
import time
from collections import deque

from kernel.results import LogEntry


class Dmesg:
    def __init__(self, capacity: int = 4096, clock=time.monotonic):
        self.entries: deque = deque(maxlen=capacity)
        self.clock = clock
        self.boot_time = clock()
        self.seq = 0
        self.step = 0

    def log(self, event: str, message: str, *, tid=None, pid=None, level: str = "info") -> None:
        self.seq += 1
        self.entries.append(LogEntry(self.seq, self.clock() - self.boot_time, self.step, level,
                                     event, message, tid, pid))

    def read(self, tid=None, since: int = 0, limit: int | None = None) -> list:
        """Entries after `since`, only those of tenant `tid` when given."""
        out = [e for e in self.entries if e.seq > since and (tid is None or e.tid == tid)]
        return out[-limit:] if limit else out
