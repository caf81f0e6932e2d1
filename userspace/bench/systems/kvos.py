"""kvos under the benchmark: one kernel on the CPU (or a GPU), every request a process, driven through syscalls.

Requests are spawned when they arrive (shared: the system turn in a shm segment; sampling: spawn_n);
the harness asks trace() for the next step record (in manual mode that call runs the step), takes
each process's token count from the record's works, and reads ps() pages and meminfo() frames after
it for the KV peaks. Beyond boot, syscalls() and shutdown() it touches nothing of the kernel.
On cuda the row runs float32 (as the transformers rows; their outputs must agree), and kvos-bf16
runs the whole program in bfloat16, the GPU's fast dtype (KVOS_DTYPE, unless already set)."""
from __future__ import annotations

import os
import time
from collections import deque

from userspace.bench import records
from userspace.bench.child import run_child
from userspace.bench.roofline import StepWork

# trace()'s wait when nothing more will arrive. In manual mode the wait runs the next step, so this
# only bounds a single step; with a loop thread (kvosd) it bounds a stall before giving up.
STEP_TIMEOUT = 600.0


def run(workload, options, progress) -> dict:
    import torch  # noqa: F401

    import kernel

    # The library's import stays outside the load clock, as for every other system (llama.cpp's
    # module, torch and transformers are imported before theirs start): kernel.boot would otherwise
    # import torch inside it, ~0.8 s of the ~1.2 s this row reported.
    started = time.perf_counter()
    boot = dict(options.get("kvos_boot", {}))
    device = options.get("device", "cpu")
    if device != "cpu":     # on a GPU the program's parts share one dtype: bf16 throughout, or float32
        os.environ.setdefault("KVOS_DTYPE", os.environ.get("KVOS_MATMUL") or "float32")
    k = kernel.boot(device=device, memory=options["memory"], threads=options["threads"], **boot)
    root = k.syscalls()
    tid = root.spawn_tenant(options["model"])
    load_seconds = time.perf_counter() - started
    _warm_up(root, tid, workload)

    samples = records.samples_of(workload)
    work = StepWork(root.tenantinfo(tid))   # each step's FLOPs and bytes, for the parent's roofline
    before = root.schedstat()
    cache_hits_before = root.meminfo().page_cache_hits
    progress.phase("run", workload.generated_tokens)
    t0, cpu0 = time.perf_counter(), records.cpu_time()
    shmid = None
    if workload.prefix_len:                 # the system turn is prefilled once and pinned; requests attach it
        shmid = root.shmget(tid, workload.requests[0].prompt[:workload.prefix_len])
    seen = _drive(root, tid, workload, samples, shmid, since=before.steps, t0=t0, progress=progress, work=work)
    wall, cpu = time.perf_counter() - t0, records.cpu_time() - cpu0
    progress.update(sum(len(s.token_times) for s in samples), force=True)

    for pid, s in seen["owner"].items():
        status = root.wait(pid)
        s.finish_reason = status.reason
        s.tokens = list(status.tokens)
        if len(status.tokens) != len(s.token_times):
            raise RuntimeError(f"pid {pid}: the trace saw {len(s.token_times)} tokens, wait() returned "
                               f"{len(status.tokens)}")
    after = root.schedstat()
    mem = root.meminfo()
    if shmid is not None:
        root.shmrm(shmid)
    delta = {name: getattr(after, name) - getattr(before, name)
             for name in ("steps", "prefill_tokens", "decode_tokens", "cached_tokens", "generated_tokens",
                          "preemptions", "swap_outs", "reclaims", "recomputed_tokens", "busy_seconds")}
    delta["page_cache_hits"] = mem.page_cache_hits - cache_hits_before
    delta["observe_seconds"] = seen["observe_seconds"]
    delta["token_budget"] = root.uname().token_budget
    info = root.tenantinfo(tid)
    matmul, kv = info.matmul_dtype, info.kv_dtype
    k.shutdown()
    weights = os.environ.get("KVOS_WEIGHTS", "float32")
    name = ("kvos" + ("-bf16" if matmul == "bfloat16" else "") + ("-bf16kv" if kv == "bfloat16" else "")
            + ("-gguf" if weights == "gguf" else "") + ("-kv8" if kv == "int8" else ""))
    result = records.result(
        name, samples, load_seconds=load_seconds, wall_seconds=wall,
        cpu_seconds=cpu,
        mode=("" if device == "cpu" else f"on {device}, " + ("CUDA-graph decode, " if boot.get("graphs") else ""))
        + f"continuous batching, paged KV ({mem.frame_bytes // 1024} KiB frames), token budget "
             f"{delta['token_budget']}, {matmul} matmuls, {kv} KV" + (", the GGUF's quantized weights"
                                                                      if weights == "gguf" else ""),
        kv_peak_bytes=seen["peak_mapped"] * mem.frame_bytes,
        kv_private_peak_bytes=seen["peak_private"] * mem.frame_bytes,
        kv_capacity_bytes=mem.total * mem.frame_bytes, return_tokens=options.get("return_tokens", False),
        extra=delta, notes=_notes(workload, delta))
    result["roofline_work"] = work.to_json()
    return result


def _drive(root, tid, workload, samples, shmid, *, since, t0, progress, work=None) -> dict:
    """Spawn what has arrived, take the next step record, observe; until every process has exited.
    A token counts as seen when trace() hands back the step that generated it."""
    by_request = {}
    for s in samples:
        by_request.setdefault(s.request, []).append(s)
    params = dict(temperature=workload.temperature, ignore_eos=True)
    pending = deque(sorted(workload.requests, key=lambda r: r.arrival))
    owner, live = {}, set()                 # pid -> SampleRecord; pids not yet in a record's exits
    peak_mapped = peak_private = tokens = 0
    observe_seconds = 0.0
    while pending or live:
        now = time.perf_counter() - t0
        while pending and (not live if workload.serial else pending[0].arrival <= now):
            r = pending.popleft()
            prompt = r.prompt[workload.prefix_len:] if shmid is not None else r.prompt
            seed = {} if r.seed is None else {"seed": r.seed}
            if workload.serial:             # it arrives now: the previous request has just ended
                for s in by_request[r.index]:
                    s.arrival = time.perf_counter() - t0
            # spawn and n - 1 forks in one call: no step runs between them, even over HTTP
            pids = root.spawn_n(tid, prompt, r.n, max_tokens=r.output_len, shm=shmid, **params, **seed)
            owner.update(zip(pids, by_request[r.index]))
            live.update(pids)
        # wait no longer than the next arrival, which must be spawned on time
        timeout = max(1e-3, pending[0].arrival - now) if pending and not workload.serial else STEP_TIMEOUT
        steps = root.trace(since=since, timeout=timeout)
        if not steps:                       # nothing runnable (manual mode), or no step in `timeout`
            if not pending:
                break
            time.sleep(max(0.0, pending[0].arrival - (time.perf_counter() - t0)))
            continue
        mark = time.perf_counter()
        at = mark - t0
        for step in steps:
            if work is not None:
                work.add(step)
            for w in step.works:
                s = owner.get(w.pid)
                if s is not None and w.generated > len(s.token_times):
                    tokens += w.generated - len(s.token_times)
                    s.token_times.extend([at] * (w.generated - len(s.token_times)))
            live.difference_update(pid for pid, _ in step.exits)
        since = steps[-1].step
        # the peaks are of resident pages: private counts a shared page once per sample mapping it
        pages = sum(p.pages - p.swapped_pages for p in root.ps() if p.pid in owner)
        peak_mapped = max(peak_mapped, root.meminfo().mapped)
        peak_private = max(peak_private, pages)
        observe_seconds += time.perf_counter() - mark
        progress.update(tokens)
    return {"owner": owner, "peak_mapped": peak_mapped, "peak_private": peak_private,
            "observe_seconds": observe_seconds}


def _warm_up(root, tid, workload) -> None:
    """One short request before the clock starts (first-call costs of torch and the C kernels).
    Eight tokens fill no page, so nothing of it stays in the page cache."""
    prompt = workload.requests[0].prompt[:8]
    root.wait(root.spawn(tid, prompt, max_tokens=2, temperature=0, ignore_eos=True))


def _notes(workload, delta) -> list:
    notes = []
    if workload.prefix_len:
        notes.append(f"the {workload.prefix_len}-token system turn is one shm segment every request attaches")
    if any(r.n > 1 for r in workload.requests):
        notes.append("n samples: spawn_n (spawn, then fork n-1 in one call); the forks map the prompt's pages "
                     "once it is computed")
    if delta["preemptions"]:
        notes.append(f"{delta['preemptions']} preemptions ({delta['swap_outs']} swap-outs, "
                     f"{delta['reclaims']} reclaims)")
    return notes


if __name__ == "__main__":
    run_child(run)
