"""kvosd as its own process (`python -m kvos serve`): tenants files, keys, the
runtime file local clients read, and SIGTERM/SIGINT ending in a clean fsck and exit 0."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from kernel.errors import EINVAL, ENOENT, KvosError
from userspace.daemon import discovery
from userspace.daemon.config import default_specs, read_tenants_file, tenant_specs
from userspace.daemon.runtime import runtime_file
from userspace.shell.main import main as shell_main

REPO = Path(__file__).resolve().parent.parent


class Kvosd:
    """A kvosd child process on a free loopback port; its stderr is collected in `log`."""

    def __init__(self, tmp_path, *args, env=None):
        self.env = {**os.environ, "KVOS_THREADS": "1", "XDG_RUNTIME_DIR": str(tmp_path), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvos", "serve", "--port", "0", "--memory", "8MiB", "--threads", "1",
             "--log-level", "info", *args],
            cwd=REPO, env=self.env, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        self.log = []
        self.url = None
        started = threading.Event()

        def drain():                       # every line into log; the URL from "serving ... at URL (..."
            for line in self.proc.stderr:
                self.log.append(line)
                found = self.url is None and re.search(r" at (http://\S+) ", line)
                if found:
                    self.url = found.group(1)
                    started.set()
            started.set()
        self._drain = threading.Thread(target=drain, daemon=True)
        self._drain.start()
        started.wait(60)
        if self.url is None:
            self.kill()
            raise AssertionError("kvosd did not start:\n" + "".join(self.log))

    def stop(self, sig, timeout=60) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._drain.join(5)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._drain.join(5)
        self.proc.stderr.close()


def _stream(url, key, model, max_tokens, out):
    def run():
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
            chunks = list(client.completions.create(model=model, prompt="Keep going", max_tokens=max_tokens,
                                                    temperature=0, stream=True,
                                                    extra_body={"ignore_eos": True, "return_token_ids": True}))
            out["tokens"] = sum(len(c.choices[0].token_ids) for c in chunks)
            out["reasons"] = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        except Exception as exc:           # noqa: BLE001 -- the test asserts on it
            out["error"] = exc
    t = threading.Thread(target=run)
    t.start()
    return t


def _until(predicate, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_sigterm_finishes_running_requests_and_exits_0(tmp_path, monkeypatch):
    daemon = Kvosd(tmp_path, "--model", "tiny-llama",
                   env={"KVOS_ROOT_KEY": "root-key-process-test", "KVOS_API_KEY": "tenant-key-process-test"})
    try:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
        monkeypatch.delenv("KVOS_KEY", raising=False)
        root = discovery.connect(daemon.url)                 # the key comes from the daemon's runtime file
        assert root.whoami()["root"] and root.key == "root-key-process-test"
        assert oct(runtime_file(int(daemon.url.rsplit(":", 1)[1])).stat().st_mode & 0o777) == "0o600"
        out = {}
        t = _stream(daemon.url, "tenant-key-process-test", "tiny-llama", 300, out)
        _until(lambda: any(p.generated_tokens > 0 for p in root.ps()) or out)
        code = daemon.stop(signal.SIGTERM)
        t.join(30)
        root.close()
    finally:
        daemon.kill()
    log = "".join(daemon.log)
    assert code == 0, log
    assert out.get("tokens") == 300 and out.get("reasons") == ["length"], out    # it was let finish
    assert "fsck clean" in log and "frames back" in log
    assert not runtime_file(int(daemon.url.rsplit(":", 1)[1])).exists()


def test_a_tenants_file_and_sigint_with_kill_on_shutdown(tmp_path):
    tenants = tmp_path / "tenants.toml"
    tenants.write_text('[[tenants]]\nname = "alice"\nmodel = "tiny-llama"\nkey = "alice-key-process"\n'
                       'weight = 2\nmem_limit = "4MiB"\n\n'
                       '[[tenants]]\nname = "bob"\nmodel = "tiny-llama"\nkey_env = "BOB_KEY"\nmax_procs = 4\n')
    daemon = Kvosd(tmp_path, "--tenants", str(tenants), "--kill-on-shutdown", env={"BOB_KEY": "bob-key-process"})
    try:
        root_key = re.search(r"root key: (\S+)", "".join(daemon.log)).group(1)    # made up and shown once
        root = discovery.connect(daemon.url, root_key)
        assert sorted(t.name for t in root.schedstat().tenants) == ["alice", "bob"]
        assert [t.weight for t in root.schedstat().tenants if t.name == "alice"] == [2.0]
        with discovery.connect(daemon.url, "bob-key-process") as bob:
            assert bob.whoami()["name"] == "bob"
        out = {}
        t = _stream(daemon.url, "alice-key-process", "alice", 2000, out)
        _until(lambda: any(p.generated_tokens > 2 for p in root.ps()) or out)
        started = time.monotonic()
        code = daemon.stop(signal.SIGINT)
        t.join(30)
        root.close()
    finally:
        daemon.kill()
    assert code == 0, "".join(daemon.log)
    assert time.monotonic() - started < 20
    assert out.get("reasons") == ["killed"] and out["tokens"] < 2000, out
    assert "fsck clean" in "".join(daemon.log)


def test_tenants_files_are_checked(tmp_path, monkeypatch):
    def refused(data, reason):
        with pytest.raises(KvosError) as err:
            tenant_specs(data, {})
        assert err.value.errno == EINVAL and reason in err.value.reason, err.value.reason

    good = {"model": "tiny-llama", "key": "alice-key-0"}
    refused({"tenants": []}, "non-empty list")
    refused({"tenants": [good], "extra": 1}, "unknown key 'extra'")
    refused({"tenants": [{**good, "colour": "red"}]}, "unknown key 'colour'")
    refused({"tenants": [{"key": "alice-key-0"}]}, "'model'")
    refused({"tenants": [good, good]}, "already listed")
    refused({"tenants": [good, {**good, "name": "other"}]}, "same key")
    refused({"tenants": [{**good, "key": "short"}]}, "at least 8 characters")
    refused({"tenants": [{"model": "tiny-llama", "key_env": "KVOS_NOT_SET_ANYWHERE"}]}, "is not set")
    refused({"root_key": "root-key-0", "tenants": [{**good, "key": "root-key-0"}]}, "same key as 'root'")
    for name in ("root", "Root", "", " ", "al ice", "a/b", "é", "x" * 65, 7, None):
        refused({"tenants": [{**good, "name": name}]}, "tenant name")
    named = tenant_specs({"tenants": [{**good, "name": "a.b_c-9"}, {"model": "/models/My Model.gguf",
                                                                    "key": "other-key-0"}]}, {})[0]
    assert [s.name for s in named] == ["a.b_c-9", "My-Model"]             # a path's name is made valid
    assert default_specs("/weights/root", {})[0][0].name == "root-model"
    generated = {}
    specs, root_key = tenant_specs({"tenants": [{**good, "weight": 3, "mem_limit": "1MiB"}]}, generated)
    assert specs[0].name == "tiny-llama" and specs[0].options == {"weight": 3, "mem_limit": "1MiB"}
    assert generated == {"root": root_key}
    monkeypatch.setenv("KVOS_API_KEY", "api-key-from-env")
    specs, _ = default_specs("tiny-llama", {})
    assert specs[0].key == "api-key-from-env"

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(KvosError) as err:
        read_tenants_file(broken)
    assert err.value.errno == EINVAL and "does not parse" in err.value.reason
    (tmp_path / "t.json").write_text(json.dumps({"tenants": [good]}))
    assert tenant_specs(read_tenants_file(tmp_path / "t.json"), {})[0][0].key == "alice-key-0"
    assert shell_main(["serve", "--tenants", str(tmp_path / "missing.toml")]) == 2          # ENOENT
    assert shell_main(["serve", "--tenants", str(broken)]) == 22                             # EINVAL
    assert shell_main(["serve", "--model", "no-such-model", "--port", "0"]) == 2
    with pytest.raises(KvosError) as err:
        read_tenants_file(tmp_path / "missing.toml")
    assert err.value.errno == ENOENT


def test_a_stale_runtime_file_is_skipped_and_replaced_and_a_wide_address_warns(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("KVOS_URL", raising=False)
    keys = {"KVOS_ROOT_KEY": "root-key-stale-test", "KVOS_API_KEY": "tenant-key-stale-test"}
    first = Kvosd(tmp_path, "--model", "tiny-llama", "--host", "0.0.0.0", env=keys)
    try:
        log = "".join(first.log)
        assert "WITHOUT TLS" in log and log.count("WARNING kvosd:") >= 6, log      # loud, before serving
        port = int(first.url.rsplit(":", 1)[1])
        assert discovery.find_daemon() == (f"http://127.0.0.1:{port}", "root-key-stale-test")
        first.proc.kill()                                   # SIGKILL: no chance to remove its file
        first.proc.wait()
    finally:
        first.kill()
    assert runtime_file(port).exists()
    assert discovery.local_key(f"http://127.0.0.1:{port}") is None                   # clients skip it
    with pytest.raises(discovery.NoDaemon):
        discovery.find_daemon()
    second = Kvosd(tmp_path, "--model", "tiny-llama", "--port", str(port), env=keys)
    try:
        assert "removed a stale" in "".join(second.log)
        assert json.loads(runtime_file(port).read_text())["pid"] == second.proc.pid
        assert "WITHOUT TLS" not in "".join(second.log)                         # loopback: no warning
        with discovery.connect() as root:
            assert root.whoami()["root"]
        assert second.stop(signal.SIGTERM) == 0
    finally:
        second.kill()
    assert not runtime_file(port).exists()
