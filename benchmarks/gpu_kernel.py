"""The whole kernel on a GPU (python3 benchmarks/gpu_kernel.py; `--device cpu` is a dry run).

gpu_check.py checks the CUDA ops one by one; this checks everything around them on a real
device, then times the default model's shape:

1. correctness: one seeded workload on tiny-llama in float32 (a system prompt in shm, forks,
   a pool small enough that processes are preempted, swapped out and back in, and a page
   cache that is reclaimed) runs on the CPU and on the device. Every greedy output must be
   equal token for token; fsck after every step; every frame free at the end. The same on
   the device in bfloat16 reports how many outputs still agree (not required: other numerics).
2. speed: a program with SmolLM2-135M's shape and random weights (no download), bf16,
   decode steps at batch 1..256 over ~512 tokens of context and one 2048-token prefill step;
   ms per step, tokens per second, and the KV bytes read per decode step over its time.
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


def run(device, memory, dtype=torch.float32):
    k = kernel.boot(device=device, memory=memory, swap="64MiB", token_budget=256)
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
    return out, steps, stats, s.meminfo()


def correctness(device):
    print(f"== correctness: tiny-llama float32, cpu against {device}", flush=True)
    frame = 16 * load_program("tiny-llama", "cpu").kv_shape.bytes_per_token    # one 16-token page
    memory = 40 * frame                # too small for the workload at once
    t0 = time.perf_counter()
    want, steps_cpu, _, _ = run("cpu", memory)
    t1 = time.perf_counter()
    got, steps_dev, stats, info = run(device, memory)
    t2 = time.perf_counter()
    same = sum(want[p] == got[p] for p in want)
    print(f"   cpu {steps_cpu} steps in {t1 - t0:.1f} s; {device} {steps_dev} steps in {t2 - t1:.1f} s")
    print(f"   {device}: {stats}")
    check(f"{same}/{len(want)} greedy outputs equal token for token", same == len(want))
    check(f"every frame free or cached at the end ({info.free + info.cached} of {info.total}), swap empty",
          info.free + info.cached == info.total and info.swap_used == 0)
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


def smollm2_shaped(device, dtype):
    config = SMOLLM2_SHAPE
    weights = fuse_hf_weights(config, tiny_weights(config, seed=0))
    return LlamaProgram("smollm2-shape-random", config, weights, tiny_tokenizer(), b"smollm2-shape-random" + bytes(12),
                        torch.device(device), dtype)


def profile_steps(k, device, steps=5):
    """Where a decode step's time goes: torch.profiler over a few steps, top ops by host time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            k.step()
        sync(device)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=44)


def speed(device, batches, ctx, profile_batch=64):
    profiles = []
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    program = smollm2_shaped(device, dtype)
    kv_token_bytes = program.kv_shape.bytes_per_token
    need = (max(batches) * (ctx + 64) + 4096) * kv_token_bytes
    k = kernel.boot(device=device, memory=int(need * 1.2), swap=0, token_budget=4096)
    s = k.syscalls()
    tid = s.spawn_tenant(program)
    rng = random.Random(0)
    print(f"\n== speed: SmolLM2-135M shape, random weights, {str(dtype)[6:]} on {device}, context ~{ctx}", flush=True)
    print(f"   {'batch':>5} {'ms/step':>9} {'tokens/s':>10} {'KV GB/s':>8}")
    for batch in batches:
        pids = [s.spawn(tid, [rng.randrange(3, 49152) for _ in range(ctx)], max_tokens=1000, **GREEDY)
                for _ in range(batch)]
        while any(len(k.procs[p].tokens) < ctx + 2 for p in pids):
            k.step()
        for _ in range(3):
            k.step()
        sync(device)
        n = 20
        t0 = time.perf_counter()
        for _ in range(n):
            k.step()
        sync(device)
        ms = (time.perf_counter() - t0) / n * 1e3
        kv_read = batch * (ctx + 30) * kv_token_bytes
        print(f"   {batch:>5} {ms:>9.2f} {batch / ms * 1e3:>10.0f} {kv_read / ms / 1e6:>8.1f}", flush=True)
        if batch == profile_batch:
            profiles.append(profile_steps(k, device))
        for p in pids:
            s.kill(p)
        k.step()
    pids = [s.spawn(tid, [rng.randrange(3, 49152) for _ in range(512)], max_tokens=1, **GREEDY) for _ in range(4)]
    k.step()      # warm
    for p in pids:
        s.kill(p)
    k.step()
    pids = [s.spawn(tid, [rng.randrange(3, 49152) for _ in range(512)], max_tokens=1, **GREEDY) for _ in range(4)]
    sync(device)
    t0 = time.perf_counter()
    k.step()
    sync(device)
    ms = (time.perf_counter() - t0) * 1e3
    print(f"   prefill step of 4 x 512 tokens: {ms:.1f} ms ({2048 / ms * 1e3:.0f} tokens/s)")
    k.fsck()
    for table in profiles:
        print(f"\n   profile of 5 decode steps at batch {profile_batch}:\n{table}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("torch sees no CUDA GPU")
    correctness(args.device)
    speed(args.device, [int(b) for b in args.batches.split(",")], args.ctx)
    print("\nFAILED: " + ", ".join(FAILED) if FAILED else "\nall checks passed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
