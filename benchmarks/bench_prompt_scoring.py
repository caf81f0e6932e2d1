"""What scoring a prompt costs (spawn's prompt_logprobs): time to the first token of one prompt
spawned plain and spawned with prompt_logprobs=1, in interleaved rounds, and the ratio.

    python benchmarks/bench_prompt_scoring.py [--model smollm2-135m] [--tokens 480] [--rounds 5]

Each round's prompt starts with a different token, so no round maps another's pages from the page
cache. The prompt is this repository's docs/lifecycle.md, cut to --tokens (one step under the
default token budget of 512). Peak RSS is the process's, over all rounds (run one mode alone with
--only to compare peaks).
"""
import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kernel  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=480)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=("plain", "scoring"), help="run one mode alone (for its peak RSS)")
    args = ap.parse_args()
    k = kernel.boot(memory="512MiB", threads=args.threads)
    root = k.syscalls()
    tid = root.spawn_tenant(args.model)
    ids = root.tokenize(tid, (ROOT / "docs" / "lifecycle.md").read_text())[:args.tokens]
    vocab = root.tenantinfo(tid).vocab_size

    def first_token_seconds(scoring: bool, salt: int) -> float:
        prompt = [(ids[0] + salt) % vocab] + ids[1:]
        started = time.perf_counter()
        pid = root.spawn(tid, prompt, max_tokens=1, temperature=0, prompt_logprobs=1 if scoring else None)
        r = root.read(pid, timeout=300)
        while not r.tokens and not r.turn_done:
            r = root.read(pid, timeout=300)
        seconds = time.perf_counter() - started
        status = root.wait(pid)
        if status.reason == "error":
            raise SystemExit(f"the process failed: {status.error}")
        return seconds

    modes = {"plain": False, "scoring": True}
    if args.only:
        modes = {args.only: modes[args.only]}
    first_token_seconds(False, 1)                                  # warm-up
    times = {name: [] for name in modes}
    for i in range(args.rounds):
        for j, (name, scoring) in enumerate(modes.items()):
            times[name].append(first_token_seconds(scoring, 2 + 2 * i + j))
    print(f"{args.model}, {len(ids)}-token prompt, {args.threads} threads, {args.rounds} rounds")
    for name, ts in times.items():
        print(f"{name:8} first token " + " ".join(f"{t:.3f}" for t in ts) + f"  median {statistics.median(ts):.3f} s")
    if len(times) == 2:
        print(f"scoring / plain: {statistics.median(times['scoring']) / statistics.median(times['plain']):.2f}x")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
