"""kvosd on tiny-llama and tiny-tools (tiny-llama under a template that takes tools), booted in a
thread for the tests that talk to it through the unmodified openai client; every frame must be back
when it stops."""
from contextlib import contextmanager

import openai
import pytest

from tests.helpers import tiny_tools
from userspace.daemon.config import DaemonConfig, TenantSpec
from userspace.daemon.listen import ServerThread

MODEL = "tiny-llama"


@contextmanager
def serving(key: str, tools_key: str, root_key: str):
    """A ServerThread with tenant MODEL (key) and tenant "tools" (tools_key); stopped clean."""
    tiny_tools.register()
    srv = ServerThread(DaemonConfig(boot=dict(device="cpu", memory="8MiB", threads=1), root_key=root_key,
                                    tenants=[TenantSpec(MODEL, MODEL, key),
                                             TenantSpec("tools", tiny_tools.NAME, tools_key)]))
    try:
        yield srv
    finally:
        report = srv.stop()
    assert report["fsck"] == "clean" and report["frames_mapped"] == 0


@contextmanager
def client_of(srv, key: str):
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)
    try:
        yield c
    finally:
        c.close()


def server_fixture(key: str, tools_key: str, root_key: str):
    """A module-scoped `server` fixture serving(key, tools_key, root_key) for a test module."""
    @pytest.fixture(scope="module")
    def server(one_thread):
        with serving(key, tools_key, root_key) as srv:
            yield srv
    return server


def client_fixture(key: str, name: str = "client"):
    """A module-scoped fixture (named `name`) of an openai client with `key` on the module's server."""
    @pytest.fixture(scope="module", name=name)
    def client(server):
        with client_of(server, key) as c:
            yield c
    return client
