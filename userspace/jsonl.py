"""JSONL request traces: one JSON object a line, read the same way by `kvos sim` and `kvos bench`.

Blank lines and lines starting with # are skipped; a missing file is ENOENT, a line that is not
a JSON object is EINVAL naming file and line, so each reader only checks its own fields.
"""
from __future__ import annotations

import json
from pathlib import Path

from kernel.errors import EINVAL, ENOENT, KvosError


def json_objects(path):
    """Yield (where, obj) for every object line of the file; where is "path:line" for messages."""
    path = Path(path)
    if not path.is_file():
        raise KvosError(ENOENT, f"{path}: no such trace file")
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise KvosError(EINVAL, f"{where}: not JSON ({err})") from None
        if not isinstance(obj, dict):
            raise KvosError(EINVAL, f"{where}: each line holds one JSON object")
        yield where, obj
