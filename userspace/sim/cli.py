"""`kvos sim EXPERIMENT`: run the article's experiments (or one workload) on the simulated device.

The shell wires it with add_parser(subparsers), which sets args.func (returns an
exit status); `python -m userspace.sim` calls main(argv). Tables go to stdout,
or one JSON object with --json; with --plot-dir DIR each experiment also writes a PNG plot there.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from kernel.errors import KvosError

RUN_KEYS = ("requests", "completed", "duration_s", "throughput_rps", "output_tokens_per_s", "backlog_tokens_per_s",
            "ttft_p50", "ttft_p99", "latency_p50", "latency_p99", "normalized_latency_mean", "tpot", "tpot_p99",
            "tbt_p50", "tbt_p99", "tbt_max",
            "kv_utilization", "mean_running", "peak_running", "preemptions", "swap_outs", "reclaims",
            "padding_tokens", "memory_saved", "steps", "host_bound_steps", "host_wait_share", "wall_s")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("sim", help="reproduce the article's claims on a simulated GPU",
                                   description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.set_defaults(func=run_args)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from userspace.sim.experiments import NAMES
    names = [*NAMES, "all", "run", "cluster"]
    parser.add_argument("experiment", choices=names, metavar="EXPERIMENT",
                        help=f"one of {', '.join(names)} ('run': one workload, see --preset/--trace; "
                             f"'cluster': replicas behind the router, see --replicas)")
    parser.add_argument("--gpu", help="GPU preset, with overrides: 'a100', 'h100', 'h200', 'a100-40g', "
                                      "'a100,hbm_bandwidth=1.6e12,step_overhead=0' (default: per experiment)")
    parser.add_argument("--model", help="model preset or a config.json path (default: per experiment)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds; what the tests run)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--plot-dir", default=None, metavar="DIR",
                        help="write each experiment's PNG plot there (sim-EXPERIMENT.png); none without it")
    run = parser.add_argument_group("run (one workload)")
    run.add_argument("--preset", default="sharegpt", help="workload preset: sharegpt, sharegpt-vllm, alpaca, "
                                                         "azure-conv")
    run.add_argument("--tp", type=int, default=None, metavar="N",
                     help="tensor-parallel degree: N GPUs of --gpu share each layer (the preset's tp=N)")
    run.add_argument("--trace", help="JSONL trace (arrival, prompt_len, output_len, prefix_id, prefix_len, n, "
                                     "beam_width, max_tokens per line) instead of a preset")
    run.add_argument("--requests", type=int, default=500)
    run.add_argument("--rate", type=float, default=None,
                     help="Poisson rate, req/s (cluster: sessions/s) (default: all at once)")
    run.add_argument("--n", type=int, default=1, help="parallel samples per request")
    run.add_argument("--beam-width", type=int, default=0)
    run.add_argument("--max-tokens", type=int, default=None, help="budget announced at spawn (prealloc reserves it)")
    run.add_argument("--no-share", action="store_true", help="samples and beams as independent processes")
    cluster = parser.add_argument_group("cluster (replicas behind the router, the sessions workload)")
    cluster.add_argument("--replicas", default="8", help="N, or a list: 2,4,8,16,32,64 (default 8)")
    cluster.add_argument("--sessions", type=int, default=None, help="sessions per replica (default 64; --quick 6)")
    cluster.add_argument("--systems", type=int, default=8, help="distinct system prompts (default 8)")
    cluster.add_argument("--think", type=float, default=1.0, help="mean seconds between a reply and the next turn")
    cluster.add_argument("--turns", type=float, default=4.0, help="mean turns per session (1: single requests)")
    for option, what in (("system-len", "every system prompt"), ("user-len", "every user message"),
                         ("output-len", "every reply")):
        cluster.add_argument(f"--{option}", type=int, default=None, help=f"tokens of {what} (default: the trace)")
    cluster.add_argument("--popularity", choices=("zipf", "uniform"), default=None,
                         help="how sessions pick a system prompt: 1/rank (default) or evenly")
    for option, default in (("cache-threshold", "0.3"), ("balance-abs", "64"), ("balance-rel", "1.5"),
                            ("balance-frac", "0.25")):
        cluster.add_argument(f"--{option}", type=float, default=None,
                             help=f"cache_aware and prefix_events: {option.replace('-', '_')} (default {default})")
    cluster.add_argument("--balance-batch", type=int, default=None, metavar="N",
                         help="the batch margin's floor: the running batch a replica can hold (default: only "
                              "the largest one seen)")
    cluster.add_argument("--balance", choices=("batch", "absolute"), default=None,
                         help="the imbalance margin: balance_frac of the running batch (default) or "
                              "balance_abs requests (SGLang's rule)")
    for option, kind in (("policy", str), ("alloc", str), ("batch", str), ("chunk", int), ("token-budget", int),
                         ("max-running", int), ("memory", str), ("swap", str), ("page-size", int),
                         ("speculate", int), ("speculate-batch", int)):
        run.add_argument(f"--{option}", type=kind, default=None,
                         help="cluster: the router's policy, or a list (default all four); run: kernel.boot(policy=...)"
                         if option == "policy" else f"kernel.boot({option.replace('-', '_')}=...)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvos sim", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_args(parser.parse_args(argv))


def run_args(args) -> int:
    try:
        if args.experiment == "run":
            return _run_workload(args)
        if args.experiment == "cluster":
            from userspace.sim import clustercli
            return clustercli.run_args(args, _console, _finite)
        return _run_experiments(args)
    except KvosError as err:                   # one line, and the errno's status, as every kvos command
        print(f"kvos sim: {err}", file=sys.stderr)
        return err.code or 1


# -- experiments -------------------------------------------------------------------------------
def _run_experiments(args) -> int:
    from userspace.sim.experiments import EXPERIMENTS
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    started = time.perf_counter()
    results, headline = {}, []
    console = None if args.json else _console()
    for name in names:
        module = EXPERIMENTS[name]
        kwargs = {"seed": args.seed, **(module.QUICK if args.quick else {})}
        if args.gpu:
            kwargs["gpu"] = args.gpu
        if args.model:
            kwargs["model"] = args.model
        t = time.perf_counter()
        result = module.run_experiment(**kwargs)
        result["wall_s"] = time.perf_counter() - t
        if args.plot_dir:
            Path(args.plot_dir).mkdir(parents=True, exist_ok=True)
            result["plot"] = module.plot(result, Path(args.plot_dir) / f"sim-{name}.png")
        results[name] = result
        rows = [(name, *row) for row in module.headline(result)]
        headline += rows
        if console is not None:
            for t_ in module.tables(result):
                console.print(t_)
            console.print(f"[dim]{name}: {result['wall_s']:.1f} s"
                          + (f", plot {result['plot']}" if "plot" in result else "") + "[/dim]\n")
    wall = time.perf_counter() - started
    if args.json:
        out = results[names[0]] if len(names) == 1 else {
            "experiment": "all", "wall_s": wall, "results": results,
            "headline": [dict(zip(("experiment", "claim", "article", "kvos"), row)) for row in headline]}
        print(json.dumps(_finite(out), indent=1))
    else:
        from userspace.sim.experiments.common import table
        console.print(table(f"kvos sim {args.experiment}: the article's claims against kvos ({wall:.0f} s)",
                            ["experiment", "claim", "article", "kvos measured"], headline, text=True))
    return 0


def _console():
    from rich.console import Console
    return Console(width=160)


def _finite(value):
    """JSON has no infinity: inf and nan become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# -- one workload -------------------------------------------------------------------------------
def _run_workload(args) -> int:
    from userspace.sim.experiments.common import pick, run, table
    from userspace.sim.workloads import generate, length_stats, load_trace
    if args.trace:
        requests = load_trace(args.trace)
    else:
        requests = generate(args.preset, args.requests, rate=args.rate, seed=args.seed,
                            arrival="poisson" if args.rate else "burst", n=args.n, beam_width=args.beam_width,
                            max_tokens=args.max_tokens)
    options = {name: getattr(args, name) for name in ("policy", "alloc", "batch", "chunk", "token_budget",
                                                       "max_running", "memory", "swap", "page_size", "speculate",
                                                       "speculate_batch")
               if getattr(args, name) is not None}
    gpu, model = args.gpu or "a100-80g", args.model or "llama-2-7b"
    if args.tp is not None:
        gpu = f"{gpu},tp={args.tp}"
    summary, _, _ = run(requests, gpu, model, seed=args.seed, share=not args.no_share, record_gaps=True, **options)
    out = {"gpu": gpu, "model": model, "boot": options, "workload": length_stats(requests),
           "trace": args.trace, **pick(summary, *RUN_KEYS)}
    if args.json:
        print(json.dumps(_finite(out), indent=1))
    else:
        _console().print(table(f"kvos sim run: {model} on {gpu}, {len(requests)} requests",
                               ["metric", "value"], [(k, v) for k, v in out.items() if not isinstance(v, dict)]))
    return 0
