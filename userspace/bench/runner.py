"""Running the systems one after the other, each in its own process, with progress bars.

run_system() starts a system's module with the thread variables set, turns its `@bench` stderr
lines into a progress bar and parses its one JSON line; a child that dies or times out becomes a
failed row with the tail of its stderr. The child is reaped with wait4 (its own CPU time); its peak
resident set (rss_peak_bytes) is its VmHWM, reported by the child at its end and polled while it
runs. Also: the machine's busy CPU, to tell disturbed runs."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from userspace.bench.child import child_env, parse_line, vm_hwm_bytes
from userspace.bench.systems import SYSTEMS

STDERR_TAIL = 40


def run_system(name: str, workload, options: dict, progress=None, timeout: float | None = None,
               log_dir: Path | None = None) -> dict:
    """The raw result of system `name` on `workload` (the JSON its process printed)."""
    with tempfile.TemporaryDirectory(prefix="kvos-bench-") as tmp:
        wl_path, opt_path = Path(tmp) / "workload.json", Path(tmp) / "options.json"
        workload.save(wl_path)
        opt_path.write_text(json.dumps(options))
        cmd = [sys.executable, "-m", SYSTEMS[name], str(wl_path), str(opt_path)]
        return _run(name, cmd, options["threads"], progress, timeout, log_dir)


def measure_ceiling(threads: int, device: str = "cpu", timeout: float = 300) -> dict:
    """The machine's fp32 matmul FLOP/s and read bandwidth, measured in a process of its own
    (on a cuda device: the GPU's)."""
    cmd = [sys.executable, "-m", "userspace.bench.ceiling", str(threads), device]
    try:
        out = subprocess.run(cmd, env=child_env(threads), capture_output=True, text=True, timeout=timeout,
                             cwd=_repo_root())
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        return {"ok": False, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return {"ok": True, **json.loads(out.stdout)}


def _repo_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def _run(name, cmd, threads, progress, timeout, log_dir) -> dict:
    task = progress.add_task(f"{name}: starting", total=None) if progress else None
    tail = deque(maxlen=STDERR_TAIL)
    log = open(Path(log_dir) / f"{name}.stderr.log", "w") if log_dir else None
    env = child_env(threads)
    env["PYTHONPATH"] = _repo_root() + os.pathsep + env.get("PYTHONPATH", "")
    started = time.monotonic()
    machine_before, self_before = machine_busy_seconds(), _self_cpu()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=_repo_root())

    def read_stderr():
        for line in proc.stderr:
            parsed = parse_line(line.strip())
            if parsed is None:
                tail.append(line.rstrip())
                if log:
                    log.write(line)
                continue
            if progress is None:
                continue
            kind, value = parsed
            if kind == "phase":
                phase, total = value
                progress.update(task, description=f"{name}: {phase}", total=total, completed=0)
            else:
                progress.update(task, completed=value)

    out = []
    readers = [threading.Thread(target=read_stderr, daemon=True),
               threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)]
    for reader in readers:
        reader.start()
    timed_out, usage, hwm = _reap(proc, timeout)
    for reader in readers:
        reader.join(10)
    if log:
        log.close()
    if timed_out:
        return _failed(name, f"timed out after {timeout:.0f} s", tail, progress, task)
    stdout = "".join(out)
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        return _failed(name, f"exited with status {proc.returncode}", tail, progress, task)
    try:
        raw = json.loads(lines[-1])
    except ValueError:
        return _failed(name, "printed no JSON result", tail, progress, task)
    raw["system"] = name                  # the row is the system asked for (kvos-gguf runs the kvos module)
    raw["process_seconds"] = time.monotonic() - started
    # CPU the process got over what its threads could have had: well below 1 means other
    # work (or idle waits of its own) shared the cores.
    own = usage.ru_utime + usage.ru_stime
    raw["cpu_share"] = own / (raw["process_seconds"] * threads)
    # What everything else on the machine used meanwhile: with 2 threads on 2 cores, any of it
    # stalls OpenMP barriers, and timings can be off by far more than the share itself.
    machine = machine_busy_seconds()
    if machine is not None and machine_before is not None:
        others = machine - machine_before - own - (_self_cpu() - self_before)
        raw["others_cpu_share"] = max(0.0, others) / (raw["process_seconds"] * os.cpu_count())
    raw["rss_peak_bytes"] = _rss_peak(raw, usage, hwm)
    if not raw.get("ok"):
        raw["stderr_tail"] = list(tail)
    if progress is not None:
        progress.update(task, description=f"{name}: {'done' if raw.get('ok') else 'failed'}")
    return raw


def _reap(proc, timeout):
    """Wait for the child with wait4, which returns the usage of that child alone (its CPU; RUSAGE_CHILDREN
    would fold in every earlier system), polling its peak resident set (VmHWM) meanwhile:
    (timed out, usage, VmHWM bytes or None)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    hwm = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return False, usage, hwm
        hwm = max(hwm or 0, vm_hwm_bytes(proc.pid) or 0) or None
        if deadline is not None and time.monotonic() >= deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return True, usage, hwm
        time.sleep(0.02)


def _rss_peak(raw: dict, usage, polled) -> int:
    """The child's own report at its end (exact), what polling saw, or ru_maxrss where /proc is missing."""
    best = max(raw.get("vm_hwm_bytes") or 0, polled or 0)
    if best:
        return best
    return usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024


def machine_busy_seconds() -> float | None:
    """CPU seconds every process on the machine has spent, from /proc/stat (None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)          # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(max_wait: float, threshold: float = 0.1, window: float = 3.0) -> float:
    """Wait (at most max_wait seconds) until the rest of the machine used under `threshold` of
    its CPUs over `window` seconds. Returns that last share."""
    deadline = time.monotonic() + max_wait
    while True:
        before, self_before = machine_busy_seconds(), _self_cpu()
        time.sleep(window)
        after = machine_busy_seconds()
        if before is None or after is None:
            return 0.0
        share = max(0.0, after - before - (_self_cpu() - self_before)) / (window * os.cpu_count())
        if share < threshold or time.monotonic() >= deadline:
            return share


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _failed(name, reason, tail, progress, task) -> dict:
    if progress is not None:
        progress.update(task, description=f"{name}: failed")
    last = next((ln for ln in reversed(tail) if ln.strip()), "")
    return {"ok": False, "system": name, "error": f"{reason}: {last}" if last else reason,
            "stderr_tail": list(tail)}
