"""kvos bench: workloads, metrics, and `bench --quick --json` end to end with kvos alone.

The fast tests run the whole command on the tiny model (the baselines skip themselves:
it has no GGUF file); the slow one runs the real model as CI does. Nothing is timed:
the checks are the JSON's shape and that every sequence got exactly its length.
"""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kernel.errors import KvosError
from kernel.results import StepRecord, TenantInfo, WorkRecord
from userspace.bench import metrics, roofline, runner, workloads
from userspace.bench.child import Progress, parse_line
from userspace.programs import qlinear
from userspace.programs.loader import load_program

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"system", "ok", "mode", "useful_tok_s", "total_tok_s", "ttft_p50", "ttft_p99", "tbt_p50", "tbt_p99",
            "kv_peak_bytes", "wall_seconds", "load_seconds", "exact_lengths", "useful_tokens", "generated_tokens"}


@pytest.fixture(scope="module")
def tiny():
    return load_program("tiny-llama")


def bench(*args, timeout=1200):
    """Run `python -m userspace.bench ... --json`; returns the parsed object."""
    out = subprocess.run([sys.executable, "-m", "userspace.bench", *args, "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


# -- workloads -----------------------------------------------------------------------------------
def test_mixed_lengths_are_the_issues_draws():
    prompts, outputs = workloads.mixed_lengths()
    assert len(prompts) == len(outputs) == 64
    assert sum(prompts) == 9023 and sum(outputs) == 9172
    assert min(prompts) >= 16 and max(prompts) <= 256 and min(outputs) >= 8 and max(outputs) <= 512


def test_workloads_have_exact_lengths_and_shared_prefix(tiny):
    prompts, outputs = workloads.mixed_lengths()
    mixed = workloads.build("mixed", tiny)
    assert [r.prompt_len for r in mixed.requests] == prompts
    assert [r.output_len for r in mixed.requests] == outputs
    assert mixed.temperature == 0 and mixed.prefix_len == 0
    assert len({tuple(r.prompt) for r in mixed.requests}) == 64          # no two requests alike
    shared = workloads.build("shared", tiny)
    prefix = shared.requests[0].prompt[:200]
    assert shared.prefix_len == 200
    for r, m in zip(shared.requests, mixed.requests):
        assert r.prompt[:200] == prefix and r.prompt[200:] == m.prompt
    sampling = workloads.build("sampling", tiny)
    assert len(sampling.requests) == 16 and sampling.num_samples == 64 and sampling.temperature > 0
    quick = workloads.build("mixed", tiny, quick=True)
    assert quick.requests == mixed.requests[:16]


def test_prompts_are_chat_turns_of_real_text(tiny):
    chat = workloads.ChatText(tiny)
    assert chat.chatml
    mixed = workloads.build("mixed", tiny)
    text = tiny.decode(mixed.requests[5].prompt)
    topic, question = workloads.texts.TOPICS[5 * 3 % 10], workloads.texts.QUESTIONS[5]
    assert text.startswith(f"user\n{topic}. {question[:20]}")    # markers are special tokens: not decoded
    assert text.rstrip().endswith("assistant")


@pytest.mark.slow
def test_mixed_prompts_share_no_page_with_the_real_tokenizer():
    """No accidental prefix sharing in `mixed`: every prompt differs within its first 16-token page."""
    mixed = workloads.build("mixed", load_program("smollm2-135m"))
    assert len({tuple(r.prompt[:16]) for r in mixed.requests}) == 64
    assert (mixed.prompt_tokens, mixed.generated_tokens) == (9023, 9172)


def test_single_is_serial_and_survives_json(tiny, tmp_path):
    single = workloads.build("single", tiny)
    prompts, _ = workloads.mixed_lengths()
    assert single.serial and [r.prompt_len for r in single.requests] == prompts[:8]
    assert {r.output_len for r in single.requests} == {128}
    single.save(tmp_path / "w.json")
    assert workloads.Workload.load(tmp_path / "w.json") == single
    assert not workloads.build("mixed", tiny).serial
    assert len(workloads.build("single", tiny, quick=True).requests) == 2


def test_trace_file(tiny, tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"prompt_len": 30, "output_len": 4, "arrival": 1.5}\n\n'
                     '{"prompt_tokens": [5, 6, 7], "output_len": 2}\n{"prompt_len": 3, "output_len": 1}\n')
    w = workloads.build("mixed", tiny, trace=str(trace))
    assert [(r.prompt_len, r.output_len, r.arrival) for r in w.requests] == [(3, 2, 0.0), (3, 1, 0.0),
                                                                             (30, 4, 1.5)]
    assert w.requests[0].prompt == [5, 6, 7] and w.has_arrivals
    for bad in ('{"prompt_len": 3}', '{"prompt_len": 0, "output_len": 2}', '[1, 2]', 'not json',
                '{"prompt_tokens": [99999], "output_len": 2}', '{"prompt_len": 4, "output_len": 2, "arrival": -1}'):
        trace.write_text(bad + "\n")
        with pytest.raises(KvosError):
            workloads.build("mixed", tiny, trace=str(trace))
    with pytest.raises(KvosError):
        workloads.build("nope", tiny)


# -- metrics and the child protocol ------------------------------------------------------------------
def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 64):
        xs = list(rng.random(n))
        for q in (50, 99):
            assert math.isclose(metrics.percentile(xs, q), float(np.percentile(xs, q)))
    assert metrics.percentile([], 50) is None


def test_summarize_counts_useful_tokens_and_gaps(tiny):
    w = workloads.Workload("t", [workloads.BenchRequest(0, [1, 2, 3], 3), workloads.BenchRequest(1, [4], 2, 1.0)])
    raw = {"ok": True, "system": "x", "mode": "m", "wall_seconds": 4.0, "load_seconds": 1.0,
           "samples": [{"request": 0, "sample": 0, "prompt_len": 3, "output_len": 3, "arrival": 0.0,
                        "token_times": [0.5, 0.7, 1.0]},
                       {"request": 1, "sample": 0, "prompt_len": 1, "output_len": 2, "arrival": 1.0,
                        "token_times": [2.0, 2.5, 3.0]}]}       # one token too many: not useful
    row = metrics.summarize(w, raw)
    assert row["useful_tokens"] == 5 and row["generated_tokens"] == 6 and not row["exact_lengths"]
    assert row["length_mismatches"] == [(1, 0, 3, 2)]
    assert math.isclose(row["useful_tok_s"], 5 / 4) and math.isclose(row["total_tok_s"], (4 + 5) / 4)
    assert math.isclose(row["ttft_p50"], 0.75)                    # 0.5 and 2.0 - 1.0
    assert math.isclose(row["tbt_p50"], 0.4)                       # gaps 0.2, 0.3 and 0.5, 0.5, pooled
    assert metrics.ratios([{**row, "system": "kvos"}, {**row, "system": "b", "useful_tok_s": 0.625}]) == {"b": 2.0}
    assert math.isclose(metrics.ceiling_fraction(w, row, 1e9, 100), (4 + 5) * 2 * 100 / (4.0 * 1e9))


def _info(**cost):
    base = {"num_params": 1000, "weight_bytes": 4000, "num_layers": 2, "hidden_size": 10, "num_heads": 3,
            "head_dim": 4}
    return TenantInfo(1, "t", "m", 20, 64, [], None, 16, 80, False, 1.0, None, 1, 1, 1, 64, 64, 0, "off",
                      cost={**base, **cost})


def test_roofline_prices_each_step_by_its_larger_term():
    work = roofline.StepWork(_info())
    head = 20 * 10                                         # vocab x hidden: only sampled rows pay it
    # a prefill chunk of 5 tokens after 3 cached (no token drawn), and a decode at position 7
    work.add(StepRecord(1, 0.1, 2, 5, 1, 0, works=[WorkRecord(1, 1, 3, 5, None, 0),
                                                   WorkRecord(2, 1, 7, 1, 42, 3)]))
    work.add(StepRecord(2, 0.1, 0, 0, 0, 0))               # computed nothing: no step to price
    assert len(work.steps) == 1
    linear, attention, nbytes = work.steps[0]
    assert linear == 2 * ((1000 - head) * 6 + head * 1)
    assert attention == 4 * 2 * 3 * 4 * (5 * 3 + 15 + 1 * 7 + 1)
    assert nbytes == 4000 + (3 + 7 + 6) * 80
    out = work.to_json()
    ceiling = {"ok": True, "flops": 1e6, "read_bytes_per_s": 1e6}
    r = roofline.roofline_seconds(out, ceiling)            # compute: linear + attention over 1e6
    assert math.isclose(r["seconds"], max((linear + attention) / 1e6, nbytes / 1e6)) and r["steps"] == 1
    slow_read = roofline.roofline_seconds(out, {**ceiling, "read_bytes_per_s": 1e3})
    assert math.isclose(slow_read["seconds"], nbytes / 1e3) and slow_read["compute_bound_steps"] == 0
    bf16 = roofline.roofline_seconds({**out, "matmul_dtype": "bfloat16"}, {**ceiling, "bf16_gemm_flops": 4e6})
    assert math.isclose(bf16["seconds"], max(linear / 4e6 + attention / 1e6, nbytes / 1e6))
    assert roofline.roofline_seconds(out, {"ok": False}) is None
    assert roofline.StepWork(TenantInfo(1, "t", "m", 20, 64, [], None, 16, 80, False, 1.0, None, 1, 1, 1, 64,
                                        64, 0, "off")).to_json() is None     # a program without a cost
    row = {"ok": True, "wall_seconds": 2 * r["seconds"]}
    assert math.isclose(metrics.roofline_fraction({"roofline_work": out}, row, ceiling)["roofline_fraction"], 0.5)
    assert metrics.roofline_fraction({}, row, ceiling) == {}


def test_tenantinfo_cost_counts_the_weights_a_step_reads():
    import kernel
    fp32, bf16 = load_program("tiny-llama"), load_program("tiny-llama", matmul="bfloat16")
    held = sum(qlinear.weight_bytes(t) for t in [fp32.lm_head, fp32.norm] + [getattr(layer, n) for layer in fp32.layers
                                                                             for n in layer.__slots__] if t is not None)
    assert fp32.cost.weight_bytes == held == 4 * fp32.cost.num_params       # every active parameter, fp32
    assert bf16.cost.weight_bytes < 0.51 * fp32.cost.weight_bytes           # linear layers in bf16
    k = kernel.boot(memory="8MiB")
    try:
        root = k.syscalls()
        cost = root.tenantinfo(root.spawn_tenant("tiny-llama")).cost
        assert cost["weight_bytes"] == held and cost["num_params"] == fp32.cost.num_params
    finally:
        k.shutdown()


def test_rss_peak_is_each_childs_own():
    """Each child's own peak: a small child after a big one reports its own, small peak (ru_maxrss
    would not: Linux carries the parent's resident pages at fork into the child's)."""
    big = subprocess.Popen([sys.executable, "-c", "x = bytearray(300 << 20); import time; time.sleep(0.3)"])
    timed_out, usage, hwm = runner._reap(big, 60)
    assert not timed_out and big.returncode == 0 and hwm > 300 << 20
    small = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    _, usage, hwm = runner._reap(small, 60)
    assert 0 < hwm < 100 << 20 and runner._rss_peak({}, usage, hwm) == hwm
    assert runner._rss_peak({"vm_hwm_bytes": 5 << 30}, usage, hwm) == 5 << 30     # the child's own report
    assert runner.vm_hwm_bytes() > 0
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    timed_out, _, _ = runner._reap(hung, 0.2)
    assert timed_out and hung.returncode != 0


def test_progress_lines_round_trip(capsys):
    p = Progress(every=0)
    p.phase("run", 12)
    p.update(5)
    lines = capsys.readouterr().err.splitlines()
    assert [parse_line(ln) for ln in lines] == [("phase", ("run", 12)), ("done", 5)]
    assert parse_line("some library's warning") is None


# -- end to end ------------------------------------------------------------------------------------------
def _check_report(report, workload_name, samples):
    assert {"command", "workload", "machine", "table", "ratios", "ceiling_fraction", "settings"} <= set(report)
    assert report["workload"]["name"] == workload_name and report["workload"]["samples"] == samples
    assert report["machine"]["ceiling"]["ok"] and report["machine"]["ceiling"]["flops"] > 0
    if report["machine"]["ceiling"].get("device", "cpu") == "cpu":      # what the CPU ran: the record's
        from kernel.ops import cpu
        assert report["machine"]["ceiling"]["vector_paths"] == cpu.vector_paths()
    rows = {r["system"]: r for r in report["table"]}
    kvos = rows["kvos"]
    assert kvos["ok"] and ROW_KEYS <= set(kvos)
    assert kvos["exact_lengths"] and kvos["generated_tokens"] == report["workload"]["generated_tokens"]
    assert kvos["samples"] == samples
    for key in ("useful_tok_s", "total_tok_s", "wall_seconds"):
        assert kvos[key] > 0
    assert 0 < kvos["ttft_p50"] <= kvos["ttft_p99"] and 0 < kvos["tbt_p50"] <= kvos["tbt_p99"]
    assert 0 < kvos["kv_peak_bytes"] <= kvos["kv_capacity_bytes"]
    assert report["ceiling_fraction"] > 0
    for row in report["table"]:
        if row["ok"]:
            assert row["rss_peak_bytes"] > 0
    # the roofline of the steps kvos ran: positive, priced with the weights it holds
    assert kvos["roofline_steps"] == kvos["extra"]["steps"] and kvos["roofline_seconds"] > 0
    assert report["roofline_fraction"] == kvos["roofline_fraction"] > 0
    return rows


def test_quick_json_on_the_tiny_model():
    report = bench("--quick", "--model", "tiny-llama", "--memory", "8MiB", "--tokens")
    rows = _check_report(report, "mixed", 16)
    kvos = rows["kvos"]
    prompts, outputs = workloads.mixed_lengths()
    assert [len(kvos["tokens"][f"{i}.0"]) for i in range(16)] == outputs[:16]
    for name in ("hf-static", "hf-cb", "llama.cpp"):
        assert not rows[name]["ok"] and rows[name]["skipped"]      # the tiny model has no GGUF file
    assert report["ratios"] == {} and report["ratios_kvos_bf16"] == {} and report["ratios_kvos_bf16kv"] == {}
    assert not rows["kvos-gguf"]["ok"] and rows["kvos-gguf"]["skipped"]     # no GGUF file either
    assert rows["kvos-bf16"]["weight_bytes"] < 0.51 * kvos["weight_bytes"]
    bf16 = rows["kvos-bf16"]                                       # the same kernel, bf16 linear layers
    assert bf16["ok"] and "bfloat16 matmuls, float32 KV" in bf16["mode"]
    assert "float32 matmuls, float32 KV" in kvos["mode"]
    bf16kv = rows["kvos-bf16kv"]                                   # the same kernel, a bf16 KV cache
    assert bf16kv["ok"] and "float32 matmuls, bfloat16 KV" in bf16kv["mode"]
    assert bf16kv["kv_capacity_bytes"] == kvos["kv_capacity_bytes"]      # the same bytes, twice the tokens
    for row in (bf16, bf16kv):
        assert [len(row["tokens"][f"{i}.0"]) for i in range(16)] == outputs[:16]


def test_shared_and_sampling_share_pages_on_the_tiny_model():
    shared = bench("--quick", "--workload", "shared", "--model", "tiny-llama", "--memory", "8MiB",
                   "--systems", "kvos")
    kvos = _check_report(shared, "shared", 16)["kvos"]
    assert kvos["extra"]["cached_tokens"] == 16 * 200             # the system turn, attached from shm
    assert kvos["extra"]["prefill_tokens"] == shared["workload"]["prompt_tokens"] - 15 * 200
    sampling = bench("--quick", "--workload", "sampling", "--model", "tiny-llama", "--memory", "8MiB",
                     "--systems", "kvos")
    kvos = _check_report(sampling, "sampling", 16)["kvos"]
    assert kvos["kv_peak_bytes"] < kvos["kv_private_peak_bytes"]  # forks map the prompt's pages once


def test_single_runs_one_request_at_a_time_on_the_tiny_model():
    report = bench("--quick", "--workload", "single", "--model", "tiny-llama", "--memory", "8MiB",
                   "--systems", "kvos")
    kvos = _check_report(report, "single", 2)["kvos"]
    # no overlap: every step computed one request (each prompt fits one chunk, then one token a step)
    assert kvos["extra"]["steps"] == kvos["generated_tokens"] == 2 * 128
    assert kvos["ttft_p99"] < kvos["wall_seconds"] / 2       # the second request's TTFT starts at its hand-over


@pytest.mark.slow
def test_quick_json_with_the_real_model():
    report = bench("--quick", "--systems", "kvos", "--tokens")
    rows = _check_report(report, "mixed", 16)
    _, outputs = workloads.mixed_lengths()
    assert [len(rows["kvos"]["tokens"][f"{i}.0"]) for i in range(16)] == outputs[:16]
    assert report["settings"]["gguf"].endswith(".gguf")


# -- the profiler -----------------------------------------------------------------------------------------
def test_profile_categories_name_functions_that_exist():
    """A renamed or moved function would drop out of the profile without a word: every
    (file, function) a category names is defined in that file."""
    from userspace.bench.profile import CATEGORIES
    for _, how, patterns in CATEGORIES:
        if how != "tot":
            for path, func in patterns:
                assert re.search(rf"^\s*def {func}\(", (ROOT / path).read_text(), re.M), (path, func)


@pytest.mark.parametrize("loop", ["c", "python"])
def test_profile_on_the_tiny_model(loop):
    out = subprocess.run([sys.executable, "-m", "userspace.bench.profile", "--model", "tiny-llama", "--memory",
                          "8MiB", "--quick", "--threads", "1"] + (["--python-loop"] if loop == "python" else []),
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    seconds = {line[:48].strip(): float(line[48:].split()[0]) for line in out.stdout.splitlines()
               if line.startswith("  ") and line[48:].strip().endswith("%")}
    ops = ("attention (C paged_attention)", "matmul (C panel_mm, float32)")
    for name in ("scheduler", "batch building", "sampling", "commit (append_token, stop checks, exits)") + (
            ops if loop == "python" else ("layers in one C call (csrc/cpu/layers.c)",)):
        assert seconds[name] > 0, name                    # the step ran under cProfile, in trace()
    if loop == "c":     # inside the one C call (what is left: the LM head, the step's argument checks)
        assert all(seconds[name] < seconds["layers in one C call (csrc/cpu/layers.c)"] for name in ops)
    assert re.search(r"16 sequences, [1-9]\d* steps, .* s in Kernel\.step", out.stdout)
    assert "steps by shape" in out.stdout and "with prefill" in out.stdout


# -- devices -------------------------------------------------------------------------------------

def test_device_names_are_checked():
    from userspace.bench.cli import check_device
    check_device("cpu")
    for bad in ("gpu", "cpu:0", "cuda:x", "tpu"):
        with pytest.raises(KvosError) as err:
            check_device(bad)
        assert err.value.errno == "EINVAL"


def test_cpu_only_rows_are_skipped_on_cuda_with_a_reason():
    from userspace.bench.cli import CPU_ONLY, _skip_reason
    for name in ("llama.cpp", "kvos-gguf", "kvos-bf16kv"):
        assert _skip_reason(name, Path("m.gguf"), "cuda") == CPU_ONLY[name]
    assert _skip_reason("kvos", None, "cuda") is None and _skip_reason("kvos-bf16", None, "cuda") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
@pytest.mark.parametrize("command", [["-m", "userspace.bench"], ["-m", "userspace.shell.main", "bench"]])
def test_cuda_without_a_gpu_is_refused_in_one_line(command):
    out = subprocess.run([sys.executable, *command, "--device", "cuda", "--model", "tiny-llama", "--quick"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "ENODEV" in lines[0] and "no CUDA GPU" in lines[0], out.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kvos_rows_on_cuda_match_the_cpu():
    """kvos (float32) on the GPU generates the CPU's tokens; kvos-bf16 runs; the ceiling is the GPU's."""
    common = ("--quick", "--model", "tiny-llama", "--memory", "8MiB", "--tokens", "--systems")
    gpu = bench("--device", "cuda", *common, "kvos,kvos-bf16,kvos-gguf")
    cpu = bench(*common, "kvos")
    rows = {r["system"]: r for r in gpu["table"]}
    assert rows["kvos"]["ok"] and rows["kvos-bf16"]["ok"] and rows["kvos-gguf"]["skipped"]
    assert "on cuda" in rows["kvos"]["mode"] and "float32 matmuls, float32 KV" in rows["kvos"]["mode"]
    assert "bfloat16 matmuls, bfloat16 KV" in rows["kvos-bf16"]["mode"]
    assert rows["kvos"]["tokens"] == cpu["table"][0]["tokens"]
    ceiling = gpu["machine"]["ceiling"]
    assert ceiling["ok"] and ceiling["device"] == "cuda" and ceiling["read_bytes_per_s"] > 0
    assert rows["kvos"]["roofline_fraction"] > 0
