"""`kvos sim cluster`: the router's policies on N simulated replicas (userspace/sim/cluster.py).

--replicas takes one N or a list (2,4,8,...,64: the sweep); --policy one policy or a list
(default all four). Prints one table per N (each policy's metrics and its ratios to
round_robin's), or one JSON object with --json; --plot-dir writes sim-cluster.png.
"""
from __future__ import annotations

import json

from kernel.errors import EINVAL, KvosError
from userspace.cluster import POLICIES

METRICS = ("output_tok_s", "prefix_hit_rate", "ttft_p50", "ttft_p99", "load_imbalance")
QUICK = dict(sessions=6)


def int_list(text: str, what: str) -> list:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise KvosError(EINVAL, f"{what} must be integers separated by commas, got {text!r}") from None
    if not values or any(v < 1 or v > 1024 for v in values):
        raise KvosError(EINVAL, f"{what} must be integers in [1, 1024], got {text!r}")
    return values


def policies(text: str | None) -> list:
    names = list(POLICIES) if not text else [p.strip() for p in text.split(",") if p.strip()]
    for name in names:
        if name not in POLICIES:
            raise KvosError(EINVAL, f"policy must be one of {', '.join(POLICIES)}, got {name!r}")
    return names


def run_args(args, console_factory, finite) -> int:
    from userspace.sim.cluster import run_cluster
    sizes = int_list(args.replicas, "--replicas")
    names = policies(args.policy)
    per_replica = QUICK["sessions"] if args.quick and args.sessions is None else (args.sessions or 64)
    boot = {name: getattr(args, name) for name in ("memory", "token_budget", "max_running", "chunk")
            if getattr(args, name, None) is not None}
    thresholds = {name: getattr(args, name) for name in ("cache_threshold", "balance_abs", "balance_rel", "balance",
                                                         "balance_frac", "balance_batch")
                  if getattr(args, name, None) is not None}
    shape = {name: getattr(args, name) for name in ("system_len", "user_len", "output_len", "popularity")
             if getattr(args, name, None) is not None}
    runs = []
    for n in sizes:
        for name in names:
            runs.append(run_cluster(n, name, per_replica=per_replica, rate=args.rate, gpu=args.gpu or "a100-80g",
                                    model=args.model or "llama-2-7b", seed=args.seed, think=args.think,
                                    systems=args.systems, turns=args.turns, shape=shape,
                                    router_options=thresholds if name in ("cache_aware", "prefix_events") else None,
                                    **boot))
    result = {"experiment": "cluster", "sessions_per_replica": per_replica, "systems": args.systems,
              "think": args.think, "turns": args.turns, "rate": args.rate, "shape": shape, "boot": boot,
              "router": thresholds, "runs": runs,
              "ratios": ratios(runs)}
    if args.plot_dir:
        from pathlib import Path
        Path(args.plot_dir).mkdir(parents=True, exist_ok=True)
        result["plot"] = plot(result, Path(args.plot_dir) / "sim-cluster.png")
    if args.json:
        print(json.dumps(finite(result), indent=1))
        return 0
    console = console_factory()
    for t in tables(result):
        console.print(t)
    if "plot" in result:
        console.print(f"[dim]plot {result['plot']}[/dim]")
    return 0


def ratios(runs: list) -> list:
    """Per N and policy: output_tok_s and prefix_hit_rate over round_robin's, ttft_p99 over its."""
    base = {r["replicas"]: r for r in runs if r["policy"] == "round_robin"}
    out = []
    for r in runs:
        b = base.get(r["replicas"])
        if b is None:
            continue
        out.append({"replicas": r["replicas"], "policy": r["policy"],
                    "throughput_x": _div(r["output_tok_s"], b["output_tok_s"]),
                    "hit_rate_x": _div(r["prefix_hit_rate"], b["prefix_hit_rate"]),
                    "ttft_p99_x": _div(r["ttft_p99"], b["ttft_p99"])})
    return out


def _div(a, b):
    return a / b if b else None


def tables(result: dict) -> list:
    from userspace.sim.experiments.common import table
    x = {(r["replicas"], r["policy"]): r for r in result["ratios"]}
    out = []
    for n in sorted({r["replicas"] for r in result["runs"]}):
        runs = [r for r in result["runs"] if r["replicas"] == n]
        w = runs[0]["workload"]
        rows = []
        for r in runs:
            vs_rr = x.get((n, r["policy"]), {})
            rows.append((r["policy"], *(r[m] for m in METRICS), vs_rr.get("throughput_x"), vs_rr.get("hit_rate_x"),
                         vs_rr.get("ttft_p99_x"), r["wall_s"]))
        out.append(table(f"kvos sim cluster: {n} replicas of {runs[0]['model']} on {runs[0]['gpu']}, "
                         f"{w['sessions']} sessions ({w['turns']} turns, prompts {w['prompt_mean']:.0f} tokens "
                         f"on average, {w['systems']} system prompts)",
                         ["policy", *METRICS, "tok/s x rr", "hits x rr", "ttft p99 x rr", "wall s"], rows))
    return out


def plot(result: dict, path) -> str:
    from userspace.sim.experiments.common import figure, save
    fig, axes = figure(4, width=3.6, height=3.0)
    sizes = sorted({r["replicas"] for r in result["runs"]})
    for name in dict.fromkeys(r["policy"] for r in result["runs"]):
        runs = sorted((r for r in result["runs"] if r["policy"] == name), key=lambda r: r["replicas"])
        for ax, metric in zip(axes, ("output_tok_s", "prefix_hit_rate", "ttft_p99", "load_imbalance")):
            ax.plot([r["replicas"] for r in runs], [r[metric] for r in runs], marker="o", label=name)
    for ax, metric in zip(axes, ("output tokens/s", "prefix hit rate", "p99 TTFT (s)", "load imbalance")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("replicas")
        ax.set_title(metric, fontsize=9)
    axes[0].legend(fontsize=7)
    return save(fig, path)
