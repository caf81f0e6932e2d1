"""speculate: speculative decoding against the batch size (beyond the article).

A step that reads the weights once costs little more for a few extra rows, so k drafts a decoding
process computes beside its token are nearly free while the step is bound by memory, and cost
their full FLOPs once it is bound by compute. Each point runs `batch` processes decoding together,
plain and with speculate=k (speculate_batch lifted, the token budget sized to hold every draft), for
each draft acceptance a (the sim's model: each draft is drawn with probability a, independently).
Measured: output tokens per second, the time per output token, and tokens a process gains per step.
The drafter is free here (prompt lookup is; a draft model is not), and kvos's back-off after a draft
that kept nothing is in (kernel/speculate.py). docs/simulator.md has the results and a prediction.
"""
from __future__ import annotations

from userspace.sim.experiments.common import figure, pick, ratio, run, save, table
from userspace.sim.workloads import Request

NAME = "speculate"
CLAIM = "Drafts are nearly free while a decode step is memory-bound, and a loss once it is compute-bound"
KEYS = ("output_tokens_per_s", "tpot", "tbt_p50", "steps", "duration_s", "preemptions", "wall_s")


def run_experiment(gpu="h100", model="llama-3-8b", seed=0, *, batches=(1, 4, 16, 64, 128, 256),
                   acceptances=(0.6, 0.8, 0.9), k=4, prompt_len=512, output_len=512) -> dict:
    points = []
    for batch in batches:
        reqs = [Request(0.0, prompt_len, output_len) for _ in range(batch)]
        budget = max(512, batch * (k + 1))               # room for every process's token and drafts
        boot = dict(token_budget=budget, chunk=max(512, prompt_len), max_running=max(256, batch))
        plain, _, _ = run(reqs, gpu, model, seed=seed, record_gaps=True, **boot)
        points.append({"batch": batch, "acceptance": None, **pick(plain, *KEYS), "speedup": 1.0,
                       "tokens_per_step": output_len / (plain["steps"] or 1)})
        for a in acceptances:
            summary, _, root = run(reqs, f"{gpu},draft_acceptance={a}", model, seed=seed, record_gaps=True,
                                   speculate=k, speculate_batch=1 << 20, **boot)
            stats = root.schedstat()
            points.append({"batch": batch, "acceptance": a, **pick(summary, *KEYS),
                           "speedup": ratio(summary["output_tokens_per_s"], plain["output_tokens_per_s"]),
                           "tokens_per_step": output_len / (summary["steps"] or 1),
                           "draft_tokens": stats.draft_tokens, "accepted_tokens": stats.accepted_tokens,
                           "accepted_share": ratio(stats.accepted_tokens, stats.draft_tokens)})
    best = max(acceptances)
    by = {(p["batch"], p["acceptance"]): p for p in points}
    paying = [b for b in batches if by[(b, best)]["speedup"] > 1.0]
    return {"experiment": NAME, "gpu": gpu, "model": model, "seed": seed, "k": k, "prompt_len": prompt_len,
            "output_len": output_len, "batches": list(batches), "acceptances": list(acceptances), "points": points,
            "speedup_batch1": {str(a): by[(batches[0], a)]["speedup"] for a in acceptances},
            "speedup_largest": {str(a): by[(batches[-1], a)]["speedup"] for a in acceptances},
            "largest_paying_batch": max(paying) if paying else None, "best_acceptance": best}


def tables(result: dict) -> list:
    rows = [(p["batch"], "plain" if p["acceptance"] is None else p["acceptance"], p["output_tokens_per_s"],
             p["speedup"], 1e3 * p["tpot"], p["tokens_per_step"], p.get("accepted_share"))
            for p in result["points"]]
    return [table(f"speculative decoding, k = {result['k']}: processes of {result['prompt_len']} + "
                  f"{result['output_len']} tokens decoding together, {result['model']} on {result['gpu']}",
                  ["batch", "draft acceptance", "out tok/s", "x plain", "TPOT ms", "tokens/step/process",
                   "drafts kept"], rows)]


def plot(result: dict, path) -> str:
    fig, (ax, bx) = figure(2)
    for a in result["acceptances"]:
        pts = [p for p in result["points"] if p["acceptance"] == a]
        ax.plot([p["batch"] for p in pts], [p["speedup"] for p in pts], "o-", label=f"acceptance {a}")
        bx.plot([p["batch"] for p in pts], [1e3 * p["tpot"] for p in pts], "o-", label=f"acceptance {a}")
    plain = [p for p in result["points"] if p["acceptance"] is None]
    bx.plot([p["batch"] for p in plain], [1e3 * p["tpot"] for p in plain], "k--", label="plain")
    ax.axhline(1.0, color="grey", lw=0.8)
    for x in (ax, bx):
        x.set_xscale("log", base=2)
        x.set_xlabel("processes decoding together")
        x.legend(fontsize=8)
    ax.set_ylabel(f"output tok/s, x plain (k = {result['k']})")
    bx.set_ylabel("time per output token (ms)")
    bx.set_title(f"{result['model']}, {result['gpu']}")
    return save(fig, path)


QUICK = {"batches": (1, 64), "acceptances": (0.8,), "output_len": 64, "prompt_len": 128}


def headline(result: dict) -> list:
    a = str(result["best_acceptance"])
    batches = result["batches"]
    return [("speculative decoding at batch 1 (beyond the article)",
             f"(1 - a^(k+1)) / (1 - a) tokens a step, nearly free: {_expected(float(a), result['k']):.2f}x at a = {a}",
             f"{result['speedup_batch1'][a]:.2f}x (kvos's back-off after a missed draft included)"),
            (f"... at batch {batches[-1]}", "a loss once the step is compute-bound",
             f"{result['speedup_largest'][a]:.2f}x; it pays up to batch {result['largest_paying_batch']}")]


def _expected(a: float, k: int) -> float:
    """Tokens a step with k drafts each kept with probability a, stopping at the first miss."""
    return k + 1 if a == 1 else (1 - a ** (k + 1)) / (1 - a)
