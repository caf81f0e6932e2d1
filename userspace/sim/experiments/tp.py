"""tp: what tensor parallelism buys LLaMA-class models, step by step, on the calibrated cost model.

For each model, tensor-parallel degree and batch: one kernel step of B processes decoding at a
fixed context, and one prefill of a long prompt, priced by the simulated device booted with tp=N
(weights, K/V and FLOPs split N ways; two all-reduces per layer over the preset's link). A model
that does not fit N GPUs, or a batch whose K/V does not, is reported as such, not priced.
"""
from __future__ import annotations

from kernel.errors import KvosError
from userspace.sim.experiments.common import boot, figure, save, step, table
from userspace.sim.workloads import Request, prompt_tokens

NAME = "tp"
CLAIM = "tensor parallelism: more GPUs per layer cut a step's weight reads, at the price of two all-reduces a layer"
MODELS = ("llama-2-7b", "llama-2-13b", "llama-2-70b")
TPS = (1, 2, 4, 8)
BATCHES = (1, 16, 64, 256)
CONTEXT = 1024
PREFILL = 2048


def _priced(gpu: str, model: str, tp: int, batch: int, prompt: int, decode: bool) -> dict | None:
    """One step of `batch` processes with `prompt`-token prompts: their prefill, or (decode) the decode
    step after it. None when the model or the batch does not fit."""
    try:
        root, tid = boot(f"{gpu},tp={tp}", model, token_budget=1 << 20, max_running=batch)
    except KvosError:                                  # weights over the group's memory, or heads over tp
        return None
    info = root.meminfo()
    if batch * (prompt + 4) > 0.95 * info.total * root.tenantinfo(tid).page_size:
        return None                                    # the K/V would not fit without preemption
    vocab = root.tenantinfo(tid).vocab_size
    for i in range(batch):
        root.spawn(tid, prompt_tokens(Request(0.0, prompt, 4), i, vocab), max_tokens=4, ignore_eos=True)
    record = step(root, 0)
    if decode:
        record = step(root, record.step)
    cost = record.cost
    return {"step_ms": 1e3 * record.seconds, "comm_ms": 1e3 * cost["comm"], "linear_ms": 1e3 * cost["linear"],
            "attention_ms": 1e3 * cost["attention"], "host_ms": 1e3 * cost["overhead"]}


def run_experiment(gpu="h100-80g", model=None, seed=0, models=MODELS, tps=TPS, batches=BATCHES) -> dict:
    models = [model] if model else list(models)
    rows, prefills = [], []
    for m in models:
        base = {}                                      # batch -> the step time at the smallest tp that fits
        for t in tps:
            for b in batches:
                r = _priced(gpu, m, t, b, CONTEXT, decode=True)
                if r is None:
                    rows.append({"model": m, "tp": t, "batch": b, "fits": False})
                    continue
                first = base.setdefault(b, (t, r["step_ms"]))
                speedup = first[1] / r["step_ms"]
                rows.append({"model": m, "tp": t, "batch": b, "fits": True, **r, "tokens_per_s": b / r["step_ms"] * 1e3,
                             "speedup": speedup, "from_tp": first[0],
                             "scaling_efficiency": speedup / (t / first[0])})
            p = _priced(gpu, m, t, 1, PREFILL, decode=False)
            prefills.append({"model": m, "tp": t, "fits": p is not None, **(p or {})})
    seventy = {x["tp"]: x for x in rows if x["model"] == models[-1] and x["batch"] == min(batches) and x["fits"]}
    return {"experiment": NAME, "gpu": gpu, "context": CONTEXT, "prefill_tokens": PREFILL, "decode": rows,
            "prefill": prefills, "headline_model": models[-1],
            "headline_steps": {t: x["step_ms"] for t, x in seventy.items()}}


def tables(result: dict) -> list:
    d = table(f"tp: decode steps on {result['gpu']} at a {result['context']}-token context (kernel steps, tp=N)",
              ["model", "tp", "batch", "step ms", "tokens/s", "linear ms", "attention ms", "all-reduce ms",
               "host ms", "speedup", "per-GPU efficiency"],
              [(x["model"], x["tp"], x["batch"], x["step_ms"], x["tokens_per_s"], x["linear_ms"], x["attention_ms"],
                x["comm_ms"], x["host_ms"], x["speedup"], x["scaling_efficiency"]) if x["fits"] else
               (x["model"], x["tp"], x["batch"], "does not fit", *[None] * 7) for x in result["decode"]],
              caption="speedup and per-GPU efficiency against the smallest tp that fits the same batch")
    p = table(f"tp: one {result['prefill_tokens']}-token prefill (time to first token alone)",
              ["model", "tp", "step ms", "all-reduce ms"],
              [(x["model"], x["tp"], x["step_ms"], x["comm_ms"]) if x["fits"] else
               (x["model"], x["tp"], "does not fit", None) for x in result["prefill"]])
    return [d, p]


def plot(result: dict, path) -> str:
    models = list(dict.fromkeys(x["model"] for x in result["decode"]))
    fig, axes = figure(len(models), width=3.6)
    for ax, m in zip(axes, models):
        for b in sorted({x["batch"] for x in result["decode"]}):
            pts = [x for x in result["decode"] if x["model"] == m and x["batch"] == b and x["fits"]]
            if pts:
                ax.plot([x["tp"] for x in pts], [x["step_ms"] for x in pts], "o-", label=f"batch {b}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(TPS, [str(t) for t in TPS])
        ax.set_xlabel("tensor-parallel GPUs")
        ax.set_title(m, fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"decode step (ms), context {result['context']}")
    return save(fig, path)


QUICK = {"models": ("llama-2-7b", "llama-2-70b"), "batches": (1, 64)}


def headline(result: dict) -> list:
    steps = result["headline_steps"]
    shown = ", ".join(f"TP {t}: {ms:.1f} ms" for t, ms in sorted(steps.items()))
    return [(f"{result['headline_model']} decode step at batch 1 on {result['gpu']}", "not in the article",
             shown or "does not fit")]
