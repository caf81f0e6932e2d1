"""From a system's raw result to the row of the table, computed the same way for every system.

useful tokens: generated tokens up to each sample's prescribed length (a system that
stops early is not credited more). TTFT: first token time minus arrival, per sample.
TBT: every gap between two consecutive tokens of a sample, pooled over samples.
"""
from __future__ import annotations

import math

from userspace.bench import roofline
from userspace.bench.systems import KVOS_SYSTEMS


def percentile(values: list, q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(workload, raw: dict) -> dict:
    """The table row of one system's result (raw as the system printed it)."""
    if not raw.get("ok"):
        return {"system": raw.get("system"), "ok": False, "error": raw.get("error", "failed"),
                "skipped": raw.get("skipped", False)}
    samples = raw["samples"]
    wall = raw["wall_seconds"]
    generated = sum(len(s["token_times"]) for s in samples)
    useful = sum(min(len(s["token_times"]), s["output_len"]) for s in samples)
    mismatched = [(s["request"], s["sample"], len(s["token_times"]), s["output_len"])
                  for s in samples if len(s["token_times"]) != s["output_len"]]
    ttft = [s["token_times"][0] - s["arrival"] for s in samples if s["token_times"]]
    tbt = [b - a for s in samples for a, b in zip(s["token_times"], s["token_times"][1:])]
    return {
        "system": raw["system"], "ok": True, "mode": raw["mode"],
        "useful_tok_s": useful / wall, "total_tok_s": (workload.prompt_tokens + useful) / wall,
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "tbt_p50": percentile(tbt, 50), "tbt_p99": percentile(tbt, 99),
        "kv_peak_bytes": raw.get("kv_peak_bytes"), "kv_private_peak_bytes": raw.get("kv_private_peak_bytes"),
        "kv_capacity_bytes": raw.get("kv_capacity_bytes"),
        "wall_seconds": wall, "load_seconds": raw["load_seconds"], "cpu_share": raw.get("cpu_share"),
        "others_cpu_share": raw.get("others_cpu_share"), "attempts": raw.get("attempts", 1),
        "cpu_seconds": raw.get("cpu_seconds"), "rss_peak_bytes": raw.get("rss_peak_bytes"),
        "useful_tok_per_cpu_s": useful / raw["cpu_seconds"] if raw.get("cpu_seconds") else None,
        "samples": len(samples), "generated_tokens": generated, "useful_tokens": useful,
        "exact_lengths": not mismatched, "length_mismatches": mismatched[:10],
        "extra": raw.get("extra", {}), "notes": raw.get("notes", []),
    }


def ratios(rows: list, base: str = "kvos", exclude=KVOS_SYSTEMS) -> dict:
    """Useful tok/s of `base` over each baseline that ran (the kvos rows are not baselines)."""
    ok = {r["system"]: r for r in rows if r.get("ok")}
    if base not in ok:
        return {}
    return {name: ok[base]["useful_tok_s"] / r["useful_tok_s"]
            for name, r in ok.items() if name != base and name not in exclude and r["useful_tok_s"] > 0}


def roofline_fraction(raw: dict, row: dict, ceiling: dict) -> dict:
    """The row's roofline fields: the least time its recorded steps could take at the measured rates
    (roofline.py), and that over the run's wall time. Empty for a system that records no steps."""
    if not row.get("ok"):
        return {}
    r = roofline.roofline_seconds(raw.get("roofline_work"), ceiling)
    if r is None:
        return {}
    return {"roofline_seconds": r["seconds"], "roofline_fraction": r["seconds"] / row["wall_seconds"],
            "roofline_steps": r["steps"], "roofline_compute_bound_steps": r["compute_bound_steps"],
            "weight_bytes": raw["roofline_work"]["weight_bytes"]}


def ceiling_fraction(workload, row: dict | None, flops: float | None, num_params: int) -> float | None:
    """(prompt + generated tokens) x 2 x parameters / (wall x measured FLOP/s)."""
    if not row or not row.get("ok") or not flops:
        return None
    tokens = workload.prompt_tokens + row["useful_tokens"]
    return tokens * 2 * num_params / (row["wall_seconds"] * flops)
