"""batching: static against continuous (iteration-level) batching on the same trace and memory.

A sweep of Poisson rates; per rate, normalized latency (latency over output tokens, as Orca and
vLLM plot it), TTFT and percentiles. Throughput at a latency target is the highest rate whose
mean normalized latency stays under it; throughput_ratio = continuous / static there.
"""
from __future__ import annotations

from userspace.sim.experiments.common import figure, pick, ratio, run, save, table
from userspace.sim.workloads import generate, length_stats

NAME = "batching"
CLAIM = "Continuous batching: Orca reports up to 36.9x (abstract; the article says 23.5x) over FasterTransformer"
KEYS = ("throughput_rps", "output_tokens_per_s", "backlog_tokens_per_s", "normalized_latency_mean", "ttft_p50",
        "ttft_p99", "latency_p50", "latency_p99", "mean_running", "peak_running", "preemptions", "steps", "wall_s")


def run_experiment(gpu="a100-80g", model="llama-2-7b", seed=0, *, preset="sharegpt", requests=1000,
                   rates=(2, 4, 8, 16, 32, 48), slo=0.1, max_running=256, targets=(0.05, 0.1, 0.2)) -> dict:
    workload = {rate: generate(preset, requests, rate=rate, seed=seed) for rate in rates}
    points = []
    for policy in ("static", "fcfs"):
        for rate in rates:
            # same memory and limits; an unbounded token budget lets a static batch prefill at once
            summary, _, _ = run(workload[rate], gpu, model, seed=seed, policy=policy, token_budget=1 << 20,
                                max_running=max_running)
            points.append({"policy": "static" if policy == "static" else "continuous", "rate": rate,
                           **pick(summary, *KEYS)})
    top = max(rates)
    by_target = []
    for target in sorted(set(targets) | {slo}):
        s = _max_rate([p for p in points if p["policy"] == "static"], target)
        c = _max_rate([p for p in points if p["policy"] == "continuous"], target)
        by_target.append({"target": target, "max_rate_static": s, "max_rate_continuous": c,
                          "ratio": c / s if s else float("inf"),
                          "bounds": [name for name, r in (("static", s), ("continuous", c)) if r >= top]})
    static, cont = next((t["max_rate_static"], t["max_rate_continuous"]) for t in by_target if t["target"] == slo)
    at_top = {p["policy"]: p["backlog_tokens_per_s"] for p in points if p["rate"] == top}
    return {
        "experiment": NAME, "gpu": gpu, "model": model, "seed": seed, "preset": preset,
        "workload": length_stats(workload[rates[0]]), "rates": list(rates), "slo_normalized_latency": slo,
        "max_running": max_running, "points": points,
        "max_rate_static": static, "max_rate_continuous": cont, "by_target": by_target,
        "throughput_ratio": cont / static if static else float("inf"),
        "capacity_static": at_top["static"], "capacity_continuous": at_top["continuous"],
        "capacity_ratio": ratio(at_top["continuous"], at_top["static"]),
        "rates_are_bounds": [name for name, r in (("static", static), ("continuous", cont)) if r >= top],
    }


def _max_rate(points: list, slo: float) -> float:
    """Highest rate with normalized latency <= slo, interpolated on the sweep."""
    points = sorted(points, key=lambda p: p["rate"])
    prev = None
    for p in points:
        lat = p["normalized_latency_mean"]
        if lat > slo:
            if prev is None:
                return 0.0
            r0, l0 = prev["rate"], prev["normalized_latency_mean"]
            return r0 + (p["rate"] - r0) * (slo - l0) / (lat - l0)
        prev = p
    return points[-1]["rate"]


def tables(result: dict) -> list:
    rows = [(p["policy"], p["rate"], p["throughput_rps"], p["output_tokens_per_s"], p["backlog_tokens_per_s"],
             p["normalized_latency_mean"], p["ttft_p50"], p["ttft_p99"], p["latency_p99"], p["mean_running"])
            for p in result["points"]]
    sweep = table(f"batching: static vs continuous, {result['model']} on {result['gpu']}, {result['preset']} "
                  f"({result['workload']['requests']} requests per rate)",
                  ["policy", "rate req/s", "done req/s", "out tok/s", "tok/s, backlog", "norm. lat s/tok",
                   "TTFT p50", "TTFT p99", "latency p99", "mean batch"], rows,
                  caption="done req/s and out tok/s: over the run's makespan; tok/s, backlog: over the steps taken "
                          "while requests waited (the service rate under load; '-' when they seldom waited)")
    head = table("batching: throughput at equal latency (the highest rate whose mean normalized latency is under "
                 "the target)", ["latency target s/token", "static req/s", "continuous req/s", "ratio"],
                 [(t["target"], _bound(t, "static"), _bound(t, "continuous"), _ratio(t))
                  for t in result["by_target"]],
                 caption=f"'>=': the top of the sweep; the ratio is then a lower bound. throughput_ratio = the row at "
                         f"{result['slo_normalized_latency']}. Capacity (output tokens/s while requests wait, at "
                         f"{max(result['rates'])} req/s): continuous / static = {_x(result['capacity_ratio'])}")
    return [sweep, head]


def _ratio(row: dict) -> str:
    if len(row["bounds"]) == 2:
        return "- (both meet it at every rate)"
    if row["ratio"] == float("inf"):
        return "inf (static meets it at no rate)"
    return (">= " if row["bounds"] else "") + f"{row['ratio']:.1f}x"


def _bound(row: dict, policy: str) -> str:
    if not row["max_rate_" + policy]:
        return "none"
    value = f"{row['max_rate_' + policy]:.1f}"
    return (">= " + value) if policy in row["bounds"] else value


def plot(result: dict, path) -> str:
    fig, (ax, bx) = figure(2)
    for policy, style in (("static", "o--"), ("continuous", "s-")):
        pts = [p for p in result["points"] if p["policy"] == policy]
        ax.plot([p["rate"] for p in pts], [p["normalized_latency_mean"] for p in pts], style, label=policy)
        bx.plot([p["rate"] for p in pts], [p["output_tokens_per_s"] for p in pts], style, label=policy)
    ax.axhline(result["slo_normalized_latency"], color="grey", lw=0.8, ls=":", label="latency target")
    ax.set_yscale("log")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("normalized latency (s/token)")
    bound = ">= " if "continuous" in result["rates_are_bounds"] else ""
    ax.set_title(f"throughput ratio at the target: {bound}{result['throughput_ratio']:.1f}x")
    ax.legend()
    bx.set_xlabel("request rate (req/s)")
    bx.set_ylabel("output tokens/s")
    bx.set_title(f"{result['model']}, {result['gpu']}, {result['preset']}")
    bx.legend()
    return save(fig, path)


QUICK = {"requests": 80, "rates": (1, 4, 16), "max_running": 16}


def headline(result: dict) -> list:
    return [("continuous / static throughput at equal latency",
             "Orca: 36.9x vs FasterTransformer (article: 23.5x)",
             f"{result['throughput_ratio']:.1f}x{' (lower bound)' if result['rates_are_bounds'] else ''} at "
             f"{result['slo_normalized_latency']} s/token ({result['max_rate_continuous']:.1f} vs "
             f"{result['max_rate_static']:.1f} req/s); " + ", ".join(
                 f"{_ratio(t)} at {t['target']}" for t in result["by_target"]
                 if t["target"] != result["slo_normalized_latency"])),
            ("continuous / static capacity (tokens/s under backlog)", "-",
             f"{_x(result['capacity_ratio'])}: {_n(result['capacity_continuous'])} vs "
             f"{_n(result['capacity_static'])} tokens/s at {max(result['rates'])} req/s")]


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _n(value) -> str:
    return "-" if value is None else f"{value:,.0f}"
