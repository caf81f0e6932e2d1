"""The docs' tables against what they describe: docs/shell.md's commands and kernel options against
the parser, docs/daemon.md's routes against the OpenAPI, its flags against `kvos serve --help`, its
limits and metrics tables against the limits and a scrape, docs/simulator.md's flags against
`kvos sim`'s. A command, route, flag or metric added or removed without its row fails here."""
import argparse
import re
from pathlib import Path

import pytest

from userspace.shell.main import build_parser

DOCS = Path(__file__).resolve().parent.parent / "docs"


def table(doc: str, header: str) -> list:
    """The rows (lists of cells) of the first table in docs/<doc> whose header row starts with `header`."""
    lines = (DOCS / doc).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| " + header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def section(doc: str, title: str) -> str:
    text = (DOCS / doc).read_text()
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start:end if end > 0 else None]


def commands() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def options(parser, group: str | None = None) -> set:
    actions = parser._actions if group is None else next(
        g for g in parser._action_groups if g.title == group)._group_actions
    return {o for a in actions for o in a.option_strings if o.startswith("--")} - {"--help"}


def expand(name: str) -> set:
    """kvos_{a,b}_x -> {kvos_a_x, kvos_b_x}"""
    m = re.search(r"\{([^}]*)\}", name)
    if not m:
        return {name}
    return {x for part in m.group(1).split(",") for x in expand(name[:m.start()] + part + name[m.end():])}


def test_shell_md_lists_every_command():
    documented = {word for row in table("shell.md", "command") for word in re.findall(r"`kvos (\w+)", row[0])}
    assert documented == set(commands())


def test_shell_md_kernel_options_are_the_parsers():
    documented = {o for row in table("shell.md", "option | default") for o in re.findall(r"`(--[\w-]+)`", row[0])}
    assert documented == options(commands()["run"], "kernel options")


def test_daemon_md_routes_are_the_openapi_paths(tmp_path):
    from userspace.daemon.config import DaemonConfig, TenantSpec
    from userspace.daemon.server import Daemon
    daemon = Daemon(DaemonConfig(boot=dict(device="cpu", memory="1MiB"), tenants=[TenantSpec("t", "tiny-llama", None)],
                                 root_key="root-key-docs"))
    try:
        spec = daemon.app.openapi()
    finally:
        daemon.close()
    served = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    documented = set()
    for row in table("daemon.md", "route"):
        for method, path in re.findall(r"`(GET|POST|DELETE) (/[^`]*)`", row[0]):
            if path == "/sys/{name}":
                documented |= {("POST", p) for p in spec["paths"] if p.startswith("/sys/")}
            elif path not in ("/openapi.json", "/docs"):            # FastAPI's own pages, not in the schema
                documented.add((method, path))
    assert documented == served


def test_daemon_md_flags_are_kvos_serves():
    serve = options(commands()["serve"])
    text = (DOCS / "daemon.md").read_text()
    mentioned = set(re.findall(r"(--[a-z][\w-]+)", section("daemon.md", "## Running it")))
    assert mentioned <= serve, mentioned - serve
    kernel_options = options(commands()["run"], "kernel options")      # documented in shell.md
    assert {o for o in serve if o not in text} <= kernel_options, {o for o in serve if o not in text}
    limits = {o for row in table("daemon.md", "limit | flag") for o in re.findall(r"`(--[\w-]+)`", row[1])}
    assert limits == options(commands()["serve"], 'HTTP limits and TLS (docs/daemon.md, "Limits")') - {
        "--ssl-keyfile", "--ssl-certfile"}


@pytest.mark.usefixtures("one_thread")
def test_daemon_md_metrics_are_a_scrapes():
    from prometheus_client.parser import text_string_to_metric_families

    import kernel
    from userspace.daemon.metrics import Metrics
    k = kernel.boot(device="cpu", memory="1MiB")
    try:
        root = k.syscalls()
        root.spawn_tenant("tiny-llama")
        families = text_string_to_metric_families(Metrics(root).render().decode())
        scraped = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    finally:
        k.shutdown()
    documented = {name for row in table("daemon.md", "family | type") for cell in re.findall(r"`([^`]+)`", row[0])
                  for name in expand(cell)}
    assert documented == scraped
    mapped = {m for row in table("daemon.md", "vLLM | kvos") for m in re.findall(r"\b(kvos_\w+)", row[1])}
    assert mapped <= scraped, mapped - scraped


def test_simulator_md_flags_are_kvos_sims():
    block = section("simulator.md", "## Commands")
    assert set(re.findall(r"(--[a-z][\w-]+)", block)) <= options(commands()["sim"])
