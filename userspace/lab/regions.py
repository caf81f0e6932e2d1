"""Solution regions: the lines between `# LAB(name): BEGIN` and `# LAB(name): END` in the real source.

For the lab tool (start, grade) and its CI checks. A region is the reference
solution, and it ships: the skeleton of a lab is the source with that lab's
regions replaced by their stub, the statement after `->` in the BEGIN marker
(`# LAB(cow): BEGIN -> return False`), by default `raise NotImplementedError`.
"""
from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass

from kernel.errors import EINVAL, KvosError

MARKER = re.compile(r"^(?P<indent>[ \t]*)# LAB\((?P<lab>[a-z0-9_-]+)\): (?P<kind>BEGIN|END)\b"
                    r"(?:\s*->\s*(?P<stub>.*\S))?\s*$")


@dataclass(frozen=True)
class Region:
    lab: str
    begin: int            # line index (0-based) of the BEGIN marker
    end: int              # line index of the END marker
    indent: str
    stub: str             # the statement a student starts from
    where: str            # the function it sits in ("MemoryManager.fork")


def find(text: str, path: str = "<source>") -> list:
    """Every region of `text`, in order. Markers must pair up, one region at a time."""
    lines = text.splitlines()
    regions, open_ = [], None
    for i, line in enumerate(lines):
        m = MARKER.match(line)
        if m is None:
            if "# LAB(" in line and line.lstrip().startswith("# LAB("):
                raise KvosError(EINVAL, f"{path}:{i + 1}: a LAB marker that is neither BEGIN nor END: {line.strip()!r}")
            continue
        if m["kind"] == "BEGIN":
            if open_ is not None:
                raise KvosError(EINVAL, f"{path}:{i + 1}: LAB({m['lab']}) begins inside LAB({open_['lab']})")
            open_, start = m, i
        else:
            if open_ is None or open_["lab"] != m["lab"] or open_["indent"] != m["indent"]:
                raise KvosError(EINVAL, f"{path}:{i + 1}: LAB({m['lab']}) END without its BEGIN at this indent")
            regions.append(Region(m["lab"], start, i, m["indent"], "", ""))
            regions[-1] = _complete(regions[-1], open_["stub"], text, path)
            open_ = None
    if open_ is not None:
        raise KvosError(EINVAL, f"{path}: LAB({open_['lab']}) never ends")
    return regions


def _complete(region: Region, stub: str | None, text: str, path: str) -> Region:
    where = function_at(text, region.begin + 1)
    if where is None:
        raise KvosError(EINVAL, f"{path}:{region.begin + 1}: LAB({region.lab}) is not inside a function")
    stub = stub or f'raise NotImplementedError("lab {region.lab}: {where}")'
    return Region(region.lab, region.begin, region.end, region.indent, stub, where)


def function_at(text: str, lineno: int) -> str | None:
    """The qualified name of the innermost function holding line `lineno` (1-based), or None."""
    best = None

    def visit(node, prefix):
        nonlocal best
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if child.lineno <= lineno <= child.end_lineno:
                    if not isinstance(child, ast.ClassDef):
                        best = name
                    visit(child, name + ".")
    visit(ast.parse(text), "")
    return best


def labs_in(text: str, path: str = "<source>") -> set:
    return {r.lab for r in find(text, path)}


def strip(text: str, lab: str, path: str = "<source>") -> str:
    """`text` with every region of `lab` replaced by its stub (other labs' regions stay as they are)."""
    lines = text.splitlines(keepends=True)
    for r in reversed([r for r in find(text, path) if r.lab == lab]):
        lines[r.begin:r.end + 1] = [f"{r.indent}# LAB({lab}): your code here (docs/labs/{lab}.md)\n",
                                    f"{r.indent}{r.stub}\n"]
    return "".join(lines)


def _same_code(line: str, want: str) -> bool:
    """Whether `line` is the statement `want`, give or take indentation and a trailing comment."""
    code = line.strip()
    return code == want or (code.startswith(want) and code[len(want):].lstrip().startswith("#"))


def mutate(text: str, lab: str, old: str, new: str, path: str = "<source>") -> str:
    """`text` with the lines `old` (compared without indentation or trailing comments) replaced by `new`,
    indented as the first of them. `old` must occur exactly once, inside a region of `lab`: what
    the stored wrong solutions are made of."""
    want = [line.strip() for line in textwrap.dedent(old).strip("\n").splitlines()]
    lines = text.splitlines(keepends=True)
    hits = []
    for r in (r for r in find(text, path) if r.lab == lab):
        for i in range(r.begin + 1, r.end - len(want) + 1):
            if all(_same_code(line, w) for line, w in zip(lines[i:i + len(want)], want)):
                hits.append(i)
    if len(hits) != 1:
        raise KvosError(EINVAL, f"{path}: the lines to change occur {len(hits)} times in LAB({lab}) regions, "
                                f"not once: {want[0]!r}...")
    i = hits[0]
    indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
    body = textwrap.dedent(new).strip("\n")
    replacement = [f"{indent}{line}\n" if line.strip() else "\n" for line in body.splitlines()] if body else []
    lines[i:i + len(want)] = replacement
    return "".join(lines)
