"""memory: the KV budget arithmetic for every GPU preset and model, and the decode roofline.

Budgets come from booted kernels (memory=None; uname shows the terms, meminfo the frames). Decode
steps are kernel steps of B processes, against the batch where the cost model turns compute-bound
(the model's cost figures from its userspace description, the GPU's constants from uname).
"""
from __future__ import annotations

from dataclasses import replace

# The simulated GPU's presets and roofline formulas are public data (no kernel state): the crossover
# is computed from uname().gpu and the model's userspace description with the device's own formula.
from kernel.devices.costmodel import GPUS, GPUSpec, decode_crossover_batch
from userspace.programs.sim import SimProgram, sim_model
from userspace.sim.experiments.common import boot, figure, save, step, table
from userspace.sim.workloads import Request, prompt_tokens

NAME = "memory"
CLAIM = "LLaMA-2-7B fp16: 524,288 bytes of KV per token; an 80 GB A100 holds ~125,000 tokens after 14 GB of weights"
MODELS = ("llama-2-7b", "llama-2-13b", "llama-3-8b", "smollm2-135m")
BATCHES = (1, 16, 64, 128, 256)
CONTEXT = 256


def budget(gpu: str, model: str) -> dict:
    root, tid = boot(gpu, model)
    info = root.meminfo()
    page_size = root.tenantinfo(tid).page_size
    arithmetic = root.uname().memory_budget           # the sim device's arithmetic for the tenant's program
    return {"gpu": gpu, "model": model, **arithmetic, "frames": info.total, "frame_bytes": info.frame_bytes,
            "page_size": page_size, "tokens": info.total * page_size}


def decode_step(gpu: str, model: str, batch: int, context: int = CONTEXT) -> dict:
    """One kernel step of `batch` processes decoding at `context` tokens."""
    root, tid = boot(gpu, model, token_budget=1 << 20, max_running=batch)
    vocab = root.tenantinfo(tid).vocab_size
    for i in range(batch):
        root.spawn(tid, prompt_tokens(Request(0.0, context, 4), i, vocab), max_tokens=4, ignore_eos=True)
    prefill = step(root, 0)                           # every prompt prefilled at once
    record = step(root, prefill.step)                 # a pure decode step
    if record.decode_tokens != batch or record.prefill_tokens:
        raise RuntimeError(f"expected a decode step of {batch}, got {record.summary()}")
    cost = record.cost
    return {"gpu": gpu, "model": model, "batch": batch, "context": context, "step_ms": 1e3 * record.seconds,
            "compute_ms": 1e3 * cost["compute"], "memory_ms": 1e3 * cost["memory"],
            "tokens_per_s": batch / record.seconds}


def model_cost(model: str):
    """The model's cost figures (FLOPs per token, weight and K/V bytes) as the simulated device prices
    them, from the model's description in userspace: the ModelCost its SimProgram carries."""
    return SimProgram(sim_model(model)).step_cost


def run_experiment(gpu=None, model=None, seed=0) -> dict:
    gpus = [gpu] if gpu else list(GPUS)
    models = [model] if model else list(MODELS)
    budgets = [budget(g, m) for g in gpus for m in models]
    step_model = model or "llama-2-7b"
    capacity = {g: budget(g, step_model)["tokens"] for g in gpus}
    steps = [decode_step(g, step_model, b, CONTEXT) for g in gpus for b in BATCHES
             if b * (CONTEXT + 4) < 0.95 * capacity[g]]       # batches that fit the pool without preemption
    crossover, constants = [], {}
    for g in gpus:
        root, _ = boot(g, model or "llama-2-7b")
        constants[g] = root.uname().gpu              # the booted device's constants, overrides included
        spec = GPUSpec(**constants[g])
        cost = model_cost(model or "llama-2-7b")
        crossover.append({"gpu": g, "model": model or "llama-2-7b",      # weights only: the article's reckoning
                          "weights_only": decode_crossover_batch(spec, replace(cost, kv_bytes_per_token=0,
                                                                               attention_flops_unit=0)),
                          "context_0": decode_crossover_batch(spec, cost, 0),
                          "context_512": decode_crossover_batch(spec, cost, 512)})
    main = next((b for b in budgets if b["gpu"] == "a100-80g" and b["model"] == "llama-2-7b"), budgets[0])
    batch1 = next((s for s in steps if s["gpu"] == main["gpu"] and s["batch"] == 1), steps[0])
    return {"experiment": NAME, "budgets": budgets, "decode_steps": steps, "crossover": crossover,
            "gpu": main["gpu"], "model": main["model"],
            "kv_bytes_per_token": main["kv_bytes_per_token"], "kv_tokens": main["tokens"],
            "weight_bytes": main["weight_bytes"], "kv_bytes": main["kv_bytes"],
            "decode_step_ms_batch1": batch1["step_ms"],
            "gpu_constants": constants[main["gpu"]],
            "crossover_weights_only": next(c["weights_only"] for c in crossover if c["gpu"] == main["gpu"])}


def tables(result: dict) -> list:
    gib = 1 << 30
    b = table("memory: the KV budget (memory x utilisation - weights - activations = KV; tokens from the kernel)",
              ["gpu", "model", "memory GiB", "usable GiB", "weights GiB", "activ. GiB", "KV GiB", "KV B/token",
               "frames", "tokens"],
              [(x["gpu"], x["model"], x["memory_bytes"] / gib, x["usable_bytes"] / gib, x["weight_bytes"] / gib,
                x["activation_reserve"] / gib, x["kv_bytes"] / gib, x["kv_bytes_per_token"], x["frames"],
                x["tokens"]) for x in result["budgets"]])
    s = table(f"memory: decode steps at a {CONTEXT}-token context (kernel steps, priced by the cost model)",
              ["gpu", "model", "batch", "step ms", "compute ms", "memory ms", "tokens/s"],
              [(x["gpu"], x["model"], x["batch"], x["step_ms"], x["compute_ms"], x["memory_ms"], x["tokens_per_s"])
               for x in result["decode_steps"]])
    c = table("memory: batch where a decode step turns compute-bound",
              ["gpu", "model", "weights only", "with K/V, context 0", "with K/V, context 512"],
              [(x["gpu"], x["model"], x["weights_only"], x["context_0"], x["context_512"])
               for x in result["crossover"]],
              caption="inf: K/V reads grow as fast as the FLOPs, so the step never turns compute-bound")
    return [b, s, c]


def plot(result: dict, path) -> str:
    fig, (ax, bx) = figure(2)
    models = list(dict.fromkeys(x["model"] for x in result["budgets"]))
    gpus = list(dict.fromkeys(x["gpu"] for x in result["budgets"]))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        vals = [next(x["tokens"] for x in result["budgets"] if x["gpu"] == g and x["model"] == m) for g in gpus]
        ax.bar([j + i * width for j in range(len(gpus))], vals, width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(gpus))], gpus)
    ax.set_yscale("log")
    ax.set_ylim(top=ax.get_ylim()[1] * 30)                   # room for the legend above the bars
    ax.set_ylabel("KV tokens that fit")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    for g in gpus:
        pts = [x for x in result["decode_steps"] if x["gpu"] == g]
        bx.plot([x["batch"] for x in pts], [x["step_ms"] for x in pts], "o-", label=g)
    bx.set_xscale("log", base=2)
    bx.set_xlabel(f"decode batch (context {CONTEXT})")
    bx.set_ylabel("step time (ms)")
    bx.set_title(result["decode_steps"][0]["model"])
    bx.legend(fontsize=7)
    return save(fig, path)


QUICK = {}


def headline(result: dict) -> list:
    return [("KV bytes per token, LLaMA-2-7B fp16", "524,288", f"{result['kv_bytes_per_token']:,}"),
            (f"KV tokens, LLaMA-2-7B on {result['gpu']}", "~125,000 (64 GB after 14 GB of weights)",
             f"{result['kv_tokens']:,} ({result['kv_bytes'] / 1e9:.1f} GB after "
             f"{result['weight_bytes'] / 1e9:.1f} GB)"),
            ("decode step, LLaMA-7B, batch 1, A100", "~7 ms (14 GB / 2 TB/s)",
             f"{result['decode_step_ms_batch1']:.1f} ms (GEMM bandwidth efficiency "
             f"{result['gpu_constants']['bandwidth_efficiency']}, "
             f"{1e6 * result['gpu_constants']['layer_overhead']:g} us launches per layer, "
             f"{1e3 * result['gpu_constants']['step_overhead']:g} ms host)"),
            ("decode turns compute-bound at batch", "200-500",
             f"{result['crossover_weights_only']:.0f} (weights only); never once K/V reads count")]
