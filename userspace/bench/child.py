"""The protocol between `kvos bench` and each system's process.

The parent starts `python -m userspace.bench.systems.NAME WORKLOAD.json OPTIONS.json` with
the thread variables set (child_env). The child reports progress as `@bench ...` lines on
stderr and prints exactly one JSON object on stdout at the end: its SystemResult. Anything
a library prints to stdout while the child runs is sent to stderr instead.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from contextlib import contextmanager

PREFIX = "@bench"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "KVOS_THREADS")


def child_env(threads: int) -> dict:
    """The environment of a system's process: every thread pool sized to `threads`."""
    env = dict(os.environ)
    for name in THREAD_VARS:
        env[name] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"      # the tokenizers pool would be extra threads
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


class Progress:
    """Progress lines for the parent's bars, at most a few a second."""

    def __init__(self, stream=None, every: float = 0.25):
        self.stream = stream or sys.stderr
        self.every = every
        self._last = 0.0

    def phase(self, name: str, total: int | None = None) -> None:
        self._write(f"{PREFIX} phase {name} {total if total is not None else '-'}")
        self._last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.every:
            self._last = now
            self._write(f"{PREFIX} done {done}")

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def parse_line(line: str):
    """(kind, fields) of a progress line, or None for any other stderr line."""
    if not line.startswith(PREFIX + " "):
        return None
    parts = line.split()
    if len(parts) >= 3 and parts[1] == "phase":
        return "phase", (parts[2], None if len(parts) < 4 or parts[3] == "-" else int(parts[3]))
    if len(parts) == 3 and parts[1] == "done":
        return "done", int(parts[2])
    return None


def vm_hwm_bytes(pid="self") -> int | None:
    """A live process's peak resident set (VmHWM in /proc/PID/status), None where there is none.
    Not ru_maxrss: Linux carries a forked child's pre-exec peak (the parent's pages it mapped at fork)
    into it, so every system would show at least the bench's own size."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@contextmanager
def stdout_to_stderr():
    """Route fd 1 (Python and C writers alike) to stderr; yields a file on the real stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(saved, "w")
    try:
        yield real
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        real.close()


def run_child(run) -> None:
    """Entry point of a system's module: run(workload, options, progress) -> result dict."""
    from userspace.bench.workloads import Workload
    if len(sys.argv) != 3:
        print(f"usage: python -m {sys.modules['__main__'].__spec__.name} WORKLOAD.json OPTIONS.json",
              file=sys.stderr)
        sys.exit(2)
    workload = Workload.load(sys.argv[1])
    with open(sys.argv[2]) as f:
        options = json.load(f)
    with stdout_to_stderr() as out:
        try:
            result = run(workload, options, Progress())
        except Exception as exc:      # the parent shows the reason in its table; the traceback stays on stderr
            traceback.print_exc()
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        result["vm_hwm_bytes"] = vm_hwm_bytes()       # this process's peak resident set, load included
        out.write(json.dumps(result))
        out.write("\n")
        out.flush()
