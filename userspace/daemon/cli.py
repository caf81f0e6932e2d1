"""`kvos serve` and the attachment of the /proc commands to a running daemon.

add_parsers(subparsers) adds `serve`; add_attach_options(parser) adds --url and
--key to a command; connect(url, key) returns a Client. A key comes from --key,
$KVOS_KEY, or the root key a local daemon leaves in its runtime file.
`python -m userspace.daemon serve ...` runs the same parser on its own.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from urllib.parse import urlsplit

from userspace.shell.options import add_boot_options, boot_options, export_program_options

DEFAULT_URL = "http://127.0.0.1:8000"


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="run kvosd: the syscalls over HTTP, an OpenAI-compatible API, /metrics",
        description="Boot a kernel, start the tenants (one of --model, or those of --tenants FILE) and serve "
                    "the syscall table under /sys, an OpenAI-compatible API under /v1 and Prometheus metrics at "
                    "/metrics. SIGTERM or Ctrl-C stops admitting, finishes (or with --kill-on-shutdown kills) "
                    "running processes, frees everything, runs fsck and exits 0.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--tenants", metavar="FILE", help="tenants file (JSON or .toml): root key, tenants with "
                                                     "model, name, key, weight, mem_limit, ... (docs/daemon.md)")
    p.add_argument("--model", default="smollm2-135m",
                   help="the one tenant's model when there is no --tenants file (default smollm2-135m)")
    p.add_argument("--kill-on-shutdown", action="store_true",
                   help="at SIGTERM/SIGINT kill running processes instead of letting them finish")
    p.add_argument("--shutdown-timeout", type=float, default=None, metavar="SECONDS",
                   help="at shutdown, kill what still runs after this long (default: wait)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_boot_options(p, model=False, token_budget=512, memory_default="the device's")
    p.set_defaults(func=serve_main)


def add_attach_options(parser) -> None:
    """--url and --key, for commands that look at a running daemon."""
    parser.add_argument("--url", default=None, help=f"a running kvosd (default $KVOS_URL or {DEFAULT_URL})")
    parser.add_argument("--key", default=None, help="bearer key (default $KVOS_KEY, or a local daemon's root key)")


def config_from_args(args):
    from userspace.daemon.config import DaemonConfig, default_specs, read_tenants_file, tenant_specs
    generated: dict = {}
    if args.tenants:
        specs, root_key = tenant_specs(read_tenants_file(args.tenants), generated)
    else:
        specs, root_key = default_specs(args.model, generated)
    return DaemonConfig(boot=boot_options(args), tenants=specs, root_key=root_key,
                        kill_on_shutdown=args.kill_on_shutdown, shutdown_timeout=args.shutdown_timeout,
                        generated_keys=generated)


def serve_main(args) -> int:
    from kernel.errors import KvosError
    from userspace.daemon.server import serve
    if args.threads is not None:         # the model loader applies $KVOS_THREADS at each load: agree with it
        os.environ["KVOS_THREADS"] = str(args.threads)
    export_program_options(args)
    try:
        config = config_from_args(args)
        return serve(config, host=args.host, port=args.port, log_level=args.log_level)
    except KvosError as err:
        print(f"kvosd: {err}", file=sys.stderr)
        return err.code
    except OSError as err:               # the port is taken, the address is not ours
        print(f"kvosd: cannot listen on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return 1


def local_key(url: str) -> str | None:
    """The root key a daemon on this machine left for `url`, if there is one we may read."""
    from userspace.daemon.config import runtime_file
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    try:
        with open(runtime_file(parts.port or 80)) as f:
            return json.load(f).get("root_key")
    except (OSError, ValueError):
        return None


def connect(url: str | None = None, key: str | None = None):
    """A Client for a running kvosd: url from the argument, $KVOS_URL or the default; key from the
    argument, $KVOS_KEY, or the local daemon's runtime file (then it acts as root)."""
    from userspace.daemon.client import Client
    url = url or os.environ.get("KVOS_URL") or DEFAULT_URL
    url = url if "://" in url else f"http://{url}"
    key = key or os.environ.get("KVOS_KEY") or local_key(url)
    return Client(url, key)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m userspace.daemon", description="kvosd, the kvos daemon")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_parsers(sub)
    args = parser.parse_args(argv)
    return args.func(args)
