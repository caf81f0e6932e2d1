"""Structured output as the kernel's spawn keys: a JSON schema stays a json_schema; a regex, a list of
choices or a grammar become one Lark grammar (the kernel's `grammar`). The daemon reads vLLM's
`structured_outputs` request field with it, the shell its --json-schema, --regex, --choice, --grammar.

The kernel compiles JSON Schema and Lark (kernel/grammar.py); the other forms are turned into Lark
text here, in the caller's thread, by llguidance's converters: a regex becomes one terminal (its
slashes escaped), choices become quoted alternatives, and a GBNF grammar (`root ::= ...`, as vLLM's
examples write them for xgrammar) is translated. The result is checked here too, so that an error
names what the caller wrote. A regex or a grammar must match the whole reply, as in vLLM.
"""
from __future__ import annotations

import json

from kernel.argcheck import MAX_SCHEMA_BYTES
from kernel.errors import EINVAL, KvosError

KINDS = ("json", "regex", "choice", "grammar", "json_object")   # exactly one per request
# Options that change nothing here: kvos never falls back to another backend, and its JSON has no
# free whitespace whatever disable_any_whitespace says (docs/daemon.md).
IGNORED = ("disable_fallback", "disable_any_whitespace")
MAX_CHOICES = 1024


def field_name(kind: str) -> str:
    return f"structured_outputs.{kind}"


def spawn_keys(spec, name=field_name) -> dict:
    """{"json_schema": schema} or {"grammar": lark} for a structured_outputs object; {} for None.
    EINVAL for anything else, naming the field as name(kind) does (the shell names its options)."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise KvosError(EINVAL, "structured_outputs must be an object")
    given = [k for k in spec if spec[k] is not None and k not in IGNORED]
    unknown = [k for k in given if k not in KINDS]
    if unknown:
        raise KvosError(EINVAL, f"{name(unknown[0])} is not supported by kvosd (it takes one of "
                                f"{', '.join(KINDS)})")
    for key in IGNORED:
        if key in spec and not isinstance(spec[key], bool):
            raise KvosError(EINVAL, f"{name(key)} must be true or false")
    if spec.get("json_object") is False:
        given.remove("json_object")
    if len(given) != 1:
        raise KvosError(EINVAL, f"give exactly one of {', '.join(name(k) for k in KINDS)}"
                                + (f"; got {', '.join(name(k) for k in given)}" if given else ""))
    kind = given[0]
    value, where = spec[kind], name(kind)
    if kind == "json":
        return {"json_schema": _schema(value, where)}
    if kind == "json_object":
        if value is not True:
            raise KvosError(EINVAL, f"{where} must be true or false")
        return {"json_schema": {"type": "object"}}
    llg = _llguidance(where)
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise KvosError(EINVAL, f"{where} must be a non-empty string")
        lark = f"start: /{_convert(llg.regex_to_lark, value, where)}/"
    elif kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise KvosError(EINVAL, f"{where} must be a list of non-empty strings")
        if len(value) > MAX_CHOICES:
            raise KvosError(EINVAL, f"{where} may have at most {MAX_CHOICES} entries")
        lark = _convert(lambda v: llg.grammar_from("choice", json.dumps(v)), value, where)
    else:
        if not isinstance(value, str) or not value.strip():
            raise KvosError(EINVAL, f"{where} must be a non-empty string (Lark or GBNF)")
        lark = _convert(lambda v: llg.grammar_from("gbnf", v), value, where) if "::=" in value else value
    if len(lark.encode("utf-8", errors="replace")) > MAX_SCHEMA_BYTES:
        raise KvosError(EINVAL, f"{where}: the grammar it makes has more than {MAX_SCHEMA_BYTES} bytes")
    error = _convert(lambda v: llg.LLMatcher.validate_grammar(llg.grammar_from("lark", v)), lark, where)
    if error:                  # here, so that the error names the field (the kernel would say "grammar")
        raise KvosError(EINVAL, f"{where}: {_first_line(error)}")
    return {"grammar": lark}


def _schema(value, where: str):
    """vLLM takes the schema as an object or as its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise KvosError(EINVAL, f"{where} is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise KvosError(EINVAL, f"{where} must be a JSON Schema object (or its JSON text)")
    return value


def _convert(fn, value, where: str) -> str:
    try:
        return fn(value)
    except (ValueError, RuntimeError) as err:
        raise KvosError(EINVAL, f"{where}: {_first_line(str(err))}") from None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else "invalid"


def _llguidance(where: str):
    try:
        import llguidance
    except ImportError:
        raise KvosError(EINVAL, f"{where} needs the llguidance package (pip install llguidance)") from None
    return llguidance
