"""The labs, in the order a course takes them, and where the project they are cut from lives.

Each lab is a mechanism of the kernel: the files a student edits hold its solution regions
(`# LAB(name): BEGIN` ... `END`), docs/labs/NAME.md is its handout, tests/labs/grade_NAME.py its
grader (points are read from its @points(n) decorators). `outside` are tests of the main suite
that do not need the lab's mechanism: they must still pass on its skeleton (the system boots).
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from kernel.errors import ENOENT, KvosError

ROOT = Path(__file__).resolve().parents[2]          # the project kvos runs from: the reference solution
BOOTS = "tests/labs/test_boots.py"
ALONE = "tests/test_kernel.py::test_all_together_equals_alone"


@dataclass(frozen=True)
class Lab:
    name: str
    title: str
    concept: str
    files: tuple            # what the student edits (relative to the project root)
    hours: str              # what it takes a student who has read the handout
    outside: tuple = ()     # main-suite tests that must still pass on the skeleton, besides BOOTS

    def handout(self, root: Path = ROOT) -> Path:
        return root / "docs" / "labs" / f"{self.name}.md"

    def grader(self, root: Path = ROOT) -> Path:
        return root / "tests" / "labs" / f"grade_{self.name}.py"


LABS = (
    Lab("pagetable", "Page tables and demand paging",
        "the slot of every token (frame x page size + offset), frames mapped on demand, freed at exit",
        ("kernel/mm/memory.py",), "2-3 h"),
    Lab("cow", "fork and copy-on-write",
        "fork shares every page; the first write into a shared, partly filled page copies it",
        ("kernel/mm/memory.py",), "2-3 h", (ALONE,)),
    Lab("pagecache", "The page cache and shm",
        "full pages named by their content, verified on a hit, kept on an LRU list; pinned shm segments",
        ("kernel/mm/pagecache.py", "kernel/mm/frames.py", "kernel/mm/memory.py"), "3-4 h",
        (ALONE, "tests/test_fork_cow.py")),
    Lab("swap", "Swap and reclaim",
        "preemption that loses nothing: pages swapped to the host and back, or dropped and recomputed",
        ("kernel/mm/swap.py", "kernel/sched/preempt.py"), "3 h", (ALONE,)),
    Lab("batch", "Ragged batches",
        "every process's new tokens packed back to back with positions, slots and page-table rows; padding",
        ("kernel/batch.py",), "2 h", ("tests/test_sim_kernel.py::test_every_policy_runs_every_process_to_its_length",)),
    Lab("sched", "The scheduler: iteration-level batching and chunked prefill",
        "a token budget per step, at most a chunk of a process per step, running decodes before prefills",
        ("kernel/sched/scheduler.py",), "3 h", (ALONE, "tests/test_fork_cow.py")),
    Lab("fair", "Fair share",
        "a weighted virtual token counter per tenant, the lift of a tenant that becomes active; then your "
        "own policy, scored on p99 time to first token",
        ("kernel/sched/policies.py", "kernel/sched/fairttft.py"), "4-6 h", (ALONE,)),
    Lab("klock", "The kernel lock",
        "a FIFO lock that hands itself to the oldest waiter, so a syscall never waits out the run queue",
        ("kernel/klock.py",), "2 h", (ALONE,)),
    Lab("speculate", "Speculative decoding: guess, check, roll back",
        "drafts looked up in a process's own file, computed in the same step, kept while the draws match "
        "them; the pages of the rest unmapped before anyone names them",
        ("kernel/speculate.py", "kernel/step.py", "kernel/mm/memory.py"), "3 h",
        (ALONE, "tests/test_fork_cow.py")),
    Lab("lora", "Shared text: LoRA adapters over one base model",
        "adapters as programs that share their base's weights, each adapter's delta on its own rows of a "
        "batch the base and its adapters share, pages named by the program that computed them",
        ("userspace/programs/lora.py", "kernel/step.py"), "3 h", (ALONE,)),
    Lab("hugepages", "TLB reach: the weights in huge pages",
        "an arena of 2 MiB pages (aligned, madvised, handed out in cache-line slots) that the GGUF weights "
        "are read into, so a step that streams them all misses the TLB once per 2 MiB, not per 4 KiB",
        ("kernel/ops/hugepages.py",), "2 h", (ALONE,)),
)
BY_NAME = {lab.name: lab for lab in LABS}


def get(name: str) -> Lab:
    lab = BY_NAME.get(name)
    if lab is None:
        raise KvosError(ENOENT, f"no lab {name!r}: the labs are {', '.join(BY_NAME)}")
    return lab


def check_root(root: Path = ROOT) -> Path:
    """The project holds the graders and handouts (a kvos checkout, not an installed wheel)."""
    if not (root / "tests" / "labs").is_dir():
        raise KvosError(ENOENT, f"{root} has no tests/labs: the labs need a kvos checkout")
    return root


def points(lab: Lab, root: Path = ROOT) -> list:
    """(test name, points) of the lab's grader, read from its source without running it."""
    tree = ast.parse(lab.grader(root).read_text())
    out = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "points":
                    out.append((node.name, dec.args[0].value))
    return out


def questions(lab: Lab, root: Path = ROOT) -> list:
    """The numbered questions of the handout's Questions section."""
    lines, inside, out = lab.handout(root).read_text().splitlines(), False, []
    for line in lines:
        numbered = re.match(r"\d+\. (.*)", line)
        if line.startswith("## "):
            inside = line.strip().lower() == "## questions"
        elif inside and numbered:
            out.append(numbered[1].strip())
        elif inside and out and line.startswith("   ") and line.strip():
            out[-1] += " " + line.strip()
    return out
