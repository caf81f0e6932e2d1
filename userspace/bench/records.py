"""Per-sample records every system fills the same way, and the result dict it returns.

A sample is one generated sequence (a request has n of them). token_times[i] is when
token i became visible to the caller, in seconds since the run's start (the moment
every arrival-0 request was handed over). Systems record, the parent computes metrics.
"""
from __future__ import annotations

import resource
from dataclasses import asdict, dataclass, field


@dataclass
class SampleRecord:
    request: int                 # index of the request in the workload
    sample: int                  # 0 .. n-1
    prompt_len: int
    output_len: int              # prescribed
    arrival: float               # seconds after the start
    token_times: list = field(default_factory=list)
    tokens: list | None = None   # generated ids, only when the options ask for them
    finish_reason: str | None = None

    @property
    def generated(self) -> int:
        return len(self.token_times)


def samples_of(workload) -> list:
    """One empty record per sample, in workload order."""
    return [SampleRecord(r.index, j, r.prompt_len, r.output_len, r.arrival)
            for r in workload.requests for j in range(r.n)]


def cpu_time() -> float:
    """CPU seconds this process has used, every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def result(system: str, samples: list, *, load_seconds: float, wall_seconds: float, mode: str,
           cpu_seconds: float | None = None,
           kv_peak_bytes: int | None = None, kv_private_peak_bytes: int | None = None,
           kv_capacity_bytes: int | None = None, return_tokens: bool = False, extra: dict | None = None,
           notes: list | None = None) -> dict:
    """The JSON a system prints. cpu_seconds: CPU time of the run (from its start to its end, every
    thread), the contention-proof measure with one thread. kv_private_peak_bytes: the same moment's
    pages counted once per sample that maps them (what independent copies would need)."""
    rows = []
    for s in samples:
        row = asdict(s)
        if not return_tokens:
            row.pop("tokens")
        rows.append(row)
    return {"ok": True, "system": system, "mode": mode, "load_seconds": load_seconds, "wall_seconds": wall_seconds,
            "cpu_seconds": cpu_seconds,
            "kv_peak_bytes": kv_peak_bytes, "kv_private_peak_bytes": kv_private_peak_bytes,
            "kv_capacity_bytes": kv_capacity_bytes, "samples": rows, "extra": extra or {}, "notes": notes or []}
