"""`kvos lab grade`: a lab's grader run on a student's files, in a clean copy of the pristine project.

The copy is the project kvos runs from (the reference), with only the lab's own files taken from the
student's folder: the grader's tests, fsck and helpers are never the student's. pytest runs in a
subprocess of that copy with this grading's seed ($KVOS_LAB_SEED, and hypothesis's), one thread,
and a time limit; tests/labs/report.py writes each test's outcome and points back as JSON.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from userspace.lab import catalog
from userspace.lab.tree import answered, copy_project, lab_files

TEST_LIMIT = 300          # seconds one test may run


def grade(lab: catalog.Lab, student: Path | None = None, *, files: dict | None = None, root: Path = catalog.ROOT,
          seed: int | None = None, fail_fast: bool = False, timeout: float = 900.0, outside: bool = True) -> dict:
    """Grade `lab` on the files in folder `student` (or on `files`, rel path -> text). Returns
    {"lab", "score", "max", "seed", "dir", "boots", "answers", "tests": [...]}."""
    catalog.check_root(root)
    files = lab_files(lab, student) if files is None else files
    seed = random.SystemRandom().randrange(1 << 31) if seed is None else seed
    tests = [catalog.BOOTS, *lab.outside] if outside else []
    with tempfile.TemporaryDirectory(prefix=f"kvos-lab-{lab.name}-") as tmp:
        tree = Path(tmp) / "project"
        copy_project(root, tree, grading=True)
        for rel, text in files.items():
            (tree / rel).write_text(text)
        report = Path(tmp) / "report.json"
        # One thread (many gradings may run side by side), only the plugins a grader needs (the others
        # cost a second of imports each run), a per-test limit so that a livelock or a deadlock fails.
        env = {**os.environ, "PYTHONPATH": str(tree), "KVOS_LAB_SEED": str(seed), "KVOS_LAB_REPORT": str(report),
               "KVOS_LAB_PRISTINE": str(root), "KVOS_THREADS": "1", "OMP_NUM_THREADS": "1",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "_hypothesis_pytestplugin",
               "-p", "pytest_timeout", "-p", "tests.labs.report", "-o", "addopts=", f"--hypothesis-seed={seed}",
               f"--timeout={TEST_LIMIT}", "--tb=line", f"tests/labs/grade_{lab.name}.py", *tests]
        cmd += ["-x"] if fail_fast else []
        try:
            out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
            crashed = None if report.exists() else (out.stdout + out.stderr).strip()[-2000:]
        except subprocess.TimeoutExpired:
            crashed = f"the grader ran past its {timeout:.0f} s limit"
        results = json.loads(report.read_text()) if report.exists() else []
    return _summary(lab, root, student, seed, results, crashed)


def _summary(lab, root, student, seed, results, crashed) -> dict:
    by_test = {r["name"].split("::")[-1]: r for r in results if r["name"].startswith("tests/labs/grade_")}
    tests = []
    for name, pts in catalog.points(lab, root):
        r = by_test.get(name) or {"outcome": "not run", "score": 0, "message": crashed or ""}
        tests.append({"name": name, "points": pts, "score": r["score"], "outcome": r["outcome"],
                      "message": r["message"]})
    boots = [{"name": r["name"], "outcome": r["outcome"], "message": r["message"]}
             for r in results if not r["name"].startswith("tests/labs/grade_")]
    done, asked = answered(student / f"answers-{lab.name}.txt") if student is not None else (0, 0)
    return {"lab": lab.name, "score": round(sum(t["score"] for t in tests), 2),
            "max": sum(t["points"] for t in tests), "seed": seed, "dir": str(student) if student else None,
            "boots": bool(boots) and all(b["outcome"] == "passed" for b in boots), "answers": [done, asked],
            "tests": tests, "outside": boots, "error": crashed}


def render(result: dict, out=sys.stdout) -> None:
    """The xv6 way: one line per test with its points, then Score: X/Y."""
    lab = result["lab"]
    print(f"== kvos lab grade {lab}: {result['dir'] or 'files given'} (seed {result['seed']}) ==", file=out)
    for t in result["tests"]:
        label = f"{lab}: {t['name'][5:].replace('_', ' ')} "
        verdict = "OK" if t["outcome"] == "passed" else t["outcome"].upper()
        print(f"{label:.<72} {verdict} ({_num(t['score'])}/{t['points']})", file=out)
        if t["message"] and (t["outcome"] != "passed" or t["score"] < t["points"]):
            print(f"    {t['message']}", file=out)
    for b in result["outside"]:
        label = f"boots: {b['name']} "
        print(f"{label:.<72} {'OK' if b['outcome'] == 'passed' else b['outcome'].upper()}", file=out)
        if b["outcome"] != "passed" and b["message"]:
            print(f"    {b['message']}", file=out)
    if result["error"]:
        print(f"the grader did not finish: {result['error'].splitlines()[-1]}", file=out)
    done, asked = result["answers"]
    if asked:
        print(f"answers-{lab}.txt: {done} of {asked} questions answered (read by your teacher, not scored)", file=out)
    print(f"Score: {_num(result['score'])}/{result['max']}", file=out)


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)

