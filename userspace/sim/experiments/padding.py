"""padding: padded (rectangular) against ragged (packed) batches.

The article's worked example run through the kernel: decodes running, a 100-token prompt joins,
schedstat's padding_tokens of that step is the waste. (n-1)(B-1) counts B sequences including the
new one, so "joining 8 decodes" (B = 9) is run too. Then a whole workload, padded and ragged.
"""
from __future__ import annotations

from userspace.sim.experiments.common import boot, figure, pick, run, save, step, table
from userspace.sim.workloads import Request, generate, length_stats, prompt_tokens

NAME = "padding"
CLAIM = "A 100-token prefill joining a decode batch wastes (100-1) x (8-1) = 693 padded slots"
KEYS = ("padding_tokens", "prefill_tokens", "decode_tokens", "output_tokens_per_s", "normalized_latency_mean",
        "ttft_p50", "latency_p99", "duration_s", "wall_s")


def worked_example(gpu: str, model: str, decoders: int, prompt_len: int = 100, batch: str = "padded") -> dict:
    """`decoders` processes decoding, then one prompt of `prompt_len` joins: that step's padding and cost."""
    root, tid = boot(gpu, model, batch=batch, token_budget=4096)
    vocab = root.tenantinfo(tid).vocab_size
    pids = [root.spawn(tid, prompt_tokens(Request(0.0, 8, 16), i, vocab), max_tokens=16, ignore_eos=True)
            for i in range(decoders)]         # equal prompts: their own prefill needs no padding
    prefill = step(root, 0)                   # their prefill
    decode = step(root, prefill.step)         # a pure decode step
    pids.append(root.spawn(tid, prompt_tokens(Request(0.0, prompt_len, 1), decoders, vocab), max_tokens=1,
                           ignore_eos=True))
    record = step(root, decode.step)          # the prompt joins the decodes
    if record.decode_tokens != decoders or record.prefill_tokens != prompt_len:
        raise RuntimeError(f"the joining step ran {record.decode_tokens} decode and {record.prefill_tokens} "
                           f"prefill tokens, expected {decoders} and {prompt_len}")
    for pid in pids:                          # the rest runs to the end (wait steps the kernel)
        root.wait(pid)
    root.fsck()
    return {"batch": batch, "decoders": decoders, "prompt_len": prompt_len, "sequences": decoders + 1,
            "padding_tokens": record.padding_tokens, "real_tokens": decoders + prompt_len,
            "step_seconds": record.seconds,
            "formula_article": (prompt_len - 1) * (decoders + 1 - 1), "formula_kernel": prompt_len * (decoders + 1)
            - (decoders + prompt_len)}


def run_experiment(gpu="a100-80g", model="llama-2-7b", seed=0, *, preset="sharegpt", requests=300, rate=8.0,
                   token_budget=2048) -> dict:
    examples = [worked_example(gpu, model, d, 100, b) for d in (7, 8) for b in ("padded", "ragged")]
    seven = next(e for e in examples if e["decoders"] == 7 and e["batch"] == "padded")
    eight = next(e for e in examples if e["decoders"] == 8 and e["batch"] == "padded")
    reqs = generate(preset, requests, rate=rate, seed=seed)
    runs = {}
    for batch in ("padded", "ragged"):
        summary, _, _ = run(reqs, gpu, model, seed=seed, batch=batch, token_budget=token_budget)
        runs[batch] = pick(summary, *KEYS)
    padded = runs["padded"]
    computed = padded["prefill_tokens"] + padded["decode_tokens"]
    return {
        "experiment": NAME, "gpu": gpu, "model": model, "seed": seed, "preset": preset, "rate": rate,
        "workload": length_stats(reqs), "token_budget": token_budget, "examples": examples, "runs": runs,
        "padded_waste_tokens": seven["padding_tokens"],
        "padded_waste_tokens_8_decodes": eight["padding_tokens"],
        "ragged_waste_tokens": max(e["padding_tokens"] for e in examples if e["batch"] == "ragged"),
        "step_slowdown_padded": seven["step_seconds"] / next(
            e["step_seconds"] for e in examples if e["decoders"] == 7 and e["batch"] == "ragged"),
        "workload_padding_fraction": padded["padding_tokens"] / (padded["padding_tokens"] + computed),
        "workload_throughput_ratio": runs["ragged"]["output_tokens_per_s"] / padded["output_tokens_per_s"],
    }


def tables(result: dict) -> list:
    ex = table("padding: a 100-token prompt joins a decode batch (one kernel step each)",
               ["batch", "decodes", "sequences", "padding slots", "(n-1)(B-1)", "step ms"],
               [(e["batch"], e["decoders"], e["sequences"], e["padding_tokens"], e["formula_article"],
                 1e3 * e["step_seconds"]) for e in result["examples"]],
               caption="(n-1)(B-1) with B = sequences in the batch, the new one included")
    wl = table(f"padding: {result['workload']['requests']} {result['preset']} requests at {result['rate']} req/s, "
               f"{result['model']} on {result['gpu']}",
               ["batch", "padding slots", "computed tokens", "out tok/s", "norm. lat s/tok", "latency p99"],
               [(b, r["padding_tokens"], r["prefill_tokens"] + r["decode_tokens"], r["output_tokens_per_s"],
                 r["normalized_latency_mean"], r["latency_p99"]) for b, r in result["runs"].items()],
               caption=f"padding is {100 * result['workload_padding_fraction']:.1f}% of the padded run's slots")
    return [ex, wl]


def plot(result: dict, path) -> str:
    fig, (ax, bx) = figure(2)
    labels = [f"{e['decoders']} dec, {e['batch']}" for e in result["examples"]]
    ax.bar(labels, [e["real_tokens"] for e in result["examples"]], label="real tokens", color="#4a4")
    ax.bar(labels, [e["padding_tokens"] for e in result["examples"]],
           bottom=[e["real_tokens"] for e in result["examples"]], label="padding", color="#c44")
    ax.set_ylabel("token slots in the step")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)
    ax.set_title("a 100-token prompt joins")
    runs = result["runs"]
    bx.bar(["padded", "ragged"], [runs[b]["output_tokens_per_s"] for b in ("padded", "ragged")],
           color=["#c44", "#4a4"])
    bx.set_ylabel("output tokens/s")
    bx.set_title(f"{result['preset']} at {result['rate']} req/s")
    return save(fig, path)


QUICK = {"requests": 40}


def headline(result: dict) -> list:
    return [("padding, 100-token prompt joins (B = 8 sequences)", "(100-1) x (8-1) = 693",
             f"{result['padded_waste_tokens']} (ragged: {result['ragged_waste_tokens']}); the step is "
             f"{result['step_slowdown_padded']:.1f}x longer"),
            ("padding, the same prompt joining 8 decodes (B = 9)", "-",
             f"{result['padded_waste_tokens_8_decodes']}"),
            ("padding over a whole workload", "-",
             f"{100 * result['workload_padding_fraction']:.0f}% of slots; ragged "
             f"{result['workload_throughput_ratio']:.1f}x faster")]
