"""kvos sim cluster: the sessions workload, the cluster driver (N sim kernels behind the router) and
its command. A small run is in the normal suite; the sweep to 64 replicas is slow."""
import json

import numpy as np
import pytest

from kernel.errors import KvosError
from userspace.sim.cli import main
from userspace.sim.cluster import run_cluster
from userspace.sim.sessions import AZURE_CONV, LengthTable, generate, stats


def test_sessions_grow_share_system_prompts_and_fit_the_context():
    sessions, systems = generate(300, seed=1, max_context=4096)
    assert len(systems) == 8 and all(16 <= n <= 2048 for n in systems.values())
    used = [s.system_id for s in sessions]
    assert used.count(0) > used.count(7)                         # popularity falls with rank
    for s in sessions:
        assert 1 <= len(s.turns) <= 8 and len(s.thinks) == len(s.turns) - 1
        assert systems[s.system_id] + sum(u + o for u, o in s.turns) < 4096
    w = stats(sessions, systems)
    assert 2.0 < w["turns_mean"] < 4.5 and 100 < w["output_mean"] < 300
    assert generate(300, seed=1)[0] == sessions                  # seeded


def test_the_length_table_is_the_azure_trace_and_a_csv_replaces_it(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    table = LengthTable()
    outputs = table.sample(rng, "output", 20000)
    assert abs(np.median(outputs) - AZURE_CONV[50][1]) < 10 and outputs.max() <= 1000
    path = tmp_path / "trace.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens\n100,5\n100,5\n")
    monkeypatch.setenv("KVOS_TRACE_CSV", str(path))
    sessions, systems = generate(5, seed=0, user_scale=1.0)
    assert set(systems.values()) == {100} and all(o == 5 for s in sessions for _, o in s.turns)
    path.write_text("a,b\n1,2\n")
    with pytest.raises(KvosError) as err:
        generate(5)
    assert err.value.errno == "EINVAL"
    for bad in (dict(num=0), dict(num=3, systems=0), dict(num=3, turns=0.5), dict(num=3, rate=-1)):
        with pytest.raises(KvosError):
            generate(**bad)


def test_fixed_lengths_single_turns_and_even_popularity_give_a_benchmarks_shape():
    sessions, systems = generate(50, seed=4, systems=8, turns=1, system_len=1000, user_len=64, output_len=32,
                                 popularity="uniform", max_context=4096)
    assert set(systems.values()) == {1000} and all(s.turns == ((64, 32),) for s in sessions)
    counts = [sum(s.system_id == i for s in sessions) for i in range(8)]
    assert max(counts) - min(counts) <= 1                         # 50 over 8: six or seven each
    assert [s.system_id for s in sessions[:8]] != list(range(8))  # shuffled, not in turn
    assert generate(50, seed=4, system_len=1000, popularity="uniform")[0] == \
        generate(50, seed=4, system_len=1000, popularity="uniform")[0]                      # seeded
    for bad in (dict(system_len=0), dict(user_len=1.5), dict(output_len=True), dict(system_len=4096),
                dict(popularity="flat")):
        with pytest.raises(KvosError) as err:
            generate(3, **bad)
        assert err.value.errno == "EINVAL"


def test_in_a_prefill_bound_burst_with_many_groups_cache_aware_wins_throughput_and_hits():
    """The regime of SGLang's benchmark, small: 16 groups of 1,024-token prefixes, 8 single requests
    each, all at once, over 4 replicas. Round robin spreads each group over every replica."""
    shape = dict(system_len=1024, user_len=32, output_len=16, popularity="uniform")
    rr, ca = (run_cluster(4, p, per_replica=32, turns=1, systems=16, model="llama-3-8b", shape=shape, seed=5)
              for p in ("round_robin", "cache_aware"))
    assert rr["turns"] == ca["turns"] == 128 and ca["workload"]["prompt_mean"] == 1056
    assert ca["prefix_hit_rate"] > 1.3 * rr["prefix_hit_rate"]
    assert ca["output_tok_s"] > 1.2 * rr["output_tok_s"] and ca["ttft_p99"] < rr["ttft_p99"]


@pytest.mark.parametrize("policy", ["round_robin", "cache_aware", "prefix_events"])
def test_a_small_cluster_runs_every_turn_and_stays_consistent(policy):
    r = run_cluster(3, policy, per_replica=4, seed=2)          # fsck on every replica at the end
    w = r["workload"]
    assert r["turns"] == w["turns"] and sum(r["routed"]) == w["turns"]
    assert r["output_tokens"] == round(w["output_mean"] * w["turns"])
    assert 0 < r["prefix_hit_rate"] < 1 and r["ttft_p50"] <= r["ttft_p99"] and r["load_imbalance"] >= 1
    if policy == "round_robin":
        assert max(r["routed"]) - min(r["routed"]) <= 1


def test_routing_by_prefix_hits_more_than_round_robin():
    rr = run_cluster(3, "round_robin", per_replica=4, seed=3)
    ca = run_cluster(3, "cache_aware", per_replica=4, seed=3)
    pe = run_cluster(3, "prefix_events", per_replica=4, seed=3)
    assert ca["prefix_hit_rate"] > rr["prefix_hit_rate"] and pe["prefix_hit_rate"] > rr["prefix_hit_rate"]


def test_the_command(capsys, tmp_path):
    assert main(["cluster", "--replicas", "2", "--policy", "round_robin,least_load", "--sessions", "3", "--json",
                 "--plot-dir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in out["runs"]] == ["round_robin", "least_load"]
    assert out["ratios"][0]["throughput_x"] == 1.0 and (tmp_path / "sim-cluster.png").exists()
    assert main(["cluster", "--replicas", "2", "--policy", "cache_aware", "--sessions", "2", "--json", "--turns", "1",
                 "--systems", "2", "--system-len", "300", "--user-len", "20", "--output-len", "10",
                 "--popularity", "uniform", "--balance", "absolute", "--balance-frac", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    w = out["runs"][0]["workload"]
    assert out["shape"] == dict(system_len=300, user_len=20, output_len=10, popularity="uniform")
    assert out["router"]["balance"] == "absolute" and out["turns"] == 1.0
    assert w["turns"] == 4 and w["prompt_mean"] == 320 and w["output_mean"] == 10
    assert main(["cluster", "--replicas", "0"]) != 0
    assert main(["cluster", "--policy", "random"]) != 0
    assert "EINVAL" in capsys.readouterr().err


@pytest.mark.slow
def test_the_sweep_to_64_replicas():
    """N = 2, 8 and 64 with docs/cluster.md's sweep workload (4 sessions per replica): the prefix
    policy's hit rate stays high while round_robin's falls with N."""
    ratios = []
    for n in (2, 8, 64):
        rr = run_cluster(n, "round_robin", per_replica=4)
        ca = run_cluster(n, "cache_aware", per_replica=4)
        assert ca["turns"] == rr["turns"] == ca["workload"]["turns"]
        ratios.append(ca["prefix_hit_rate"] / rr["prefix_hit_rate"])
    assert 1.1 < ratios[0] < ratios[-1] and ratios[-1] > 1.5
