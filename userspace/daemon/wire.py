"""The daemon's wire format: syscall results to JSON and back, and errno to HTTP status.

The server sends a syscall's result as {"result": ...} (dataclasses as objects);
the client rebuilds the same dataclasses from RESULTS, so code written against a
local handle works unchanged over HTTP. Errors travel as {errno, code, message}.
"""
from __future__ import annotations

import math
from dataclasses import asdict, fields, is_dataclass

from kernel import results as r
from kernel.errors import E2BIG, EAGAIN, EBUSY, EINVAL, EIO, ENODEV, ENOENT, ENOMEM, EPERM, ESRCH

# EAGAIN is 429 (a tenant's limit: retry later) unless the daemon is draining, then 503.
HTTP_STATUS = {EINVAL: 400, ESRCH: 404, ENOENT: 404, EPERM: 403, EAGAIN: 429, EBUSY: 409,
               ENOMEM: 413, E2BIG: 413, EIO: 500, ENODEV: 503}

# What each syscall returns: a dataclass, [dataclass], int, [int] or None. A test checks the
# keys against kernel.syscalls.SYSCALLS, so a new syscall cannot be forgotten here.
RESULTS = {
    "spawn_tenant": int, "kill_tenant": None, "spawn": int, "spawn_n": [int], "fork": [int], "write": None,
    "read": r.ReadResult, "wait": r.ExitStatus, "kill": None, "nice": int, "shmget": int, "shmrm": None,
    "ps": [r.ProcInfo], "pagemap": r.PageMap, "meminfo": r.MemInfo, "schedstat": r.SchedStat, "dmesg": [r.LogEntry],
    "tenantinfo": r.TenantInfo, "tokenize": [int], "detokenize": str, "trace": [r.StepRecord], "loopctl": r.LoopStatus,
    "uname": r.SystemInfo, "fsck": r.FsckReport, "cacheevents": [r.CacheEvent],
}

# Fields holding nested dataclasses (JSON cannot say which class an object was).
NESTED = {
    r.PageMap: {"pages": [r.PageEntry]},
    r.MemInfo: {"cgroups": {str: r.CgroupInfo}, "replicas": {int: r.MemInfo}},
    r.SchedStat: {"tenants": [r.TenantSched], "recent_steps": [r.StepRecord], "replicas": {int: r.SchedStat}},
    r.StepRecord: {"works": [r.WorkRecord], "waiting_by_tenant": {int: int}},
    r.ReadResult: {"logprobs": [r.TokenLogprob], "prompt_logprobs": [r.TokenLogprob]},
    r.TokenLogprob: {"top": [r.TopLogprob]},
}


def to_jsonable(value):
    """A result as JSON-ready data. Non-finite floats become null: JSON has no inf or NaN."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def rebuild(name: str, data):
    """The result of syscall `name` as the local handle returns it, from its JSON."""
    return _build(RESULTS[name], data)


def _build(kind, data):
    if data is None or kind is None or kind in (int, str):
        return data
    if isinstance(kind, list):
        return [_build(kind[0], item) for item in data]
    if isinstance(kind, dict):                 # JSON keys are strings: tids come back as ints
        ((key_kind, value_kind),) = kind.items()
        return {key_kind(k): _build(value_kind, v) for k, v in data.items()}
    nested = NESTED.get(kind, {})
    kwargs = {}
    for f in fields(kind):
        if f.name in data:           # a field the server lacks keeps its default (an older server)
            value = data[f.name]
            kwargs[f.name] = _build(nested[f.name], value) if f.name in nested else value
    return kind(**kwargs)


def error_body(errno: str, code: int, message: str) -> dict:
    return {"errno": errno, "code": code, "message": message}
