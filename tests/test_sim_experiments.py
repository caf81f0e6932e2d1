"""Every `kvos sim` experiment at its quick size: the JSON a reader checks, with sane values."""
import json

import pytest

from userspace.sim.cli import main
from userspace.sim.experiments import EXPERIMENTS, NAMES


@pytest.fixture(scope="module")
def results():
    return {}


def quick(results, name):
    if name not in results:
        module = EXPERIMENTS[name]
        results[name] = module.run_experiment(**module.QUICK)
    return results[name]


def test_memory_budget_and_roofline(results):
    r = quick(results, "memory")
    assert r["kv_bytes_per_token"] == 524_288
    assert 115_000 < r["kv_tokens"] < 125_000
    # the article's ~7 ms is 14 GB over 2 TB/s; the calibrated model reads weights at 78% of HBM bandwidth
    # and adds launch floors and the host (docs/simulator.md, Calibration): 10.7 ms
    assert 10.0 < r["decode_step_ms_batch1"] < 12.0
    assert 100 < r["crossover_weights_only"] < 200
    steps = [s for s in r["decode_steps"] if s["gpu"] == "a100-80g"]
    # batching is cheap: 256x the tokens for < 6x the step (K/V reads at 70% of HBM bandwidth and 40 us of
    # host per sequence are what grow; before calibration, with neither, it was < 4x)
    assert steps[-1]["batch"] == 256 and steps[-1]["step_ms"] < 6 * steps[0]["step_ms"]
    assert {(b["gpu"], b["model"]) for b in r["budgets"]} >= {("h200", "llama-2-13b"), ("a100-80g", "smollm2-135m")}


def test_batching_continuous_beats_static(results):
    r = quick(results, "batching")
    assert r["throughput_ratio"] > 1.5
    assert r["max_rate_continuous"] > r["max_rate_static"] > 0
    by_policy = {(p["policy"], p["rate"]): p for p in r["points"]}
    for rate in r["rates"]:
        assert by_policy[("continuous", rate)]["ttft_p50"] < by_policy[("static", rate)]["ttft_p50"]


def test_paging_utilization(results):
    r = quick(results, "paging")
    assert r["utilization_paged"] > 0.96 > r["utilization_oracle"]
    assert 0.1 < r["utilization_prealloc"] < r["utilization_pow2"] < r["utilization_oracle"]
    assert r["concurrent_paged"] > r["concurrent_prealloc"]
    assert r["offline_throughput_ratio"] > 1.5


def test_sharing_saves_memory(results):
    r = quick(results, "sharing")
    assert 0.3 < r["memory_saved_beam"] < 0.8
    assert 0.02 < r["memory_saved_parallel"] < r["memory_saved_beam"]
    assert r["offline_throughput_ratio_beam"] > 1.0
    assert all(s["cow_faults"] > 0 for s in r["savings"] if s["mode"] == "beam")


def test_padding_reproduces_the_worked_example(results):
    r = quick(results, "padding")
    assert r["padded_waste_tokens"] == 693
    assert r["padded_waste_tokens_8_decodes"] == 792
    assert r["ragged_waste_tokens"] == 0
    assert r["step_slowdown_padded"] > 2
    assert r["runs"]["ragged"]["padding_tokens"] == 0 < r["runs"]["padded"]["padding_tokens"]


def test_chunked_prefill_bounds_the_stall(results):
    r = quick(results, "chunked")
    assert r["max_stall_chunked"] < r["max_stall_whole"] / 2
    assert r["tbt_p99_chunked"] <= r["tbt_p99_whole"]
    smallest = r["points"][-1]                                      # many small chunks: the prompt waits longer
    assert smallest["chunk"] == 128 and smallest["prompt_ttft_mean"] > 1.1 * r["ttft_whole"]
    assert smallest["tbt_max"] < r["max_stall_whole"] / 2


def test_tp_cuts_a_70b_step_and_pays_for_it_in_all_reduces(results):
    r = quick(results, "tp")
    rows = {(x["model"], x["tp"], x["batch"]): x for x in r["decode"]}
    assert not rows[("llama-2-70b", 1, 1)]["fits"] and rows[("llama-2-70b", 2, 1)]["fits"]   # 138 GB of weights
    steps = [rows[("llama-2-70b", t, 1)]["step_ms"] for t in (2, 4, 8)]
    assert steps[0] > steps[1] > steps[2]
    eight = rows[("llama-2-70b", 8, 1)]
    assert eight["comm_ms"] > 0.2 * eight["step_ms"] and eight["scaling_efficiency"] < 0.8   # sublinear
    assert rows[("llama-2-7b", 1, 1)]["comm_ms"] == 0
    assert [x["tp"] for x in r["prefill"] if x["model"] == "llama-2-70b" and x["fits"]] == [2, 4, 8]


def test_run_reports_time_between_tokens_and_per_output_token(capsys):
    assert main(["run", "--preset", "alpaca", "--requests", "20", "--rate", "5", "--json", "--tp", "2"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["gpu"] == "a100-80g,tp=2" and run["completed"] == 20
    assert 0 < run["tbt_p50"] <= run["tbt_p99"] <= run["tbt_max"]
    assert run["tbt_p50"] <= run["tpot"] <= run["tbt_max"]          # a request's mean gap lies among the gaps


def test_speculate_pays_less_as_the_batch_grows(results):
    r = quick(results, "speculate")
    by = {(p["batch"], p["acceptance"]): p for p in r["points"]}
    one, many = by[(1, 0.8)], by[(64, 0.8)]
    assert one["speedup"] > 2.2 and 1.0 < many["speedup"] < one["speedup"]
    assert one["tpot"] < by[(1, None)]["tpot"] / 2
    assert all(0.45 < p["accepted_share"] < 0.8 for p in r["points"] if p["acceptance"])
    assert all(p["preemptions"] == 0 for p in r["points"])


def test_headlines_cover_every_experiment(results):
    assert list(EXPERIMENTS) == list(NAMES)            # the static list the parser offers is the real one
    for name, module in EXPERIMENTS.items():
        rows = module.headline(quick(results, name))
        assert rows and all(len(row) == 3 and all(isinstance(x, str) for x in row) for row in rows)
        assert module.tables(quick(results, name))


def test_cli_json_and_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["padding", "--quick", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["padded_waste_tokens"] == 693
    assert not list(tmp_path.iterdir())                       # no plot unless asked for with --plot-dir
    assert main(["padding", "--quick", "--json", "--plot-dir", str(tmp_path / "plots")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["padded_waste_tokens"] == 693
    assert (tmp_path / "plots" / "sim-padding.png").stat().st_size > 1000
    assert main(["run", "--preset", "alpaca", "--requests", "20", "--rate", "5", "--json", "--alloc", "prealloc",
                 "--max-tokens", "256"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["completed"] == 20 and run["boot"] == {"alloc": "prealloc"} and run["kv_utilization"] < 0.9
    assert main(["run", "--model", "gpt-5", "--requests", "2"]) == 2           # ENOENT's status
    assert "ENOENT" in capsys.readouterr().err
