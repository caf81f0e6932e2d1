"""sharing: parallel sampling and beam search with and without page sharing.

Shared: a request's samples and beams are forks of one process (copy-on-write). Unshared: each is
an independent process with its own token ids. Memory saved is vLLM's measure (frames the page
tables hold, once per process, against frames mapped); throughput is compared where memory binds.
"""
from __future__ import annotations

from userspace.sim.experiments.common import figure, pick, ratio, run, save, table
from userspace.sim.workloads import generate, length_stats

NAME = "sharing"
CLAIM = "Copy-on-write sharing saves memory: vLLM reports up to 55% for beam search"
KEYS = ("memory_saved", "kv_occupancy", "mean_running", "backlog_tokens_per_s", "output_tokens_per_s",
        "duration_s", "preemptions", "cached_tokens", "wall_s")


def run_experiment(gpu="a100-40g", model="llama-2-13b", seed=0, *, preset="alpaca", requests=200,
                   widths=(2, 4, 6), throughput_width=4, memory=None) -> dict:
    """Defaults follow vLLM's sharing evaluation: a 13B model on one A100-40GB, the Alpaca trace."""
    savings, throughput = [], []
    for mode in ("parallel", "beam"):
        for width in sorted(set(widths) | {throughput_width}):
            fan = {"n": width} if mode == "parallel" else {"beam_width": width}
            reqs = generate(preset, requests, arrival="burst", seed=seed, **fan)
            summary, _, root = run(reqs, gpu, model, seed=seed, token_budget=4096, sample_interval=0.05,
                                   memory=memory)
            if width in widths:
                savings.append({"mode": mode, "width": width, **pick(summary, *KEYS),
                                "cow_faults": root.meminfo().cow_faults})
            if width == throughput_width:
                alone, _, _ = run(reqs, gpu, model, seed=seed, share=False, token_budget=4096,
                                  sample_interval=0.05, memory=memory)
                throughput.append({"mode": mode, "width": width, "shared": pick(summary, *KEYS),
                                   "unshared": pick(alone, *KEYS),
                                   "throughput_ratio": ratio(summary["backlog_tokens_per_s"],
                                                             alone["backlog_tokens_per_s"]),
                                   "offline_throughput_ratio": ratio(summary["output_tokens_per_s"],
                                                                     alone["output_tokens_per_s"])})
    best = lambda mode: max(s["memory_saved"] for s in savings if s["mode"] == mode)   # noqa: E731
    return {
        "experiment": NAME, "gpu": gpu, "model": model, "seed": seed, "preset": preset,
        "workload": length_stats(generate(preset, requests, arrival="burst", seed=seed)),
        "savings": savings, "throughput": throughput,
        "memory_saved_parallel": best("parallel"), "memory_saved_beam": best("beam"),
        "throughput_ratio_parallel": throughput[0]["throughput_ratio"],
        "throughput_ratio_beam": throughput[1]["throughput_ratio"],
        "offline_throughput_ratio_parallel": throughput[0]["offline_throughput_ratio"],
        "offline_throughput_ratio_beam": throughput[1]["offline_throughput_ratio"],
    }


def tables(result: dict) -> list:
    mem = table(f"sharing: memory saved by copy-on-write, {result['workload']['requests']} "
                f"{result['preset']} requests at once, {result['model']} on {result['gpu']}",
                ["mode", "width", "memory saved", "copy-on-write faults", "mean seqs"],
                [(s["mode"], s["width"], s["memory_saved"], s["cow_faults"], s["mean_running"])
                 for s in result["savings"]])
    rows = []
    for t in result["throughput"]:
        for key in ("shared", "unshared"):
            r = t[key]
            rows.append((f"{t['mode']} x{t['width']}, {key}", r["memory_saved"], r["mean_running"],
                         r["backlog_tokens_per_s"], r["output_tokens_per_s"], r["duration_s"], r["preemptions"]))
    thr = table("sharing: throughput with and without sharing (memory binds)",
                ["run", "memory saved", "mean seqs", "tok/s under backlog", "tok/s (N / makespan)", "makespan s",
                 "preemptions"], rows, caption="shared / unshared: " + _ratios(result))
    return [mem, thr]


def plot(result: dict, path) -> str:
    fig, (ax, bx) = figure(2)
    for mode, style in (("parallel", "o-"), ("beam", "s-")):
        pts = [s for s in result["savings"] if s["mode"] == mode]
        ax.plot([s["width"] for s in pts], [100 * s["memory_saved"] for s in pts], style,
                label=f"{mode} sampling" if mode == "parallel" else "beam search")
    ax.axhline(55, color="grey", ls=":", label="vLLM: up to 55% (beam)")
    ax.set_xlabel("samples / beam width")
    ax.set_ylabel("KV memory saved (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    labels = [f"{t['mode']} x{t['width']}" for t in result["throughput"]]
    shared = [t["shared"]["output_tokens_per_s"] for t in result["throughput"]]
    unshared = [t["unshared"]["output_tokens_per_s"] for t in result["throughput"]]
    x = range(len(labels))
    bx.bar([i - 0.2 for i in x], unshared, 0.4, label="no sharing", color="#c44")
    bx.bar([i + 0.2 for i in x], shared, 0.4, label="fork + copy-on-write", color="#4a4")
    bx.set_xticks(list(x), labels)
    bx.set_ylabel("output tokens/s (N / makespan)")
    bx.set_title(f"{result['model']}, {result['gpu']}")
    bx.legend(fontsize=8)
    return save(fig, path)


QUICK = {"requests": 40, "widths": (2, 4), "memory": "3GiB"}


def headline(result: dict) -> list:
    beam = [s for s in result["savings"] if s["mode"] == "beam"]
    par = [s for s in result["savings"] if s["mode"] == "parallel"]
    span = lambda rows: "-".join(f"{100 * s['memory_saved']:.0f}" for s in (rows[0], rows[-1]))   # noqa: E731
    return [("memory saved, beam search", "up to 55% (vLLM: 37.6-55.2%)",
             f"{span(beam)}% for width {beam[0]['width']}-{beam[-1]['width']}"),
            ("memory saved, parallel sampling", "vLLM: 6.1-9.8%",
             f"{span(par)}% for n = {par[0]['width']}-{par[-1]['width']}"),
            ("throughput, shared / unshared", "vLLM: gains grow with sharing", _ratios(result))]


def _ratios(result: dict) -> str:
    x = lambda v: "-" if v is None else f"{v:.2f}x"          # noqa: E731
    return (f"parallel {x(result['throughput_ratio_parallel'])} under backlog, "
            f"{x(result['offline_throughput_ratio_parallel'])} offline; beam {x(result['throughput_ratio_beam'])} "
            f"under backlog, {x(result['offline_throughput_ratio_beam'])} offline")
