"""Load benchmark for kvosd: the daemon in one process, this load generator in another, on loopback.

At each concurrency level, a bounded number of streamed /v1/completions requests run from that many
threads; we report requests/s, generated tokens/s, time to first token and time between tokens
(p50, p99), as a client sees them. Then the daemon gets SIGTERM and must exit 0 (fsck clean).

    .venv/bin/python benchmarks/bench_daemon.py                       # tiny-llama, 1 4 16 32
    .venv/bin/python benchmarks/bench_daemon.py --model smollm2-135m --requests 32 --max-tokens 64
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KEY, ROOT_KEY = "bench-tenant-key", "bench-root-key"


def start_daemon(args) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "KVOS_API_KEY": KEY, "KVOS_ROOT_KEY": ROOT_KEY, "KVOS_THREADS": str(args.server_threads)}
    return launch(["--model", args.model, "--memory", args.memory, "--threads", str(args.server_threads),
                   "--token-budget", str(args.token_budget)], env)


def launch(options: list, env: dict) -> tuple[subprocess.Popen, str]:
    """`kvos serve` with these options in a process of its own, on a free port: (process, its URL)."""
    # --log-level info: the "serving ... at URL" line is an info line
    cmd = [sys.executable, "-m", "kvos", "serve", "--port", "0", "--log-level", "info", *options]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300            # the first run of smollm2-135m downloads it
    while True:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            sys.exit(f"kvosd exited with {proc.returncode}")
        found = re.search(r" at (http://\S+) ", line)
        if found:
            threading.Thread(target=proc.stderr.read, daemon=True).start()   # keep its pipe drained
            return proc, found.group(1)
        if time.monotonic() > deadline:
            proc.kill()
            sys.exit("kvosd did not start")


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def one_request(url, model, prompt, max_tokens, timeout) -> dict:
    """Stream one completion; token arrival times as this client sees them."""
    conn = http.client.HTTPConnection(*host_port(url), timeout=timeout)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    arrivals = []                     # (seconds since start, tokens in the event)
    for line in resp:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(event["error"]["message"])
        count = sum(len(c.get("token_ids", [])) for c in event["choices"])
        if count:
            arrivals.append((time.perf_counter() - started, count))
    conn.close()
    ttft = arrivals[0][0]
    gaps = []
    for (t0, _), (t1, count) in zip(arrivals, arrivals[1:]):
        gaps += [(t1 - t0) / count] * count
    return {"ttft": ttft, "gaps": gaps, "tokens": sum(c for _, c in arrivals), "seconds": arrivals[-1][0]}


def run_level(url, model, concurrency, requests, max_tokens, timeout) -> dict:
    results, errors, lock = [], [], threading.Lock()
    todo = iter(range(requests))

    def worker():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                r = one_request(url, model, f"Request {i}: tell me about the kernel of an OS", max_tokens,
                                timeout)
            except Exception as exc:          # noqa: BLE001 -- counted and shown, the run goes on
                with lock:
                    errors.append(str(exc))
                continue
            with lock:
                results.append(r)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ttfts = sorted(r["ttft"] for r in results)
    gaps = sorted(g for r in results for g in r["gaps"])
    return {"concurrency": concurrency, "requests": len(results), "errors": len(errors), "seconds": wall,
            "requests_per_s": len(results) / wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": _pct(ttfts, 50), "ttft_p99": _pct(ttfts, 99),
            "tbt_p50": _pct(gaps, 50), "tbt_p99": _pct(gaps, 99), "first_error": errors[0] if errors else None}


def _pct(values, p):
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if p < 100 else values[-1]


def table(rows) -> str:
    head = (f"{'conc':>4} {'reqs':>5} {'err':>3} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
            f"{'TBT p50':>8} {'TBT p99':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['concurrency']:>4} {r['requests']:>5} {r['errors']:>3} {r['requests_per_s']:>7.2f} "
                     f"{r['tokens_per_s']:>8.1f} {r['ttft_p50'] * 1e3:>7.1f}ms {r['ttft_p99'] * 1e3:>7.1f}ms "
                     f"{r['tbt_p50'] * 1e3:>6.1f}ms {r['tbt_p99'] * 1e3:>6.1f}ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default: max(16, 2 x concurrency))")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--memory", default="64MiB")
    p.add_argument("--token-budget", type=int, default=512)
    p.add_argument("--server-threads", type=int, default=1, help="torch threads in the daemon (default 1)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)

    proc, url = start_daemon(args)
    rows = []
    try:
        one_request(url, args.model, "warm up", 4, args.timeout)
        for c in args.concurrency:
            rows.append(run_level(url, args.model, c, args.requests or max(16, 2 * c), args.max_tokens, args.timeout))
            print(f"  concurrency {c}: {rows[-1]['requests']} requests in {rows[-1]['seconds']:.1f} s",
                  file=sys.stderr, flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    print(f"kvosd {args.model}, {args.max_tokens} tokens per request, server threads {args.server_threads}, "
          f"cores {os.cpu_count()}")
    print(table(rows))
    print(f"daemon exit status after SIGTERM: {code}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "max_tokens": args.max_tokens, "rows": rows},
                                              indent=1))
    return 0 if code == 0 and not any(r["errors"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
