"""Copies of the project: the working copy a student starts from, and the tree a grader runs in.

A copy takes every file of the project but version control, caches and virtual environments, and
keeps the built C kernels (kernel/ops/_kvos_cpu*.so) so that it runs as it is, with PYTHONPATH
pointing at it.
"""
from __future__ import annotations

import fnmatch
import re
import shutil
from pathlib import Path

from kernel.errors import EINVAL, ENOENT, KvosError
from userspace.lab import regions
from userspace.lab.catalog import Lab

SKIP = (".git", ".venv", "__pycache__", "build", "*.egg-info", ".pytest_cache", ".hypothesis", ".ruff_cache",
        ".import_linter_cache", "out", ".whl", ".gl", "*.pyc")
NOT_FOR_GRADING = ("docs", "benchmarks", "csrc")      # a grader runs tests; it needs none of these


def copy_project(src: Path, dst: Path, grading: bool = False) -> None:
    """Copy the project at `src` into `dst` (which must not exist)."""
    skip = SKIP + NOT_FOR_GRADING if grading else SKIP
    dst_resolved = dst.resolve()

    def ignore(folder, names):
        here = Path(folder).resolve()
        return [n for n in names if any(fnmatch.fnmatch(n, p) for p in skip) or here / n == dst_resolved]
    shutil.copytree(src, dst, ignore=ignore, symlinks=False)


def start(lab: Lab, root: Path, dst: Path, answers: list) -> list:
    """Write the working copy of `lab` into `dst`: the project with the lab's regions stubbed, and an
    answers file. Returns the files stubbed, with the functions to write in each."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise KvosError(EINVAL, f"{dst} exists and is not empty: start a lab in a new folder")
    if dst.exists():
        dst.rmdir()
    copy_project(root, dst)
    stubbed = []
    for rel in lab.files:
        path = dst / rel
        text = path.read_text()
        where = [r.where for r in regions.find(text, rel) if r.lab == lab.name]
        path.write_text(regions.strip(text, lab.name, rel))
        stubbed.append((rel, where))
    lines = [f"Answers for lab {lab.name} ({lab.title}); questions from docs/labs/{lab.name}.md.", ""]
    for i, question in enumerate(answers, 1):
        lines += [f"{i}. {question}", "", "ANSWER:", "", ""]
    (dst / f"answers-{lab.name}.txt").write_text("\n".join(lines))
    return stubbed


def answered(path: Path) -> tuple:
    """(questions answered, questions) in an answers file: an answer is text after its ANSWER: line."""
    if not path.is_file():
        return 0, 0
    blocks = path.read_text().split("ANSWER:")[1:]
    done = 0
    for block in blocks:
        answer = re.split(r"\n\d+\. ", "\n" + block.strip(), maxsplit=1)[0].strip()   # up to the next question
        done += bool(answer)
    return done, len(blocks)


def lab_files(lab: Lab, student: Path) -> dict:
    """rel path -> text of the lab's files in the student's folder."""
    out = {}
    for rel in lab.files:
        path = student / rel
        if not path.is_file():
            raise KvosError(ENOENT, f"{path} is missing: lab {lab.name} is graded on {', '.join(lab.files)}")
        out[rel] = path.read_text()
    return out
