"""`kvos bench` (and `python -m userspace.bench`): kvos against the baselines, same run, same requests.

add_parser(subparsers) adds the `bench` subcommand to the kvos shell; main(argv) runs it
alone. A run: build the workload's token ids once, measure the machine's ceilings, run
each system in its own process one after the other, then print the table (or --json).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import shlex
import sys
from pathlib import Path

from userspace.bench.systems import DEFAULT_SYSTEMS, KVOS_SYSTEMS, SYSTEMS

DESCRIPTION = (
    "Run one workload on kvos and on the baselines (transformers generate with static batches, transformers' "
    "continuous batching, llama.cpp when llama-cpp-python is installed), each in its own process with the "
    "same threads, the same model file and the same token ids, greedy, EOS ignored so every system generates "
    "the prescribed lengths. Reports useful and total tok/s, TTFT and TBT p50/p99, peak KV memory, peak RSS and "
    "wall time per system, kvos's ratio to each, kvos against the fp32 compute ceiling measured in the same run, "
    "and each kvos row against the roofline of the steps it ran.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", choices=("mixed", "shared", "sampling", "single"), default="mixed",
                   help="mixed: 64 chat requests (default); shared: the same behind one 200-token system turn; "
                        "sampling: 16 prompts, n=4 each; single: 8 requests of 128 tokens, one at a time")
    p.add_argument("--trace", metavar="FILE", help="JSONL requests: prompt_len or prompt_tokens, output_len, "
                                                   "optional arrival (seconds); replaces --workload")
    p.add_argument("--quick", action="store_true", help="a quarter of the requests (tests, CI)")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"comma-separated, from {', '.join(SYSTEMS)} (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table goes to stderr)")
    p.add_argument("--output", metavar="FILE", help="also write the JSON object to FILE")
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="cpu (default) or cuda[:N]: kvos and the transformers baselines run there, and the ceiling "
                        "and roofline rates are the GPU's, measured in the same run; llama.cpp, kvos-gguf and "
                        "kvos-bf16kv are skipped on cuda (docs/performance.md)")
    p.add_argument("--graphs", action="store_true",
                   help="kvos rows boot with graphs=True (decode steps replayed from CUDA graphs on a GPU, "
                        "docs/kernels.md section 7)")
    p.add_argument("--threads", type=int, default=2, help="threads of every system (default 2)")
    p.add_argument("--memory", default="1GiB", help="KV memory of kvos and hf-cb (default 1GiB); llama.cpp gets "
                                                   "the same number of tokens")
    p.add_argument("--token-budget", type=int, default=512,
                   help="tokens per step of kvos and hf-cb (max_batch_tokens) (default 512)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page of kvos and hf-cb (default 16)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="kvos's tensor-parallel ranks on the cpu (gloo), each with --threads threads; the other "
                        "systems run on one process (default 1, docs/cluster-tp.md)")
    p.add_argument("--hf-batch", type=int, default=16, help="hf-static's batch size (default 16)")
    p.add_argument("--hf-attn", choices=("sdpa", "paged|eager"), default="sdpa",
                   help="hf-cb's attention implementation (default sdpa)")
    p.add_argument("--model", default="smollm2-135m", help="model name or .gguf path (default smollm2-135m)")
    p.add_argument("--timeout", type=float, default=None, help="seconds each system may take (default: no limit)")
    p.add_argument("--log-dir", metavar="DIR", help="keep each system's stderr in DIR")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each measurement, wait up to SECONDS for the rest of the machine to use under "
                        "10%% of its CPUs (default 0: start at once)")
    p.add_argument("--retry-noisy", type=int, default=0, metavar="N",
                   help="run a system again (up to N times) when other processes took over 5%% of the CPUs "
                        "while it ran (default 0)")
    p.add_argument("--tokens", action="store_true", help="include every generated token id in the JSON")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="kvos against transformers and llama.cpp on the same requests",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m userspace.bench", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from kernel.errors import KvosError
    try:
        return run(args)
    except KvosError as err:
        print(f"kvos bench: {err.errno}: {err.reason}", file=sys.stderr)
        return err.code or 1


def run(args) -> int:
    from rich.console import Console

    from kernel.errors import EINVAL, KvosError
    from userspace.bench import metrics, report

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise KvosError(EINVAL, f"unknown system(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(SYSTEMS)}")
    if args.threads < 1:
        raise KvosError(EINVAL, f"--threads must be at least 1, got {args.threads}")
    check_device(args.device, args.tp)       # before anything loads: no GPU is one line, not a table of failures
    err = Console(stderr=True)
    workload, num_params, gguf = _prepare(args)
    options = {"model": args.model, "gguf": str(gguf) if gguf else None, "memory": args.memory,
               "threads": args.threads, "token_budget": args.token_budget, "page_size": args.page_size,
               "hf_batch": args.hf_batch, "hf_attn": args.hf_attn, "return_tokens": args.tokens,
               "device": args.device,
               "kvos_boot": {"token_budget": args.token_budget, "page_size": args.page_size, "tp": args.tp,
                             **({"graphs": True} if args.graphs else {})}}
    log_dir = Path(args.log_dir) if args.log_dir else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)

    raws, loads, quiet, ceiling = _measure(args, systems, workload, options, gguf, log_dir, err)
    rows = [metrics.summarize(workload, raw) for raw in raws]
    for raw, row in zip(raws, rows):
        if not row.get("ok") and raw.get("stderr_tail") and not raw.get("skipped"):
            err.print(f"[red]{row['system']} failed[/red]: {row['error']}")
            err.print("\n".join(raw["stderr_tail"][-15:]), markup=False, highlight=False)
        if args.tokens and row.get("ok"):
            row["tokens"] = {f"{s['request']}.{s['sample']}": s.get("tokens") for s in raw["samples"]}
    for raw, row in zip(raws, rows):
        row.update(metrics.roofline_fraction(raw, row, ceiling))
    kvos_row = next((r for r in rows if r.get("system") == "kvos"), None)
    fraction = metrics.ceiling_fraction(workload, kvos_row, ceiling.get("flops"), num_params)
    command = _command(args)
    settings = {k: options[k] for k in ("threads", "memory", "token_budget", "page_size", "hf_batch", "hf_attn")}
    settings["tp"] = args.tp
    settings["device"], settings["graphs"] = args.device, args.graphs
    settings["model"], settings["gguf"] = args.model, options["gguf"]
    result = report.build_report(workload, rows, metrics.ratios(rows), ceiling, fraction, num_params, settings,
                                 loads, command)
    result["machine"]["others_share_at_start"] = quiet
    result["roofline_fraction"] = (kvos_row or {}).get("roofline_fraction")
    for name in KVOS_SYSTEMS[1:]:          # kvos-bf16, kvos-bf16kv, kvos-gguf(-kv8): ratios and ceiling of their own
        row = next((r for r in rows if r.get("system") == name), None)
        key = name.replace("-", "_")
        result[f"ratios_{key}"] = metrics.ratios(rows, base=name)
        result[f"ceiling_fraction_{key}"] = metrics.ceiling_fraction(workload, row, ceiling.get("flops"), num_params)
        result[f"roofline_fraction_{key}"] = (row or {}).get("roofline_fraction")
    if args.output:
        Path(args.output).write_text(_dumps(result))
    if args.json:
        report.render(result, err)
        print(_dumps(result))
    else:
        report.render(result, Console())
    return 0 if all(r.get("ok") or r.get("skipped") for r in rows) else 1


def _measure(args, systems, workload, options, gguf, log_dir, console):
    """The machine's ceiling, every system in turn (waiting for quiet, retrying disturbed runs), the
    ceiling again. Returns (raw results, load averages, others' CPU share at each start, ceiling)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from userspace.bench import report, runner

    raws, loads, quiet = [], {}, {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("machine ceiling: measuring", total=None)
        if args.wait_quiet:
            progress.update(task, description="machine ceiling: waiting for a quiet machine")
            quiet["ceiling"] = runner.wait_until_quiet(args.wait_quiet)
        loads["ceiling"] = os.getloadavg()
        ceiling = runner.measure_ceiling(args.threads, args.device)
        progress.update(task, description="machine ceiling: " + (
            f"{ceiling['matmul_flops'] / 1e9:.0f} GFLOP/s" if ceiling.get("ok") else "failed"), total=1, completed=1)
        for name in systems:
            skip = _skip_reason(name, gguf, args.device)
            if skip:
                raws.append({"ok": False, "skipped": True, "system": name, "error": skip})
                continue
            for attempt in range(args.retry_noisy + 1):
                if args.wait_quiet:
                    quiet[name] = runner.wait_until_quiet(args.wait_quiet)
                loads[name] = os.getloadavg()
                raw = runner.run_system(name, workload, options, progress, args.timeout, log_dir)
                raw["attempts"] = attempt + 1
                if not raw.get("ok") or (raw.get("others_cpu_share") or 0) <= report.NOISY_OTHERS:
                    break
            raws.append(raw)
        task = progress.add_task("machine ceiling (again): measuring", total=None)
        again = runner.measure_ceiling(args.threads, args.device)
        progress.update(task, description="machine ceiling (again): " + (
            f"{again['matmul_flops'] / 1e9:.0f} GFLOP/s" if again.get("ok") else "failed"), total=1, completed=1)
    return raws, loads, quiet, _best_ceiling(ceiling, again)


def _best_ceiling(first: dict, second: dict) -> dict:
    """The machine's fp32 rate: the best of both measurements (before and after the systems) and of
    both shapes. Interference only lowers a measurement, and a higher ceiling is the harder bar."""
    runs = [c for c in (first, second) if c.get("ok")]
    if not runs:
        return {"ok": False, "error": first.get("error", "failed"), "runs": [first, second]}
    best = max(runs, key=lambda c: max(c["matmul_flops"], c["model_gemm_flops"]))
    return {**best, "flops": max(best["matmul_flops"], best["model_gemm_flops"]),
            "read_bytes_per_s": max(c["read_bytes_per_s"] for c in runs),
            "bf16_gemm_flops": max(c.get("bf16_gemm_flops", 0) for c in runs) or None, "runs": [first, second]}


def _command(args) -> str:
    """The command line that reproduces this run, as `kvos bench ...`."""
    argv = getattr(args, "argv", None)
    if argv is None:                       # through the kvos shell: sys.argv is ["kvos", "bench", ...]
        argv = sys.argv[1:]
        argv = argv[argv.index("bench") + 1:] if "bench" in argv else argv
    return " ".join(["kvos", "bench"] + [shlex.quote(a) for a in argv])


def _dumps(obj) -> str:
    import json
    return json.dumps(obj, indent=None, separators=(",", ":"))


def _has_quantized_path() -> bool:
    import inspect

    from userspace.programs.loader import load_program
    return "weights" in inspect.signature(load_program).parameters


def _prepare(args):
    """(workload, parameters per token, GGUF path or None): the program is loaded for its
    tokenizer and cost, then dropped, so the parent holds no weights while systems run."""
    from userspace.bench import workloads
    from userspace.programs import fetch
    from userspace.programs.loader import load_program

    program = load_program(args.model, "cpu")
    workload = workloads.build(args.workload, program, quick=args.quick, trace=args.trace)
    num_params = program.cost.num_params
    del program
    gc.collect()
    gguf = None
    if args.model in fetch.MODELS:
        gguf, _ = fetch.model_file(args.model)
    elif args.model.endswith(".gguf"):
        gguf = Path(args.model).expanduser().resolve()
    return workload, num_params, gguf


def check_device(device: str, tp: int = 1) -> None:
    """KvosError unless `device` is cpu, or cuda[:N] with a GPU torch can see (ENODEV without one)."""
    from kernel.errors import EINVAL, ENODEV, KvosError
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise KvosError(EINVAL, f"--device {device!r}: choose cpu, cuda or cuda:N")
    if kind == "cpu":
        return
    if tp != 1:
        raise KvosError(EINVAL, "--tp splits kvos over CPU processes (gloo); it does not combine with --device cuda")
    import torch
    if not torch.cuda.is_available():
        raise KvosError(ENODEV, f"--device {device}: torch sees no CUDA GPU on this machine")
    if index and int(index) >= torch.cuda.device_count():
        raise KvosError(ENODEV, f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


# Rows that do not run on a GPU, and why (the table shows them as skipped with this reason).
CPU_ONLY = {
    "llama.cpp": "runs on the cpu here (llama-cpp-python's CPU build); no GPU llama.cpp row",
    "kvos-gguf": "--weights gguf runs on the cpu (its int4 GEMMs are torch's cpu ones)",
    "kvos-gguf-kv8": "--weights gguf and an int8 KV cache run on the cpu (their kernels are the C ones)",
    "kvos-bf16kv": "on cuda the KV cache is in the program's dtype: the kvos-bf16 row already has a bf16 KV cache",
}


def _skip_reason(name: str, gguf, device: str = "cpu") -> str | None:
    if device != "cpu" and name in CPU_ONLY:
        return CPU_ONLY[name]
    if name in ("hf-static", "hf-cb", "llama.cpp", "kvos-gguf", "kvos-gguf-kv8") and gguf is None:
        return "needs the model as a GGUF file"
    if name in ("kvos-gguf", "kvos-gguf-kv8") and not _has_quantized_path():
        return "this build's loader has no quantized weights path (load_program(weights=...))"
    if name == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install -e '.[bench]')"
    if name in ("hf-static", "hf-cb") and importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    return None
