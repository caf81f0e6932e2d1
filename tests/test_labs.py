"""The labs stay honest (docs/labs/README.md): for every lab, the skeleton lints, boots and loses
points, the shipping code scores full marks, and every stored wrong solution loses points.

The fast tests work on sources only (regions, skeletons, handouts, the command's output). The slow
ones (still run by CI) grade through the real tool, one pytest subprocess per grading, with seed 0
so that CI is repeatable; wrong solutions stop at their first failing test (-x).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.labs.wrong import WRONG
from userspace.lab import catalog, grade, regions, tree
from userspace.shell.main import main

ROOT = catalog.ROOT
LABS = [lab.name for lab in catalog.LABS]


def sources() -> dict:
    files = [p for top in ("kernel", "userspace") for p in sorted((ROOT / top).rglob("*.py"))]
    return {str(p.relative_to(ROOT)): p.read_text() for p in files}


def test_every_lab_has_regions_in_its_files_and_only_there():
    found = {}
    for rel, text in sources().items():
        for r in regions.find(text, rel):
            found.setdefault(r.lab, set()).add(rel)
    assert sorted(found) == sorted(LABS)
    for lab in catalog.LABS:
        assert found[lab.name] == set(lab.files), lab.name
    assert len(catalog.LABS) >= 8


def test_skeletons_compile_and_lint(tmp_path):
    for lab in catalog.LABS:
        for rel in lab.files:
            text = regions.strip((ROOT / rel).read_text(), lab.name, rel)
            assert f"# LAB({lab.name}): BEGIN" not in text and f"# LAB({lab.name}): your code here" in text
            compile(text, rel, "exec")
            out = tmp_path / lab.name / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", "--config", str(ROOT / "pyproject.toml"), str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_every_lab_has_wrong_solutions_that_apply():
    by_lab = {}
    for w in WRONG:
        files = w.files()
        assert files[w.path] != (ROOT / w.path).read_text(), w.name
        by_lab.setdefault(w.lab, []).append(w.name)
    assert sorted(by_lab) == sorted(LABS) and all(len(names) >= 3 for names in by_lab.values()), by_lab


def test_handouts_have_their_sections_and_questions():
    for lab in catalog.LABS:
        text = lab.handout().read_text()
        for section in ("## The idea", "## Read first", "## What to implement", "## See it working",
                        "## How it is graded", "## Questions"):
            assert section in text, (lab.name, section)
        assert 2 <= len(catalog.questions(lab)) <= 4, lab.name
        assert f"tests/labs/grade_{lab.name}.py" in text
    assert (ROOT / "docs" / "labs" / "README.md").is_file()


def test_lab_list(capsys):
    assert main(["lab", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == LABS
    assert all(r["points"] > 0 and r["files"] and r["concept"] and r["title"] for r in rows)
    assert main(["lab", "list"]) == 0
    assert "Score" not in capsys.readouterr().out


def test_start_writes_the_skeleton_the_handout_and_an_answers_file(tmp_path, capsys):
    dst = tmp_path / "cow"
    assert main(["lab", "start", "cow", str(dst)]) == 0
    assert "MemoryManager._cow_fault" in capsys.readouterr().out
    memory = (dst / "kernel/mm/memory.py").read_text()
    assert "LAB(cow): BEGIN" not in memory and 'raise NotImplementedError("lab cow: MemoryManager.fork")' in memory
    assert "LAB(pagetable): BEGIN" in memory and "LAB(pagecache): BEGIN" in memory  # other labs stay whole
    assert "LAB(swap): BEGIN" in (dst / "kernel/mm/swap.py").read_text()
    assert (dst / "docs/labs/cow.md").is_file() and (dst / "tests/labs/grade_cow.py").is_file()
    assert not (dst / ".git").exists() and not (dst / ".venv").exists()
    answers = (dst / "answers-cow.txt").read_text()
    assert answers.count("ANSWER:") == len(catalog.questions(catalog.get("cow"))) >= 2
    assert tree.answered(dst / "answers-cow.txt") == (0, answers.count("ANSWER:"))
    assert main(["lab", "start", "nosuchlab", str(tmp_path / "x")]) == 2     # ENOENT, in one line
    assert main(["lab", "start", "cow", str(dst)]) == 22                      # EINVAL: not an empty folder
    err = capsys.readouterr().err
    assert "ENOENT: no lab 'nosuchlab'" in err and "EINVAL" in err


# -- through the grader (slow: one pytest subprocess per grading) ------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", LABS)
def test_the_skeleton_boots_and_loses_points(name, tmp_path):
    lab = catalog.get(name)
    tree.start(lab, ROOT, tmp_path / name, [])
    result = grade.grade(lab, tmp_path / name, seed=0)
    assert result["error"] is None and result["outside"], result["error"]
    assert result["boots"], [b for b in result["outside"] if b["outcome"] != "passed"]
    assert result["score"] < result["max"]


@pytest.mark.slow
@pytest.mark.parametrize("name", LABS)
def test_the_shipping_code_scores_full_marks(name):
    result = grade.grade(catalog.get(name), ROOT, seed=0, outside=False)
    assert result["score"] == result["max"], [t for t in result["tests"] if t["score"] < t["points"]]


@pytest.mark.slow
@pytest.mark.parametrize("wrong", WRONG, ids=[f"{w.lab}-{w.name}" for w in WRONG])
def test_a_stored_wrong_solution_loses_points(wrong):
    result = grade.grade(catalog.get(wrong.lab), files=wrong.files(), seed=0, fail_fast=True, outside=False)
    assert result["error"] is None, result["error"]
    assert result["score"] < result["max"], f"{wrong.lab}/{wrong.name} ({wrong.mistake}) scored full marks"


@pytest.mark.slow
def test_kvos_lab_grade_end_to_end(tmp_path):
    """The command itself: a working copy handed in as a folder, --json, and the exit status."""
    dst = tmp_path / "klock"
    tree.start(catalog.get("klock"), ROOT, dst, [])
    (dst / "kernel/klock.py").write_text((ROOT / "kernel/klock.py").read_text())     # the student's solution
    out = subprocess.run([sys.executable, "-m", "kvos", "lab", "grade", "klock", str(dst), "--json", "--seed", "7"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert {"lab", "score", "max", "tests"} <= set(result) and result["lab"] == "klock" and result["seed"] == 7
    assert result["score"] == result["max"] and result["boots"] and result["answers"] == [0, 0]
    text = subprocess.run([sys.executable, "-m", "kvos", "lab", "grade", "klock", str(dst)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=600).stdout
    assert "klock: release hands the lock to the oldest waiter" in text and f"Score: {result['max']}/" in text
