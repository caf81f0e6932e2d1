"""`kvos lab list|start|grade|predict`: the shell's front end to the labs (docs/labs/README.md).

The shell wires it with add_parser(subparsers) (userspace/shell/main.py), as it does `bench` and
`sim`. Each handler returns an exit status: grade exits 1 unless every folder scored full marks.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "lab", help="teaching labs: build a mechanism of the kernel, graded like xv6's",
        description="Teaching labs on the real kernel. Each lab removes one mechanism from a working copy of "
                    "kvos (page tables, copy-on-write, the page cache, swap, batches, the scheduler, fair "
                    "share, the kernel lock); you write it back and `kvos lab grade` scores it. docs/labs/.")
    sub = parser.add_subparsers(dest="lab_command", metavar="ACTION")
    sub.required = True

    p = sub.add_parser("list", help="the labs: name, title, concept, files, points")
    p.add_argument("--json", action="store_true", help="one JSON list")
    p.set_defaults(func=list_main)

    p = sub.add_parser("start", help="a working copy of the project with one lab's code removed",
                       description="Copy the project into DIR (a new or empty folder) with lab NAME's solution "
                                   "regions replaced by stubs (every other lab's code intact), its handout in "
                                   "docs/labs/NAME.md and an answers file, answers-NAME.txt.")
    p.add_argument("name", help="the lab (kvos lab list)")
    p.add_argument("dir", help="where the working copy goes")
    p.set_defaults(func=start_main)

    p = sub.add_parser("grade", help="grade a working copy: each test with its points, then Score: X/Y",
                       description="Grade lab NAME on the lab's files in DIR (default: the current folder when "
                                   "it is a kvos tree, else the checkout kvos runs from), in a clean copy of the "
                                   "pristine project: the grader's tests, fsck and helpers never come from DIR. "
                                   "Several DIRs grade several submissions, one after the other.")
    p.add_argument("name", help="the lab (kvos lab list)")
    p.add_argument("dirs", nargs="*", metavar="DIR", help="working copies to grade")
    p.add_argument("--seed", type=int, default=None,
                   help="the workloads' and hypothesis's seed (default: drawn at random and printed; a teacher "
                        "keeps one secret for a whole class)")
    p.add_argument("--json", action="store_true",
                   help='{"lab", "score", "max", "tests": [...], ...}: one object per DIR, one per line')
    p.add_argument("--timeout", type=float, default=900.0, help="seconds the grader may run (900)")
    p.set_defaults(func=grade_main)

    p = sub.add_parser("predict", help="a generated question about a concept; -c shows the answer, run on kvos",
                       description="Ask a question about a concept (OSTEP's homework style): the scenario's "
                                   "numbers come from the seed. Work the answer out, then run again with -c: "
                                   "the answer worked out by hand, and the same numbers measured by running the "
                                   "scenario on kvos's simulated GPU.")
    p.add_argument("name", nargs="?", help="the concept (with no name: the list)")
    p.add_argument("-s", "--seed", type=int, default=0, help="which question (0)")
    p.add_argument("-c", "--compute", action="store_true", help="show the answer, and run kvos to check it")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=predict_main)
    return parser


def list_main(args) -> int:
    from userspace.lab import catalog
    catalog.check_root()
    rows = [{"name": lab.name, "title": lab.title, "concept": lab.concept, "files": list(lab.files),
             "points": sum(n for _, n in catalog.points(lab)), "hours": lab.hours,
             "handout": f"docs/labs/{lab.name}.md"} for lab in catalog.LABS]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for i, row in enumerate(rows, 1):
        print(f"{i}. {row['name']:<10} {row['title']} ({row['points']} points, {row['hours']})")
        print(f"   {row['concept']}")
        print(f"   edit: {', '.join(row['files'])}; read: {row['handout']}")
    return 0


def start_main(args) -> int:
    from userspace.lab import catalog, tree
    lab = catalog.get(args.name)
    root = catalog.check_root()
    dst = Path(args.dir)
    stubbed = tree.start(lab, root, dst, catalog.questions(lab, root))
    print(f"lab {lab.name}: {lab.title}, in {dst}")
    for rel, where in stubbed:
        print(f"  to write in {rel}: {', '.join(where)}")
    print(f"  read docs/labs/{lab.name}.md; answer the questions in answers-{lab.name}.txt")
    print(f"  run it:   cd {dst} && PYTHONPATH=. python -m pytest -x tests/labs/grade_{lab.name}.py")
    print(f"  grade it: kvos lab grade {lab.name} {dst}")
    return 0


def grade_main(args) -> int:
    from userspace.lab import catalog, grade
    lab = catalog.get(args.name)
    dirs = [Path(d) for d in args.dirs] or [_default_dir(lab)]
    full = True
    for d in dirs:
        result = grade.grade(lab, d, seed=args.seed, timeout=args.timeout)
        full &= result["score"] == result["max"]
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            grade.render(result)
            if len(dirs) > 1:
                print()
    return 0 if full else 1


def _default_dir(lab) -> Path:
    """The current folder when it holds the lab's files (a working copy), else the checkout itself."""
    from userspace.lab import catalog
    here = Path.cwd()
    return here if all((here / rel).is_file() for rel in lab.files) else catalog.ROOT


def predict_main(args) -> int:
    from userspace.lab.predict import ABOUT, CONCEPTS, ask
    if not args.name:
        for name in CONCEPTS:
            print(f"{name:<10} {ABOUT[name]}")
        print("\nkvos lab predict NAME [-s SEED] [-c]")
        return 0
    q = ask(args.name, args.seed)
    measured = q.measure() if args.compute else None
    if args.json:
        out = {"concept": q.concept, "seed": q.seed, "question": q.text}
        if args.compute:
            out.update(answer=q.answer, explanation=q.explain, measured=measured, agrees=q.agrees(measured))
        print(json.dumps(out, indent=2))
        return 0
    print(f"[{q.concept}, seed {q.seed}] {q.text}")
    if not args.compute:
        print(f"\nWork it out, then: kvos lab predict {q.concept} -s {q.seed} -c")
        return 0
    print("\nAnswer:")
    for key, value in q.answer.items():
        print(f"  {key:<20} {value:>10,}   measured on kvos: {measured[key]:,}")
    print(f"\n{q.explain}")
    if not q.agrees(measured):
        print("kvos measured something else than the answer worked out: a bug in kvos or in this question",
              file=sys.stderr)
        return 1
    return 0
