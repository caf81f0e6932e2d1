"""The whole kernel on a GPU (python3 benchmarks/gpu_kernel.py; `--dry-run`: every part on the CPU, small).

gpu_check.py checks the CUDA ops one by one; this checks everything around them on a real
device, then times the default model's shape:

1. correctness: one seeded workload on tiny-llama in float32 (a system prompt in shm, forks,
   a pool small enough that processes are preempted, swapped out and back in, and a page
   cache that is reclaimed) runs on the CPU and on the device. Every greedy output must be
   equal token for token; fsck after every step; every frame free at the end. It runs twice
   on the device: eagerly, and with decode graphs (boot(graphs=True): captured on CUDA).
   The same on the device in bfloat16 reports how many outputs still agree (not required).
2. speed: a program with SmolLM2-135M's shape and random weights (no download), bf16,
   decode steps at batch 1, 8, 64, 256 over ~512 tokens of context, eager on torch's ops
   (KVOS_CUDA_FUSED=0's forward), eager on the fused kernels and with graphs in interleaved
   rounds (min over rounds); launch API calls and GPU kernels per step and GPU busy
   (kernel time over wall) from torch.profiler; each graph's capture time and pool growth;
   one 2048-token prefill step (eager).
Exit status 1 if a correctness check failed.
"""
import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernel  # noqa: E402
from userspace.programs.config import LlamaConfig  # noqa: E402
from userspace.programs.llama import LlamaProgram, fuse_hf_weights  # noqa: E402
from userspace.programs.loader import load_program  # noqa: E402
from userspace.programs.tiny import tiny_tokenizer, tiny_weights  # noqa: E402

GREEDY = dict(temperature=0, ignore_eos=True)
FAILED = []

SMOLLM2_SHAPE = LlamaConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def workload(k, program, seed):
    """Spawn the workload; returns the pids whose outputs are compared."""
    rng = random.Random(seed)
    s = k.syscalls()
    tid = s.spawn_tenant(program)
    shm = s.shmget(tid, [rng.randrange(3, 512) for _ in range(40)])
    pids = []
    for i in range(24):
        prompt = [rng.randrange(3, 512) for _ in range(rng.randint(5, 90))]
        pids.append(s.spawn(tid, prompt, max_tokens=rng.randint(8, 60), shm=shm if i % 3 == 0 else None, **GREEDY))
    for _ in range(6):      # fork some once they have pages of their own
        k.step()
    for pid in pids[:4]:
        if k.procs[pid].alive:
            pids += s.fork(pid, 2)
    return pids, shm


def run(device, memory, dtype=torch.float32, graphs=False):
    k = kernel.boot(device=device, memory=memory, swap="64MiB", token_budget=256, graphs=graphs)
    pids, shm = workload(k, load_program("tiny-llama", device, dtype=dtype), seed=1)
    steps = 0
    while k.step():
        k.fsck()
        steps += 1
    k.fsck()
    s = k.syscalls()
    out = {p: s.wait(p).tokens for p in pids}
    s.shmrm(shm)
    st = s.schedstat()
    stats = (f"{st.preemptions} preemptions, {st.swap_outs} swap-outs, {st.swap_ins} swap-ins, "
             f"{st.reclaims} reclaims, {st.cached_tokens} prompt tokens from the page cache")
    if k.graphs is not None:
        g = k.graphs.stats
        stats += (f"; graphs: {g.static_steps} static decode steps ({g.replays} replayed, "
                  f"{len(g.captures)} sizes captured), {g.eager_steps} eager")
    info = s.meminfo()
    reserved = 0 if k.null_frame is None else 1      # the padding rows' frame stays reserved
    return out, steps, stats, (info, reserved)


def correctness(device):
    print(f"== correctness: tiny-llama float32, cpu against {device}, eager and with decode graphs", flush=True)
    frame = 16 * load_program("tiny-llama", "cpu").kv_shape.bytes_per_token    # one 16-token page
    memory = 40 * frame                # too small for the workload at once
    t0 = time.perf_counter()
    want, steps_cpu, _, _ = run("cpu", memory)
    print(f"   cpu {steps_cpu} steps in {time.perf_counter() - t0:.1f} s")
    for graphs in (False, True):
        t1 = time.perf_counter()
        got, steps_dev, stats, (info, reserved) = run(device, memory, graphs=graphs)
        mode = "graphs" if graphs else "eager"
        print(f"   {device} {mode}: {steps_dev} steps in {time.perf_counter() - t1:.1f} s; {stats}")
        same = sum(want[p] == got[p] for p in want)
        check(f"{mode}: {same}/{len(want)} greedy outputs equal token for token, fsck clean every step",
              same == len(want))
        back = info.free + info.cached + reserved
        check(f"{mode}: every frame free or cached at the end ({back} of {info.total}, the null frame "
              f"counted), swap empty", back == info.total and info.swap_used == 0)
    if device.startswith("cuda"):
        got16, *_ = run(device, 2 * memory, dtype=torch.bfloat16)
        same16 = sum(want[p] == got16[p] for p in want)
        agree = sum(sum(a == b for a, b in zip(want[p], got16[p])) for p in want)
        total = sum(len(want[p]) for p in want)
        print(f"   bf16 on {device}: {same16}/{len(want)} outputs equal to float32 cpu, "
              f"{agree}/{total} tokens in the same place (informational)")


def check(name, ok):
    print(f"   {'ok  ' if ok else 'FAIL'} {name}", flush=True)
    if not ok:
        FAILED.append(name)


def smollm2_shaped(device, dtype, config=SMOLLM2_SHAPE):
    weights = fuse_hf_weights(config, tiny_weights(config, seed=0))
    return LlamaProgram("smollm2-shape-random", config, weights, tiny_tokenizer(), b"smollm2-shape-random" + bytes(12),
                        torch.device(device), dtype)


LAUNCH_APIS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
COPY_APIS = ("cudaMemcpyAsync", "cudaMemcpy", "cuMemcpyHtoDAsync_v2", "cuMemcpyDtoHAsync_v2", "cudaMemsetAsync")


def profile_steps(k, device, steps=5):
    """torch.profiler over `steps` decode steps: (launch API calls per step, copy and memset calls per step,
    GPU kernels per step, kernel time over wall time, the top ops by host time). Kernel time is the sum of
    kernel durations (one stream: no overlap to double count); None where the profiler saw no device (the CPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            k.step()
        sync(device)
        wall = time.perf_counter() - t0
    events = prof.events()
    launches = sum(1 for e in events if e.name in LAUNCH_APIS) / steps
    copies = sum(1 for e in events if e.name in COPY_APIS) / steps
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / wall if kernels else None
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=44)
    return launches, copies, len(kernels) / steps, busy, table


def timed_steps(k, device, n):
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        k.step()
    sync(device)
    return (time.perf_counter() - t0) / n * 1e3


def speed(device, batches, ctx, rounds=3, steps=10, profile_batch=64, small=False):
    """Decode step time eager against graphs at each batch size, in one kernel whose graph runner is
    switched off and on between rounds (the same processes and pages for both; rounds interleaved)."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = SMOLLM2_SHAPE
    if small:        # --dry-run: the tiny model's shape, so that the CPU gets through every line quickly
        config = load_program("tiny-llama", "cpu").config
    program = smollm2_shaped(device, dtype, config)
    kv_token_bytes = program.kv_shape.bytes_per_token
    need = (max(batches) * (ctx + rounds * 2 * steps + 64) + 4096) * kv_token_bytes
    k = kernel.boot(device=device, memory=int(need * 1.3), swap=0, token_budget=4096, graphs=True,
                    max_running=max(batches))
    s = k.syscalls()
    tid = s.spawn_tenant(program)
    runner = k.graphs                     # made with the pool, at the first tenant
    rng = random.Random(0)
    vocab = config.vocab_size
    print(f"\n== speed: {'tiny-llama' if small else 'SmolLM2-135M'} shape, random weights, {str(dtype)[6:]} on "
          f"{device}, context ~{ctx}; decode graphs {'captured' if runner.capture else 'off (static buffers, eager)'}",
          flush=True)
    fused = program.device_fused          # the eager forward on the fused kernels (the torch ops: a column)
    print(f"   {'batch':>5} {'torch-ops ms':>12} {'eager ms':>9} {'graphs ms':>9} {'speedup':>7} {'tok/s graphs':>12} "
          f"{'launches e/g':>12} {'copies e/g':>10} {'kernels e/g':>11} {'GPU busy e/g':>13} {'capture s':>9} "
          f"{'capture MiB':>11}")
    tables = []
    for batch in batches:
        budget = min(2048, config.max_position_embeddings - ctx)       # a tenant's max_tokens limit: 2048
        pids = [s.spawn(tid, [rng.randrange(3, vocab) for _ in range(ctx)], max_tokens=budget, **GREEDY)
                for _ in range(batch)]
        while any(len(k.procs[p].tokens) < ctx + 2 for p in pids):
            k.step()
        for _ in range(3):               # warm: the graph of this size is captured here
            k.step()
        times = {"torch": [], "eager": [], "graphs": []}
        for _ in range(rounds):
            for mode in ("torch", "eager", "graphs"):
                k.graphs = runner if mode == "graphs" else None
                program.device_fused = fused and mode != "torch"
                times[mode].append(timed_steps(k, device, steps))
        program.device_fused = fused
        prof = {}
        for mode in ("eager", "graphs"):
            k.graphs = runner if mode == "graphs" else None
            prof[mode] = profile_steps(k, device)
        k.graphs = runner
        eager, graphs = min(times["eager"]), min(times["graphs"])
        size = next(b for b in runner.sizes if b >= batch)
        capture = runner.stats.captures.get(size)
        cap_s, cap_mib = (f"{capture[0]:.2f}", f"{capture[1] / 2**20:.0f}") if capture else ("-", "-")
        busy = "/".join("n/a" if prof[m][3] is None else f"{prof[m][3]:.0%}" for m in ("eager", "graphs"))
        print(f"   {batch:>5} {min(times['torch']):>12.2f} {eager:>9.2f} {graphs:>9.2f} {eager / graphs:>6.2f}x "
              f"{batch / graphs * 1e3:>12.0f} "
              f"{prof['eager'][0]:>5.0f}/{prof['graphs'][0]:<6.0f} {prof['eager'][1]:>4.0f}/{prof['graphs'][1]:<5.0f} "
              f"{prof['eager'][2]:>5.0f}/{prof['graphs'][2]:<5.0f} "
              f"{busy:>13} {cap_s:>9} {cap_mib:>11}", flush=True)
        if batch == profile_batch:
            tables = [(m, prof[m][4]) for m in ("eager", "graphs")]
        for p in pids:
            s.kill(p)
        k.step()
    if runner.capture:
        total = sum(c[1] for c in runner.stats.captures.values())
        print(f"   graphs captured: sizes {sorted(runner.stats.captures)}, "
              f"{sum(c[0] for c in runner.stats.captures.values()):.2f} s and {total / 2**20:.0f} MiB of pool in all")
    k.graphs = None                       # the prefill line: eager, as a prefill step always is
    pids = [s.spawn(tid, [rng.randrange(3, vocab) for _ in range(512)], max_tokens=1, **GREEDY) for _ in range(4)]
    k.step()      # warm
    for p in pids:
        s.kill(p)
    k.step()
    pids = [s.spawn(tid, [rng.randrange(3, vocab) for _ in range(512)], max_tokens=1, **GREEDY) for _ in range(4)]
    ms = timed_steps(k, device, 1)
    print(f"   prefill step of 4 x 512 tokens: {ms:.1f} ms ({2048 / ms * 1e3:.0f} tokens/s)")
    k.graphs = runner
    k.fsck()
    for mode, table in tables:
        print(f"\n   profile of 5 decode steps at batch {profile_batch}, {mode}:\n{table}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved eager/graphs rounds per batch size")
    ap.add_argument("--steps", type=int, default=10, help="decode steps per round")
    ap.add_argument("--dry-run", action="store_true",
                    help="every part on the CPU, small: the tiny model's shape, batches 1,3, context 40")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.batches, args.ctx, args.rounds, args.steps = "cpu", "1,3", 40, 1, 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("torch sees no CUDA GPU")
    batches = [int(b) for b in args.batches.split(",")]
    correctness(args.device)
    speed(args.device, batches, args.ctx, args.rounds, args.steps, profile_batch=64 if 64 in batches else batches[-1],
          small=args.dry_run)
    print("\nFAILED: " + ", ".join(FAILED) if FAILED else "\nall checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
