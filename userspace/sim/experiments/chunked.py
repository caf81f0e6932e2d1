"""chunked: chunked prefill (Sarathi-Serve) against whole-prompt prefill.

Processes decode long outputs while long prompts arrive. Whole prompts run in one step, stalling
every decode in it; chunking caps a step at `chunk` tokens (token budget = chunk, decodes first).
Measured: the longest gap between tokens, the p99 gap, and the prompts' TTFT.
"""
from __future__ import annotations

import numpy as np

from userspace.sim.experiments.common import figure, pick, run, save, table
from userspace.sim.workloads import Request

NAME = "chunked"
CLAIM = "Chunked prefill bounds the decode stall; TTFT of the chunked prompt rises slightly"
KEYS = ("tbt_max", "tbt_p99", "tbt_p50", "output_tokens_per_s", "duration_s", "steps", "wall_s")


def workload(seed: int, decoders: int, decode_len: int, prompts: int, prompt_range: tuple, rate: float) -> list:
    rng = np.random.default_rng(seed)
    reqs = [Request(0.0, 64, decode_len) for _ in range(decoders)]
    arrivals = 0.5 + np.cumsum(rng.exponential(1.0 / rate, prompts))
    lengths = rng.integers(prompt_range[0], prompt_range[1] + 1, prompts)
    return reqs + [Request(float(t), int(n), 16) for t, n in zip(arrivals, lengths)]


def run_experiment(gpu="a100-80g", model="llama-2-7b", seed=0, *, decoders=64, decode_len=1200, prompts=24,
                   prompt_range=(1500, 3000), rate=2.0, chunks=(None, 2048, 1024, 512, 256, 128),
                   headline_chunk=512) -> dict:
    reqs = workload(seed, decoders, decode_len, prompts, prompt_range, rate)
    points = []
    for chunk in chunks:
        budget = 4096 if chunk is None else chunk        # whole prompts: the budget holds the longest one
        summary, result, _ = run(reqs, gpu, model, seed=seed, record_gaps=True, token_budget=budget,
                                 chunk=budget, max_running=256)
        long = [r for r in result.requests if r.request.prompt_len >= prompt_range[0]]
        ttft = np.array([r.ttft for r in long])
        points.append({"chunk": chunk, **pick(summary, *KEYS), "prompt_ttft_mean": float(ttft.mean()),
                       "prompt_ttft_p99": float(np.percentile(ttft, 99))})
    whole = next(p for p in points if p["chunk"] is None)
    chunked = next((p for p in points if p["chunk"] == headline_chunk), points[-1])
    return {
        "experiment": NAME, "gpu": gpu, "model": model, "seed": seed, "decoders": decoders, "decode_len": decode_len,
        "prompts": prompts, "prompt_range": list(prompt_range), "rate": rate, "points": points,
        "chunk": chunked["chunk"],
        "max_stall_whole": whole["tbt_max"], "max_stall_chunked": chunked["tbt_max"],
        "stall_reduction": whole["tbt_max"] / chunked["tbt_max"],
        "tbt_p99_whole": whole["tbt_p99"], "tbt_p99_chunked": chunked["tbt_p99"],
        "ttft_whole": whole["prompt_ttft_mean"], "ttft_chunked": chunked["prompt_ttft_mean"],
    }


def tables(result: dict) -> list:
    rows = [("whole" if p["chunk"] is None else p["chunk"], 1e3 * p["tbt_max"], 1e3 * p["tbt_p99"],
             1e3 * p["tbt_p50"], p["prompt_ttft_mean"], p["prompt_ttft_p99"], p["output_tokens_per_s"])
            for p in result["points"]]
    return [table(f"chunked prefill: {result['decoders']} decodes, {result['prompts']} prompts of "
                  f"{result['prompt_range'][0]}-{result['prompt_range'][1]} tokens at {result['rate']} req/s, "
                  f"{result['model']} on {result['gpu']}",
                  ["chunk (tokens/step)", "longest stall ms", "TBT p99 ms", "TBT p50 ms", "prompt TTFT s",
                   "prompt TTFT p99 s", "out tok/s"], rows)]


def plot(result: dict, path) -> str:
    fig, (ax, bx) = figure(2)
    pts = result["points"]
    labels = ["whole" if p["chunk"] is None else str(p["chunk"]) for p in pts]
    ax.plot(labels, [1e3 * p["tbt_max"] for p in pts], "o-", label="longest stall")
    ax.plot(labels, [1e3 * p["tbt_p99"] for p in pts], "s-", label="TBT p99")
    ax.set_xlabel("prefill chunk (tokens per step)")
    ax.set_ylabel("ms")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    bx.plot(labels, [p["prompt_ttft_mean"] for p in pts], "o-", color="#c84")
    bx.set_xlabel("prefill chunk (tokens per step)")
    bx.set_ylabel("mean TTFT of the long prompts (s)")
    bx.set_title(f"{result['model']}, {result['gpu']}")
    return save(fig, path)


QUICK = {"decoders": 8, "decode_len": 200, "prompts": 4, "chunks": (None, 512, 128)}


def headline(result: dict) -> list:
    return [("longest decode stall, whole prompt vs chunked", "bounded by chunking (Sarathi-Serve)",
             f"{1e3 * result['max_stall_whole']:.0f} ms -> {1e3 * result['max_stall_chunked']:.0f} ms "
             f"(chunk {result['chunk']})"),
            ("p99 time between tokens", "drops substantially",
             f"{1e3 * result['tbt_p99_whole']:.0f} ms -> {1e3 * result['tbt_p99_chunked']:.0f} ms"),
            ("TTFT of the long prompts", "rises slightly",
             f"{result['ttft_whole']:.2f} s -> {result['ttft_chunked']:.2f} s")]
