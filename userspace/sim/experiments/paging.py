"""paging: pre-allocation (reserve max_tokens at admission) against paged on-demand allocation.

One burst of requests announcing a 2048-token budget and ending at their own length. Reserve the
budget (vLLM's "Orca Max"), the next power of two ("Pow2"), the exact output ("Oracle"), or page
on demand. KV utilisation: meminfo's tokens stored over mapped capacity, over device time.
"""
from __future__ import annotations

from dataclasses import replace

from userspace.sim.experiments.common import figure, pick, ratio, run, save, table
from userspace.sim.workloads import generate, length_stats, with_budget

NAME = "paging"
CLAIM = "Pre-allocation uses 20-40% of KV memory; paging (vLLM) above 96%"
KEYS = ("kv_utilization", "kv_occupancy", "mean_running", "peak_running", "backlog_tokens_per_s",
        "output_tokens_per_s", "duration_s", "preemptions", "wall_s")
VARIANTS = (("prealloc", "prealloc: reserve budget (Orca Max)"),
            ("prealloc-pow2", "prealloc: next power of two (Pow2)"),
            ("prealloc-oracle", "prealloc: exact output (Oracle)"),
            ("paged", "paged on demand (vLLM)"))


def run_experiment(gpu="a100-80g", model="llama-2-7b", seed=0, *, preset="sharegpt", requests=800,
                   budget=2048, max_running=256, memory=None) -> dict:
    """memory: KV bytes (None: what the GPU leaves after the weights)."""
    base = generate(preset, requests, arrival="burst", seed=seed)
    workloads = {
        "prealloc": with_budget(base, budget),
        "prealloc-pow2": [replace(r, max_tokens=1 << (r.output_len - 1).bit_length()) for r in base],
        "prealloc-oracle": base,
        "paged": with_budget(base, budget),
    }
    variants = {}
    for name, _ in VARIANTS:
        alloc = "paged" if name == "paged" else "prealloc"
        summary, _, _ = run(workloads[name], gpu, model, seed=seed, alloc=alloc, max_running=max_running,
                            token_budget=4096, memory=memory)
        variants[name] = pick(summary, *KEYS)
    pre, paged = variants["prealloc"], variants["paged"]
    return {
        "experiment": NAME, "gpu": gpu, "model": model, "seed": seed, "preset": preset, "budget": budget,
        "workload": length_stats(base), "max_running": max_running, "variants": variants,
        "utilization_prealloc": pre["kv_utilization"], "utilization_pow2": variants["prealloc-pow2"]["kv_utilization"],
        "utilization_oracle": variants["prealloc-oracle"]["kv_utilization"],
        "utilization_paged": paged["kv_utilization"],
        "concurrent_prealloc": pre["mean_running"], "concurrent_paged": paged["mean_running"],
        "throughput_ratio": ratio(paged["backlog_tokens_per_s"], pre["backlog_tokens_per_s"]),
        "offline_throughput_ratio": ratio(paged["output_tokens_per_s"], pre["output_tokens_per_s"]),
    }


def tables(result: dict) -> list:
    rows = [(label, result["variants"][name]["kv_utilization"], result["variants"][name]["kv_occupancy"],
             result["variants"][name]["mean_running"], result["variants"][name]["peak_running"],
             result["variants"][name]["backlog_tokens_per_s"], result["variants"][name]["output_tokens_per_s"],
             result["variants"][name]["duration_s"])
            for name, label in VARIANTS]
    return [table(f"paging: {result['workload']['requests']} {result['preset']} requests at once, budget "
                  f"{result['budget']} tokens, {result['model']} on {result['gpu']}",
                  ["allocation", "KV utilisation", "pool occupancy", "mean seqs", "peak seqs",
                   "tok/s under backlog", "tok/s (N / makespan)", "makespan s"], rows,
                  caption=f"throughput paged / prealloc: {_x(result['throughput_ratio'])} under backlog, "
                          f"{_x(result['offline_throughput_ratio'])} offline; utilisation = tokens stored / capacity "
                          f"of mapped frames; occupancy = tokens stored / whole pool")]


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def plot(result: dict, path) -> str:
    fig, (ax, bx) = figure(2)
    labels = [name.replace("prealloc-", "") for name, _ in VARIANTS]
    util = [100 * result["variants"][name]["kv_utilization"] for name, _ in VARIANTS]
    seqs = [result["variants"][name]["mean_running"] for name, _ in VARIANTS]
    ax.bar(labels, util, color=["#c44", "#d84", "#ca4", "#4a4"])
    ax.axhspan(20, 40, color="#c44", alpha=0.12, label="article: 20-40%")
    ax.axhline(96, color="#4a4", ls=":", label="article: >96%")
    ax.set_ylabel("KV utilisation (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower right", fontsize=8)
    bx.bar(labels, seqs, color=["#c44", "#d84", "#ca4", "#4a4"])
    bx.set_ylabel("mean concurrent sequences")
    bx.set_title(f"{result['model']}, {result['gpu']}")
    return save(fig, path)


QUICK = {"requests": 60, "memory": "6GiB"}


def headline(result: dict) -> list:
    return [("KV utilisation, pre-allocation", "20-40% (vLLM: 20.4-38.2%)",
             f"{100 * result['utilization_prealloc']:.1f}% (Pow2 {100 * result['utilization_pow2']:.0f}%, "
             f"Oracle {100 * result['utilization_oracle']:.0f}%)"),
            ("KV utilisation, paged", "> 96%", f"{100 * result['utilization_paged']:.1f}%"),
            ("throughput, paged / pre-allocation", "vLLM: 2-4x vs Orca",
             f"{_x(result['throughput_ratio'])} under backlog, {_x(result['offline_throughput_ratio'])} offline "
             f"({result['concurrent_paged']:.0f} vs {result['concurrent_prealloc']:.0f} sequences)")]
