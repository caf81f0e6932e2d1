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
