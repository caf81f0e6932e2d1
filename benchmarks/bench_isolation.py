"""Isolation under attack: one tenant's key against kvosd, while another tenant streams.

kvosd runs in its own process (tiny-llama by default, two tenants: alice attacks, bob streams a
long completion as the victim; bob has max_procs 16). Each scenario measures the victim's time to
first token and its longest pause between two chunks while the attack runs, and what the attack
got back. A healthy kernel keeps the pause near one step; docs/reliability.md has the table.

    .venv/bin/python benchmarks/bench_isolation.py                      # every scenario, tiny-llama
    .venv/bin/python benchmarks/bench_isolation.py --scenarios waits stops --victim-tokens 800
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_daemon import launch  # benchmarks/ is the script's folder, first on sys.path

ROOT, ALICE, BOB = "iso-root-key", "iso-alice-key", "iso-bob-key"


# -- the daemon -----------------------------------------------------------------------------------------
def start_daemon(args) -> tuple:
    tenants = {"root_key": ROOT, "tenants": [
        {"name": "alice", "model": args.model, "key": ALICE},
        {"name": "bob", "model": args.model, "key": BOB, "max_procs": 16}]}
    spec = Path(tempfile.mkdtemp()) / "tenants.json"
    spec.write_text(json.dumps(tenants))
    return launch(["--tenants", str(spec), "--memory", args.memory, "--threads", "1"],
                  {**os.environ, "KVOS_THREADS": "1"})


def call(url, method, path, body=None, key=ALICE, timeout=300) -> tuple[int, object]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(data) if data else None
    except ValueError:
        return resp.status, data[:200]


async def post(url, path, body, key=ALICE) -> int:
    """A POST on its own connection without a thread (hundreds at once); -> HTTP status."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    await reader.read()
    writer.close()
    return status


# -- the victim ------------------------------------------------------------------------------------------------
class Victim:
    """bob streams; chunk arrival times give its time to first token and its longest pause."""

    def __init__(self, url, max_tokens):
        self.url, self.max_tokens, self.times = url, max_tokens, []
        self.first = threading.Event()
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        host, port = self.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        body = {"model": "bob", "prompt": "kvos is an operating system", "max_tokens": self.max_tokens,
                "temperature": 0, "stream": True, "ignore_eos": True}
        conn.request("POST", "/v1/completions", body=json.dumps(body),
                     headers={"Authorization": f"Bearer {BOB}", "Content-Type": "application/json"})
        for line in conn.getresponse():
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                self.times.append(time.monotonic())
                self.first.set()
        conn.close()

    def result(self) -> tuple[float, float, float]:
        """(time to first token, longest pause, seconds in all) once the stream has ended."""
        self.thread.join()
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return self.times[0] - self.started, max(gaps, default=0.0), self.times[-1] - self.started


# -- the attacks (alice) ------------------------------------------------------------------------------------------
def in_threads(*calls) -> list:
    out = [None] * len(calls)
    threads = [threading.Thread(target=lambda i=i, c=c: out.__setitem__(i, c())) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def huge_prompts(url) -> str:
    huge = "kvos " * 2_000_000
    statuses = in_threads(*[lambda: call(url, "POST", "/v1/completions",
                                         {"model": "alice", "prompt": huge, "max_tokens": 4})[0]] * 4)
    return f"4 x 10 MB prompts: HTTP {sorted(set(statuses))}"


def long_chat(url) -> str:
    chat = [{"role": "user", "content": ""}] * 20_000
    status, _ = call(url, "POST", "/v1/chat/completions", {"model": "alice", "messages": chat, "max_tokens": 4})
    return f"a 20,000-message chat: HTTP {status}"


def stop_strings(url) -> str:
    many, _ = call(url, "POST", "/v1/completions",
                   {"model": "alice", "prompt": "x", "max_tokens": 4, "stop": [f"s{i}" for i in range(10_000)]})
    stops = [("\u00e9" * 127) + chr(0x100 + i) for i in range(32)]
    status, _ = call(url, "POST", "/v1/completions", {"model": "alice", "prompt": "kvos", "max_tokens": 300, "n": 128,
                                                      "stop": stops, "temperature": 1.0, "ignore_eos": True})
    return f"10,000 stop strings: HTTP {many}; n=128 with 32 of 256 bytes: HTTP {status}"


def waits(url) -> str:
    pid = call(url, "POST", "/sys/spawn", {"tid": 1, "prompt": "kvos", "max_tokens": 1500, "ignore_eos": True})[1]
    pid = pid["result"]

    async def park(n):
        return await asyncio.gather(*[post(url, "/sys/wait", {"pid": pid}) for _ in range(n)])
    out = {}
    runner = threading.Thread(target=lambda: out.update(codes=asyncio.run(park(520))))
    runner.start()
    time.sleep(3.0)
    call(url, "POST", "/sys/kill", {"pid": pid})
    runner.join()
    codes = out["codes"]
    return f"520 waits on one pid: {codes.count(200)} reaped it, {codes.count(404)} ESRCH"


def zombies(url) -> str:
    refused = spawned = 0
    for _ in range(200):
        status, _ = call(url, "POST", "/sys/spawn", {"tid": 2, "prompt": "x", "max_tokens": 1}, key=BOB)
        spawned += status == 200
        refused += status == 429
    for p in call(url, "POST", "/sys/ps", {}, key=BOB)[1]["result"]:
        if p["state"] == "zombie":
            call(url, "POST", "/sys/wait", {"pid": p["pid"]}, key=BOB)
    return f"bob spawning 200 without waiting (max_procs 16): {spawned} spawned, {refused} EAGAIN"


def shm(url) -> str:
    ids, refusal = [], None
    for i in range(200):
        status, body = call(url, "POST", "/sys/shmget",
                            {"tid": 1, "prompt": [3 + i % 500] + [3 + j % 500 for j in range(1995)]})
        if status != 200:
            refusal = body.get("errno") if isinstance(body, dict) else status
            break
        ids.append(body["result"])
    mem = call(url, "POST", "/sys/meminfo", {}, key=ROOT)[1]["result"]
    alice = mem["cgroups"]["alice"]
    for shmid in ids:
        call(url, "POST", "/sys/shmrm", {"shmid": shmid})
    return (f"{len(ids)} segments, then {refusal}: alice pinned {alice['pinned']} of her share {alice['share']} "
            f"({mem['total']} frames)")


def slot_hog(url):
    """Fill every running slot (and queue more) before the victim arrives; -> the cleanup."""
    pids = [call(url, "POST", "/sys/spawn", {"tid": 1, "prompt": "kvos", "max_tokens": 2000,
                                              "ignore_eos": True})[1]["result"] for _ in range(300)]
    time.sleep(2.0)
    running = sum(p["state"] == "running" for p in call(url, "POST", "/sys/ps", {})[1]["result"])

    def cleanup() -> str:
        for pid in pids:
            call(url, "POST", "/sys/kill", {"pid": pid})
            call(url, "POST", "/sys/wait", {"pid": pid})
        return f"300 long processes of alice, {running} running when bob arrived"
    return cleanup


SCENARIOS = {"baseline": None, "huge": huge_prompts, "chat": long_chat, "stops": stop_strings, "waits": waits,
             "zombies": zombies, "shm": shm, "slots": slot_hog}


def run(url, name, victim_tokens) -> dict:
    attack = SCENARIOS[name]
    if name == "slots":                       # the hog fills the slots first; the victim then arrives
        cleanup = attack(url)
        victim = Victim(url, victim_tokens)
        ttft, pause, total = victim.result()
        what = cleanup()
        return dict(scenario=name, attack=what, ttft=ttft, pause=pause, seconds=total)
    victim = Victim(url, victim_tokens)
    victim.first.wait(60)
    what = attack(url) if attack else "nothing"
    ttft, pause, total = victim.result()
    return dict(scenario=name, attack=what, ttft=ttft, pause=pause, seconds=total)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--memory", default="64MiB")
    p.add_argument("--victim-tokens", type=int, default=600)
    p.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    proc, url = start_daemon(args)
    rows = []
    try:
        for name in args.scenarios:
            rows.append(run(url, name, args.victim_tokens))
            print(f"{name}: {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    if args.json:
        print(json.dumps({"rows": rows, "kvosd_exit": code}))
        return 0
    print(f"victim: bob streaming {args.victim_tokens} tokens of {args.model}; kvosd exit {code} (0: fsck clean)")
    print("| scenario | attack, and what it got | victim TTFT s | victim longest pause s | victim total s |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scenario']} | {r['attack']} | {r['ttft']:.3f} | {r['pause']:.3f} | {r['seconds']:.2f} |")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
