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
    assert 7.0 < r["decode_step_ms_batch1"] < 9.5
    assert 100 < r["crossover_weights_only"] < 200
    steps = [s for s in r["decode_steps"] if s["gpu"] == "a100-80g"]
    assert steps[-1]["batch"] == 256 and steps[-1]["step_ms"] < 4 * steps[0]["step_ms"]   # batching is cheap
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
