"""What speculative decoding by prompt lookup buys (boot's speculate=k, kernel/speculate.py), by task.

    python benchmarks/bench_speculate.py [--model smollm2-135m] [--ks 0,2,4,8] [--rounds 3] [--tokens 128]

Three chat tasks on the instruct model, greedy: `repeat` (copy a paragraph of docs/lifecycle.md
back), `edit` (the same paragraph with one word changed throughout: most of it is a copy), `free`
(a short essay: little to copy), at batch 1, and `repeat` at batch 4 (and, with --tasks, at 8: the
most decoding processes that still speculate). `free predicted` is the essay again, spawned with
the essay's own text (from a k = 0 run) as its prediction (OpenAI's predicted outputs: a client
that holds a previous answer); every k of it gets the prediction, which k = 0 cannot use. For
each task and k (0 is plain decoding, the baseline), kernels are booted in interleaved rounds (k
order rotated each round) and the run's wall time from spawn to the last exit is timed; prints
medians, the ratio to k = 0 of the same rounds, tokens per step of the speculating processes,
drafts computed per token generated, the share of drafts taken, and whether every k gave the
same tokens as k = 0 (it must).
--step-times --ks 4 instead times each decode step of one `repeat` run by the rows it computed
(1 for plain decoding, 1 + drafts when speculating) and the row-by-row draws at commit.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kernel  # noqa: E402


def paragraph() -> str:
    text = (ROOT / "docs" / "lifecycle.md").read_text()
    start = text.index("3. **schedule**")
    return " ".join(text[start:start + 700].split())


TASKS = {
    "repeat": (1, lambda p: f"Repeat the following text exactly, word for word:\n\n{p}"),
    "edit": (1, lambda p: f"Rewrite the following text with every 'process' replaced by 'request', "
                          f"changing nothing else:\n\n{p}"),
    "free": (1, lambda p: "Write a short essay on why operating systems use virtual memory."),
    "repeat x4": (4, lambda p: f"Repeat the following text exactly, word for word:\n\n{p}"),
    "repeat x8": (8, lambda p: f"Repeat the following text exactly, word for word:\n\n{p}"),
    "free predicted": (1, lambda p: "Write a short essay on why operating systems use virtual memory."),
}
PREDICTED = {"free predicted"}          # tasks spawned with their k = 0 answer as the prediction
DEFAULT_TASKS = "repeat,edit,free,repeat x4"



def run(model: str, k: int, prompt_text: str, batch: int, tokens: int, threads: int, prediction=None):
    kern = kernel.boot(memory="256MiB", threads=threads, speculate=k)
    sys_ = kern.syscalls()
    tid = sys_.spawn_tenant(model)
    prompt = sys_.tokenize(tid, [{"role": "user", "content": prompt_text}])
    started = time.perf_counter()
    extra = {} if prediction is None else {"prediction": prediction}
    pids = [sys_.spawn(tid, prompt, max_tokens=tokens, temperature=0, **extra) for _ in range(batch)]
    statuses = [sys_.wait(pid) for pid in pids]
    outs = [s.tokens for s in statuses]
    if prediction is None:
        prediction = statuses[0].text
    seconds = time.perf_counter() - started
    s = kern.stats
    result = (seconds, outs, s.steps, s.draft_tokens, s.accepted_tokens, s.generated_tokens, prediction)
    kern.shutdown()
    return result


def step_times(model: str, k: int, prompt_text: str, tokens: int, threads: int) -> None:
    """One `repeat` run at k = 0 and at k, each decode step timed and grouped by the rows it computed,
    and the time commit_draft (the row-by-row draws at commit) takes a step."""
    from kernel import step as kstep
    spent, commit_draft = [], kstep.commit_draft

    def timed(*args, **kwargs):
        started = time.perf_counter()
        out = commit_draft(*args, **kwargs)
        spent.append(time.perf_counter() - started)
        return out
    kstep.commit_draft = timed
    try:
        for spec in (0, k):
            kern = kernel.boot(memory="256MiB", threads=threads, speculate=spec)
            sys_ = kern.syscalls()
            tid = sys_.spawn_tenant(model)
            pid = sys_.spawn(tid, sys_.tokenize(tid, [{"role": "user", "content": prompt_text}]),
                             max_tokens=tokens, temperature=0)
            kern.step()                                  # the prefill
            by_rows = {}
            while kern.procs[pid].alive:
                before, started = kern.stats.decode_tokens, time.perf_counter()
                kern.step()
                by_rows.setdefault(kern.stats.decode_tokens - before, []).append(time.perf_counter() - started)
            sys_.wait(pid)
            kern.shutdown()
            print(f"k={spec}: " + ", ".join(f"{rows}-row steps {1000 * statistics.median(ts):.1f} ms (x{len(ts)})"
                                            for rows, ts in sorted(by_rows.items())))
    finally:
        kstep.commit_draft = commit_draft
    if spent:
        print(f"commit_draft: {1e6 * statistics.median(spent):.0f} us a step (median of {len(spent)})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ks", default="0,2,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default=DEFAULT_TASKS, help=f"of {', '.join(TASKS)}")
    ap.add_argument("--step-times", action="store_true",
                    help="instead: `repeat` once at k = 0 and at the largest k, its decode steps timed by rows")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    if args.step_times:
        step_times(args.model, max(ks), TASKS["repeat"][1](paragraph()), args.tokens, args.threads)
        return
    if ks[0] != 0:
        ks = [0] + ks
    text = paragraph()
    print(f"{args.model}, greedy, {args.tokens} tokens a process, {args.threads} threads, {args.rounds} rounds")
    print(f"{'task':10} {'k':>2} {'seconds':>8} {'x k=0':>6} {'tok/step':>8} {'drafts/tok':>10} {'taken':>6}  same")
    for name in args.tasks.split(","):
        batch, make = TASKS[name]
        times = {k: [] for k in ks}
        last = {}
        prediction = run(args.model, 0, make(text), batch, args.tokens, args.threads)[-1] if name in PREDICTED \
            else None
        for r in range(args.rounds):
            for k in ks[r % len(ks):] + ks[:r % len(ks)]:
                last[k] = run(args.model, k, make(text), batch, args.tokens, args.threads, prediction)
                times[k].append(last[k][0])
        base = statistics.median(times[0])
        for k in ks:
            seconds, outs, steps, drafts, accepted, generated, _ = last[k]
            med = statistics.median(times[k])
            per_step = generated / steps / batch if steps else 0
            taken = f"{accepted / drafts:.0%}" if drafts else "-"
            print(f"{name:10} {k:>2} {med:8.2f} {base / med:5.2f}x {per_step:8.2f} {drafts / generated:10.2f} "
                  f"{taken:>6}  {outs == last[0][1]}")


if __name__ == "__main__":
    main()
