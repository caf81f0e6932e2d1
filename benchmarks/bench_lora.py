"""What a LoRA adapter costs a decode step (userspace/programs/lora.py), against its base in the same run.

    python benchmarks/bench_lora.py [--model smollm2-135m] [--rank 8] [--batches 1,8] [--rounds 3] [--tokens 64]

Makes a PEFT adapter over all seven projections of the model (random, rank --rank; or takes
--adapter FOLDER) and, for each batch size, boots kernels in interleaved rounds for three systems:
`base` (the model alone: its step is one C call), `adapter` (every process on one adapter
tenant: the same C call with the low-rank deltas after its GEMMs), `2 adapters` (half the
processes on each of two adapters of the same base: one batch, base.mixed, each adapter's deltas on
its own rows). KVOS_LAYER_LOOP=python runs every system's layers in the Python loop instead.
Greedy, ignore_eos, the same chat prompt; the wall time from spawn to the last exit.
Prints medians of tokens a second and the ratio to `base` of the same rounds.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kernel  # noqa: E402
from userspace.programs.lora import TARGETS  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short essay on why operating systems use virtual memory."}]


def make_adapter(model: str, rank: int, folder: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from userspace.programs import fetch
    path = fetch.model_file(model)[0]
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    for seed, out in enumerate((folder / "a", folder / "b")):
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules=list(TARGETS))
        peft_model = get_peft_model(hf, config)
        peft_model.save_pretrained(str(out))
        hf = peft_model.unload()


def run(specs: list, batch: int, tokens: int, threads: int) -> float:
    """Tokens a second of `batch` processes spread over the tenants of `specs`."""
    kern = kernel.boot(memory="256MiB", threads=threads)
    sys_ = kern.syscalls()
    tids = [sys_.spawn_tenant(spec) for spec in specs]
    prompt = sys_.tokenize(tids[0], PROMPT)
    started = time.perf_counter()
    pids = [sys_.spawn(tids[i % len(tids)], prompt, max_tokens=tokens, temperature=0, ignore_eos=True)
            for i in range(batch)]
    done = sum(len(sys_.wait(pid).tokens) for pid in pids)
    return done / (time.perf_counter() - started)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapter", default=None, help="a folder holding two PEFT adapters, a/ and b/ (default: made)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.adapter) if args.adapter else Path(tmp)
        if not args.adapter:
            make_adapter(args.model, args.rank, folder)
        systems = {"base": [args.model], "adapter": [f"{args.model}+lora:{folder / 'a'}"],
                   "2 adapters": [f"{args.model}+lora:{folder / 'a'}", f"{args.model}+lora:{folder / 'b'}"]}
        run(systems["2 adapters"], 1, 4, args.threads)          # loads (and converts) everything once
        print(f"{args.model}, rank {args.rank} on all seven projections, {args.tokens} tokens a process, "
              f"{args.threads} threads, median of {args.rounds} rounds")
        print(f"{'batch':>5}  {'system':<11} {'tok/s':>8}  {'/ base':>6}")
        for batch in [int(b) for b in args.batches.split(",")]:
            times = {name: [] for name in systems}
            for r in range(args.rounds):
                names = list(systems)
                for name in names[r % len(names):] + names[:r % len(names)]:
                    times[name].append(run(systems[name], batch, args.tokens, args.threads))
            base = statistics.median(times["base"])
            for name, values in times.items():
                rate = statistics.median(values)
                print(f"{batch:>5}  {name:<11} {rate:>8.1f}  {rate / base:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
