"""The end of a run: one JSON object (what --json prints) and the rich table people read.

The JSON holds the workload's facts, the machine (threads, load averages, measured
ceilings), one row per system (`table`), `ratios` (kvos useful tok/s over each
baseline's) and `ceiling_fraction`. The table shows the same rows, then the ratios.
"""
from __future__ import annotations

from kernel.units import format_bytes
from userspace.bench.systems import KVOS_SYSTEMS

NOISY_LOAD = 2.5        # 1-minute load average above which other work shares the cores
NOISY_OTHERS = 0.05     # share of the machine's CPU other processes took while a system ran


def build_report(workload, rows: list, ratios: dict, ceiling: dict, ceiling_fraction, num_params: int,
                 settings: dict, loads: dict, command: str) -> dict:
    flops = ceiling.get("flops") if ceiling.get("ok") else None
    # What other processes used while each system ran decides; the load average before a system
    # is kept for the record but also counts this run's own previous system (2 busy threads).
    noisy = [f"other processes used {r['others_cpu_share']:.0%} of the CPUs while {r['system']} ran"
             for r in rows if r.get("ok") and (r.get("others_cpu_share") or 0) > NOISY_OTHERS]
    if not any(r.get("others_cpu_share") is not None for r in rows):       # no /proc/stat: load averages
        noisy = [f"1-minute load average {load[0]:.2f} > {NOISY_LOAD} before {name}"
                 for name, load in loads.items() if load[0] > NOISY_LOAD]
    return {
        "command": command,
        "workload": {"name": workload.name, "requests": len(workload.requests), "samples": workload.num_samples,
                     "prompt_tokens": workload.prompt_tokens, "generated_tokens": workload.generated_tokens,
                     "prefix_len": workload.prefix_len, "temperature": workload.temperature,
                     "notes": workload.notes},
        "settings": settings,
        "machine": {"ceiling": ceiling, "num_params": num_params,
                    "ceiling_tok_s": flops / (2 * num_params) if flops else None,
                    "load_average_before": loads, "noisy": bool(noisy), "noisy_because": noisy},
        "table": rows,
        "ratios": ratios,
        "ceiling_fraction": ceiling_fraction,
    }


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _millis(value) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def render(report: dict, console) -> None:
    from rich.table import Table

    w = report["workload"]
    title = (f"kvos bench: {w['name']} - {w['samples']} sequences, {w['prompt_tokens']:,} prompt + "
             f"{w['generated_tokens']:,} generated tokens")
    table = Table(title=title, title_justify="left")
    for col, justify in (("system", "left"), ("useful tok/s", "right"), ("total tok/s", "right"),
                         ("TTFT p50/p99 s", "right"), ("TBT p50/p99 ms", "right"), ("peak KV", "right"),
                         ("peak RSS", "right"), ("wall s", "right"), ("load s", "right"), ("tok/CPU-s", "right"),
                         ("roofline", "right"), ("exact", "center")):
        table.add_column(col, justify=justify)
    for row in report["table"]:
        if not row.get("ok"):
            status = "skipped" if row.get("skipped") else "failed"
            table.add_row(row["system"], f"[dim]{status}: {row.get('error', '')}[/dim]", *[""] * 10)
            continue
        kv = "-" if row.get("kv_peak_bytes") is None else format_bytes(row["kv_peak_bytes"])
        rss = "-" if row.get("rss_peak_bytes") is None else format_bytes(row["rss_peak_bytes"])
        roof = "-" if row.get("roofline_fraction") is None else f"{row['roofline_fraction']:.0%}"
        table.add_row(row["system"], f"{row['useful_tok_s']:.1f}", f"{row['total_tok_s']:.1f}",
                      f"{_seconds(row['ttft_p50'])} / {_seconds(row['ttft_p99'])}",
                      f"{_millis(row['tbt_p50'])} / {_millis(row['tbt_p99'])}", kv, rss,
                      f"{row['wall_seconds']:.1f}", f"{row['load_seconds']:.1f}",
                      "-" if row.get("useful_tok_per_cpu_s") is None else f"{row['useful_tok_per_cpu_s']:.1f}",
                      roof, "yes" if row["exact_lengths"] else "[red]no[/red]")
    console.print(table)
    for row in report["table"]:
        if row.get("ok"):
            lines = [row["mode"]] + row.get("notes", [])
            if row.get("roofline_seconds") is not None:
                lines.append(f"roofline {row['roofline_seconds']:.2f} s over {row['roofline_steps']} steps "
                             f"({row['roofline_compute_bound_steps']} compute-bound, weights "
                             f"{format_bytes(row['weight_bytes'])} a step): {row['roofline_fraction']:.1%} of it")
            if row.get("kv_private_peak_bytes"):
                lines.append(f"peak KV if every sequence had private pages: "
                             f"{format_bytes(row['kv_private_peak_bytes'])}")
            console.print(f"[bold]{row['system']}[/bold]: " + "; ".join(lines))
    m = report["machine"]
    ceiling = m["ceiling"]
    if ceiling.get("ok") and ceiling.get("device", "cpu") != "cpu":
        console.print(f"machine: {ceiling['device']} ({ceiling.get('device_name', '?')}): fp32 "
                      f"{ceiling['flops'] / 1e12:.1f} TFLOP/s ({ceiling['matmul']}), bf16 GEMM "
                      f"{(ceiling.get('bf16_gemm_flops') or 0) / 1e12:.1f} TFLOP/s, device read "
                      f"{ceiling['read_bytes_per_s'] / 1e9:.0f} GB/s, best of the runs before and after the systems; "
                      f"ceiling {m['ceiling_tok_s']:.0f} processed tok/s at {m['num_params'] / 1e6:.1f} M parameters")
    elif ceiling.get("ok"):
        console.print(f"machine: fp32 {ceiling['flops'] / 1e9:.0f} GFLOP/s (2048^2 torch.mm "
                      f"{ceiling['matmul_flops'] / 1e9:.0f}, model-shaped GEMM {ceiling['model_gemm_flops'] / 1e9:.0f}"
                      f", best of the runs before and after the systems; bf16 GEMM "
                      f"{(ceiling.get('bf16_gemm_flops') or 0) / 1e9:.0f}), read "
                      f"{ceiling['read_bytes_per_s'] / 1e9:.1f} GB/s on {ceiling['threads']} threads; ceiling "
                      f"{m['ceiling_tok_s']:.0f} processed tok/s at {m['num_params'] / 1e6:.1f} M parameters")
        if ceiling.get("vector_paths"):
            console.print(f"cpu: {ceiling.get('cpu', '?')}; kvos's C kernels: " +
                          ", ".join(f"{k} {v}" for k, v in ceiling["vector_paths"].items()))
    if report["ratios"]:
        console.print("kvos / baseline (useful tok/s): " +
                      ", ".join(f"{k} {v:.2f}x" for k, v in report["ratios"].items()))
    for name in KVOS_SYSTEMS[1:]:
        if report.get(f"ratios_{name.replace('-', '_')}"):
            console.print(f"{name} / baseline (useful tok/s): " + ", ".join(
                f"{k} {v:.2f}x" for k, v in report[f"ratios_{name.replace('-', '_')}"].items()))
    if report["ceiling_fraction"] is not None:
        console.print(f"kvos at {report['ceiling_fraction']:.1%} of the compute ceiling "
                      "((prompt + generated) x 2 x params / (wall x fp32 FLOP/s))")
    if report.get("ceiling_fraction_kvos_bf16") is not None:
        console.print(f"kvos-bf16 at {report['ceiling_fraction_kvos_bf16']:.1%} of the same fp32 ceiling "
                      "(its GEMMs run on the bf16 units, whose ceiling is higher)")
    if report.get("ceiling_fraction_kvos_bf16kv") is not None:
        console.print(f"kvos-bf16kv at {report['ceiling_fraction_kvos_bf16kv']:.1%} of the compute ceiling "
                      "(float32 GEMMs, bf16 KV cache)")
    if m["noisy"]:
        console.print("[yellow]noisy: " + "; ".join(m["noisy_because"]) + "[/yellow]")
