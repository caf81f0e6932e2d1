"""`kvos serve --replicas 2 --address ADDR` joins a Ray cluster that is already running.

A real Ray head is started for the test (`ray start --head --port=0 --block`, its own temp dir
and process group, torn down after); the gateway runs as its own process with --address
pointing at it, serves a completion and a `ps`, and a separate driver connected to that cluster
finds the two replica actors alive there, on the head's node, holding its CPUs.
"""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

pytest.importorskip("ray")

from userspace.daemon.client import Client  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")
ROOT, KEY = "root-key-address", "tenant-key-address"

pytestmark = pytest.mark.slow


def _env(**extra):
    """Token authentication on for the head, the gateway and the probe alike: recent Ray turns it on
    for `ray start --head` by default, and a driver joining by address only sends the token (from
    ~/.ray/auth_token, which the head creates if missing) with RAY_AUTH_MODE=token."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
            "KVOS_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", **extra}


def _stop_group(proc, grace=10.0):
    """SIGTERM the process group we started, then SIGKILL what is left of it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(10)


@pytest.fixture
def ray_head():
    """A Ray head of its own: (address, temp dir). Short temp path: Ray's socket paths must fit 107 bytes."""
    tmp = tempfile.mkdtemp(prefix="kvray-", dir="/tmp")
    head = subprocess.Popen([str(RAY), "start", "--head", "--port=0", f"--temp-dir={tmp}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats", "--block"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    marker = Path(tmp) / "ray_current_cluster"
    try:
        deadline = time.monotonic() + 120
        while not (marker.exists() and marker.read_text().strip()):
            if head.poll() is not None:
                pytest.fail(f"ray start --head exited {head.returncode}:\n{head.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("ray start --head: no cluster address after 120 s")
            time.sleep(0.2)
        time.sleep(1.0)                                     # the file is written just before the raylet is up
        yield marker.read_text().strip(), tmp
    finally:
        _stop_group(head)
        subprocess.run(["rm", "-rf", tmp], check=False)


def _serve(address, log, **env):
    proc = subprocess.Popen([sys.executable, "-m", "kvos", "serve", "--replicas", "2", "--address", address,
                             "--router", "round_robin", "--model", "tiny-llama", "--api-key", KEY, "--port", "0",
                             "--memory", "8MiB", "--threads", "1", "--log-level", "info"],
                            cwd=REPO, env=_env(KVOS_ROOT_KEY=ROOT, XDG_RUNTIME_DIR=tempfile.mkdtemp(), **env),
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    found = threading.Event()
    url = []

    def drain():
        for line in proc.stderr:
            log.append(line)
            m = not url and re.search(r" at (http://\S+) ", line)
            if m:
                url.append(m.group(1))
                found.set()
        found.set()
    threading.Thread(target=drain, daemon=True).start()
    found.wait(120)
    return proc, (url[0] if url else None)


def _health(url) -> int:
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


# What a separate driver sees in the cluster: its nodes, the live actors (class, node; read from the
# GCS's actor table: the state API would need the dashboard, which the head runs without), its CPUs.
PROBE = """
import json, ray
ray.init(address={address!r}, log_to_driver=False)
actors = [dict(cls=a["ActorClassName"], node=a["Address"]["NodeID"])
          for a in ray._private.state.actors().values() if a["State"] == "ALIVE"]
print(json.dumps(dict(nodes=[n["NodeID"] for n in ray.nodes() if n["Alive"]], actors=actors,
                      cpus=ray.cluster_resources().get("CPU"), free=ray.available_resources().get("CPU", 0.0))))
"""


def test_the_gateway_joins_a_running_ray_cluster(ray_head):
    address, tmp = ray_head
    log: list = []
    gateway, url = _serve(address, log)
    try:
        assert url, "kvos serve did not start:\n" + "".join(log)
        deadline = time.monotonic() + 180
        while _health(url) != 200:                          # 503 until Ray and both kernels are up
            assert gateway.poll() is None and time.monotonic() < deadline, "".join(log)
            time.sleep(0.5)
        with Client(url, ROOT) as root:
            client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
            out = client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=6, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == 6
            tid = {t.name: t.tid for t in root.schedstat().tenants}["tiny-llama"]
            pids = [root.spawn(tid, [1, 5, 6, 7], max_tokens=64, ignore_eos=True) for _ in range(2)]
            rows = root.ps()
            assert {r.replica for r in rows if r.pid in pids} == {0, 1}       # round robin: one on each
            for pid in pids:
                root.wait(pid)
        probe = subprocess.run([sys.executable, "-c", PROBE.format(address=address)], env=_env(),
                               capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0, probe.stderr
        seen = json.loads(probe.stdout.strip().splitlines()[-1])
        replicas = [a for a in seen["actors"] if a["cls"] == "Replica"]
        assert len(seen["nodes"]) == 1 and len(replicas) == 2                   # in *that* cluster
        assert {a["node"] for a in replicas} == set(seen["nodes"])
        assert seen["cpus"] == 2 and seen["free"] == 0                         # one CPU each, as placed
    finally:
        if gateway.poll() is None:
            gateway.send_signal(signal.SIGTERM)
            try:
                gateway.wait(60)
            except subprocess.TimeoutExpired:
                pass
        _stop_group(gateway)
    assert gateway.returncode == 0, "".join(log[-30:])


def test_a_gateway_without_the_clusters_token_says_so(ray_head):
    """Joining without RAY_AUTH_MODE=token fails in Ray's connect; the gateway names the cause
    (ENODEV, not the 'cannot listen on the port' an OSError would read as) and exits."""
    address, _ = ray_head
    log: list = []
    gateway, _ = _serve(address, log, RAY_AUTH_MODE="disabled")
    try:
        assert gateway.wait(180) == 19                                    # ENODEV's status
        text = "".join(log)
        assert f"cannot join the Ray cluster at {address}" in text and "RAY_AUTH_MODE=token" in text
        assert "cannot listen" not in text
    finally:
        _stop_group(gateway)
