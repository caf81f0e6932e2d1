"""Request bodies as JSON, strictly: nested at most MAX_DEPTH deep, no NaN or Infinity, text that is
valid Unicode. A body 100,000 arrays deep made json.loads raise RecursionError (a 500); now every
way a body can be wrong is EINVAL naming what is wrong.
"""
from __future__ import annotations

import json
import re

from kernel.errors import EINVAL, KvosError

MAX_DEPTH = 64               # a chat is 4 deep (body, messages, message, content part); 64 leaves room
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")     # how a lone surrogate can get into a string


def loads(raw: bytes, what: str):
    """The JSON value of `raw`; KvosError(EINVAL) when it is not strict JSON within MAX_DEPTH."""
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise KvosError(EINVAL, f"{what}: the body is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as err:             # JSONDecodeError, UnicodeDecodeError, an integer of 4,300+ digits
        raise KvosError(EINVAL, f"{what}: the body is not valid JSON ({err})") from None
    _check(value, what, unicode=_SURROGATE_ESCAPE.search(raw) is not None)
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check(value, what: str, unicode: bool) -> None:
    """Depth, and (when an escape could have made one) no lone surrogate in any string or key.
    Iterative, so the walk itself cannot recurse; scalars are visited only to check text."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if unicode:
                _text(item, what)
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            raise KvosError(EINVAL, f"{what}: the body is nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            if unicode:
                for key in item:
                    _text(key, what)
            item = item.values()
        kinds = (dict, list, str) if unicode else (dict, list)
        stack.extend([(c, depth + 1) for c in item if type(c) in kinds])     # type(): json makes no subclasses


def _text(s: str, what: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise KvosError(EINVAL, f"{what}: a string holds a lone surrogate ({s[:40]!r}): not valid Unicode") from None
