"""kvos under the benchmark: one kernel on the CPU, every request a process, stepped here.

Requests are spawned when they arrive (shared: the system turn in a shm segment; sampling: spawn,
then fork n-1); the harness steps the kernel itself and after each step asks ps() for every
process's token count and meminfo() for mapped frames. Only step() bypasses the syscalls."""
from __future__ import annotations

import time
from collections import deque

from userspace.bench import records
from userspace.bench.child import run_child


def run(workload, options, progress) -> dict:
    import kernel

    started = time.perf_counter()
    boot = dict(options.get("kvos_boot", {}))
    k = kernel.boot(device="cpu", memory=options["memory"], threads=options["threads"], **boot)
    sys = k.syscalls()
    tid = sys.spawn_tenant(options["model"])
    load_seconds = time.perf_counter() - started
    _warm_up(sys, tid, workload)

    samples = records.samples_of(workload)
    by_request = {}
    for s in samples:
        by_request.setdefault(s.request, []).append(s)
    params = dict(temperature=workload.temperature, ignore_eos=True)
    before = sys.schedstat()
    cache_hits_before = sys.meminfo().page_cache_hits
    progress.phase("run", workload.generated_tokens)

    pending = deque(sorted(workload.requests, key=lambda r: r.arrival))
    owner = {}                              # pid -> SampleRecord
    peak_mapped = peak_private = 0
    observe_seconds = 0.0
    shmid = None
    t0, cpu0 = time.perf_counter(), records.cpu_time()
    if workload.prefix_len:                 # the system turn is prefilled once and pinned; requests attach it
        shmid = sys.shmget(tid, workload.requests[0].prompt[:workload.prefix_len])
    while True:
        now = time.perf_counter() - t0
        while pending and pending[0].arrival <= now:
            r = pending.popleft()
            prompt = r.prompt[workload.prefix_len:] if shmid is not None else r.prompt
            seed = {} if r.seed is None else {"seed": r.seed}
            pid = sys.spawn(tid, prompt, max_tokens=r.output_len, shm=shmid, **params, **seed)
            pids = [pid] + (sys.fork(pid, r.n - 1) if r.n > 1 else [])
            for p, s in zip(pids, by_request[r.index]):
                owner[p] = s
        if not k.step():
            if not pending:
                break
            time.sleep(max(0.0, pending[0].arrival - (time.perf_counter() - t0)))
            continue
        mark = time.perf_counter()
        at = mark - t0
        pages = 0
        for info in sys.ps():
            s = owner.get(info.pid)
            if s is None:
                continue
            new = info.generated_tokens - len(s.token_times)
            if new > 0:
                s.token_times.extend([at] * new)
            pages += info.pages - info.swapped_pages
        mem = sys.meminfo()
        peak_mapped = max(peak_mapped, mem.mapped)
        peak_private = max(peak_private, pages)
        observe_seconds += time.perf_counter() - mark
        progress.update(sum(len(s.token_times) for s in samples))
    wall, cpu = time.perf_counter() - t0, records.cpu_time() - cpu0
    progress.update(sum(len(s.token_times) for s in samples), force=True)

    for pid, s in owner.items():
        status = sys.wait(pid)
        s.finish_reason = status.reason
        s.tokens = list(status.tokens)
        if len(status.tokens) != len(s.token_times):
            raise RuntimeError(f"pid {pid}: ps() saw {len(s.token_times)} tokens, wait() returned "
                               f"{len(status.tokens)}")
    after = sys.schedstat()
    mem = sys.meminfo()
    if shmid is not None:
        sys.shmrm(shmid)
    delta = {name: getattr(after, name) - getattr(before, name)
             for name in ("steps", "prefill_tokens", "decode_tokens", "cached_tokens", "generated_tokens",
                          "preemptions", "swap_outs", "reclaims", "recomputed_tokens", "busy_seconds")}
    delta["page_cache_hits"] = mem.page_cache_hits - cache_hits_before
    delta["observe_seconds"] = observe_seconds
    delta["token_budget"] = k.sched.token_budget
    program = k.tenants[tid].program
    matmul = str(getattr(program, "matmul_dtype", "torch.float32")).removeprefix("torch.")
    kv = str(program.kv_shape.dtype).removeprefix("torch.")
    k.shutdown()
    name = "kvos" + ("-bf16" if matmul == "bfloat16" else "") + ("-bf16kv" if kv == "bfloat16" else "")
    return records.result(
        name, samples, load_seconds=load_seconds, wall_seconds=wall,
        cpu_seconds=cpu,
        mode=f"continuous batching, paged KV ({mem.frame_bytes // 1024} KiB frames), token budget "
             f"{delta['token_budget']}, {matmul} matmuls, {kv} KV",
        kv_peak_bytes=peak_mapped * mem.frame_bytes, kv_private_peak_bytes=peak_private * mem.frame_bytes,
        kv_capacity_bytes=mem.total * mem.frame_bytes, return_tokens=options.get("return_tokens", False),
        extra=delta, notes=_notes(workload, delta))


def _warm_up(sys, tid, workload) -> None:
    """One short request before the clock starts (first-call costs of torch and the C kernels).
    Eight tokens fill no page, so nothing of it stays in the page cache."""
    prompt = workload.requests[0].prompt[:8]
    sys.wait(sys.spawn(tid, prompt, max_tokens=2, temperature=0, ignore_eos=True))


def _notes(workload, delta) -> list:
    notes = []
    if workload.prefix_len:
        notes.append(f"the {workload.prefix_len}-token system turn is one shm segment every request attaches")
    if any(r.n > 1 for r in workload.requests):
        notes.append("n samples: spawn, then fork(n-1); the forks map the prompt's pages once it is computed")
    if delta["preemptions"]:
        notes.append(f"{delta['preemptions']} preemptions ({delta['swap_outs']} swap-outs, "
                     f"{delta['reclaims']} reclaims)")
    return notes


if __name__ == "__main__":
    run_child(run)
