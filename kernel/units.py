"""Parsing of human sizes ("256MiB", "1GiB", 4096) used by boot options."""
import re

from kernel.errors import EINVAL, KvosError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}


def parse_bytes(value, what: str = "size") -> int:
    """Return a byte count from an int or a string like '256MiB'; EINVAL otherwise."""
    if isinstance(value, bool):
        raise KvosError(EINVAL, f"{what}: expected a size like '256MiB', got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise KvosError(EINVAL, f"{what}: cannot read {value!r} as a size (try '256MiB')")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise KvosError(EINVAL, f"{what}: expected a size like '256MiB', got {type(value).__name__}")
    if n < 0:
        raise KvosError(EINVAL, f"{what}: must not be negative, got {value!r}")
    return n


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
