"""`kvos serve`, and the --url/--key options of the commands that look at a running daemon.

add_parsers(subparsers) adds `serve`; add_attach_options(parser) adds --url and --key to a
command (userspace/daemon/discovery.py finds the daemon they name, or the local one).
"""
from __future__ import annotations

import argparse
import os
import sys

from userspace.cluster.router import POLICIES
from userspace.daemon.config import DaemonConfig
from userspace.shell.options import add_boot_options, add_model_options, boot_options, export_program_options


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="run kvosd: the syscalls over HTTP, an OpenAI-compatible API, /metrics",
        description="Boot a kernel, bind the port (GET /health is 503 until ready), start the tenants (one of "
                    "--model, or those of --tenants FILE) and serve the syscall table under /sys, an "
                    "OpenAI-compatible API under /v1, /tokenize, /detokenize and Prometheus metrics at /metrics. "
                    "One tenant without --api-key or $KVOS_API_KEY is an open API (no key needed), on loopback "
                    "only unless --allow-open. SIGTERM or Ctrl-C stops admitting, finishes (or with "
                    "--kill-on-shutdown kills) running processes, frees everything, runs fsck and exits 0.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--tenants", metavar="FILE", help="tenants file (JSON or .toml): root key, tenants with "
                                                     "model, name, key, weight, mem_limit, ... (docs/daemon.md)")
    add_model_options(p, help_prefix="the one tenant's model when there is no --tenants file")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="the bearer key of the one tenant (default $KVOS_API_KEY); with neither, and no "
                        "--tenants file, the API is open: no key is needed (refused beyond loopback without "
                        "--allow-open)")
    p.add_argument("--allow-open", action="store_true",
                   help="serve an open API (no key) on an address other machines reach")
    p.add_argument("--kill-on-shutdown", action="store_true",
                   help="at SIGTERM/SIGINT kill running processes instead of letting them finish")
    p.add_argument("--shutdown-timeout", type=float, default=None, metavar="SECONDS",
                   help="at shutdown, kill what still runs after this long (default: wait)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="the log's threshold on stderr (default info: startup, loading, one line per request, "
                        "the kernel's warnings; debug adds every kernel log line)")
    p.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="log lines as text, or one JSON object each (default text)")
    limits = p.add_argument_group("HTTP limits and TLS (docs/daemon.md, \"Limits\")")
    d = DaemonConfig
    limits.add_argument("--max-body-bytes", type=_positive(int), default=d.max_body_bytes, metavar="N",
                        help=f"largest request body; a larger one is 413 E2BIG, unread (default {d.max_body_bytes})")
    limits.add_argument("--max-header-bytes", type=_positive(int), default=d.max_header_bytes, metavar="N",
                        help=f"largest request line and headers (default {d.max_header_bytes})")
    limits.add_argument("--header-timeout", type=_positive(float), default=d.header_timeout, metavar="SECONDS",
                        help=f"close a connection that has not sent a whole request head by then "
                             f"(default {d.header_timeout:g})")
    limits.add_argument("--keep-alive-timeout", type=_positive(float), default=d.keep_alive_timeout,
                        metavar="SECONDS", help=f"close a connection idle between requests this long "
                                                f"(default {d.keep_alive_timeout:g})")
    limits.add_argument("--max-connections", type=_positive(int), default=d.max_connections, metavar="N",
                        help=f"connections open at once; more are answered 503 (default {d.max_connections})")
    limits.add_argument("--ssl-keyfile", metavar="FILE", help="TLS private key (PEM); needs --ssl-certfile")
    limits.add_argument("--ssl-certfile", metavar="FILE", help="TLS certificate chain (PEM): serve https")
    cluster = p.add_argument_group("replicas on Ray (docs/cluster-replicas.md; pip install 'kvos[cluster]')")
    cluster.add_argument("--replicas", type=_positive(int), default=None, metavar="N",
                         help="serve N kernels, each a Ray actor with the boot options below, behind one "
                              "gateway (default: one kernel in this process, no Ray)")
    cluster.add_argument("--router", default=None, choices=tuple(POLICIES),
                         help="where new processes go: round_robin, least_load, cache_aware (the default: "
                              "the replica holding the longest prefix unless load is imbalanced, as SGLang's "
                              "router), prefix_events (the same rule over the replicas' own page-cache events, "
                              "as llm-d)")
    cluster.add_argument("--address", default=None, metavar="ADDR",
                         help="join the running Ray cluster at ADDR (e.g. auto, or HOST:6379) instead of "
                              "starting a local Ray instance")
    add_boot_options(p, model=False, token_budget=512, memory_default="the device's", sim=True)
    p.set_defaults(func=serve_main)


def add_attach_options(parser) -> None:
    """--url and --key, for commands that look at a running kvosd."""
    parser.add_argument("--url", default=None, help="a running kvosd (default $KVOS_URL, else the one kvosd "
                                                    "running on this machine, found through its runtime file)")
    parser.add_argument("--key", default=None, help="bearer key (default $KVOS_KEY, or a local daemon's root key)")


def _positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def config_from_args(args):
    from kernel.errors import EINVAL, KvosError
    from userspace.daemon.config import default_specs, read_tenants_file, tenant_specs
    generated: dict = {}
    if args.tenants:
        if args.api_key:
            raise KvosError(EINVAL, "--api-key keys the one tenant of --model; a --tenants file gives each "
                                    "tenant its key")
        specs, root_key = tenant_specs(read_tenants_file(args.tenants), generated)
    else:
        specs, root_key = default_specs(args.model, generated, api_key=args.api_key)
    return DaemonConfig(boot=boot_options(args), tenants=specs, root_key=root_key,
                        kill_on_shutdown=args.kill_on_shutdown, shutdown_timeout=args.shutdown_timeout,
                        generated_keys=generated, max_body_bytes=args.max_body_bytes,
                        max_header_bytes=args.max_header_bytes, header_timeout=args.header_timeout,
                        keep_alive_timeout=args.keep_alive_timeout, max_connections=args.max_connections,
                        ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, allow_open=args.allow_open)


def serve_main(args) -> int:
    from kernel.errors import EINVAL, KvosError
    from userspace.daemon import logs
    from userspace.daemon.listen import serve
    if args.threads is not None:         # the model loader applies $KVOS_THREADS at each load: agree with it
        os.environ["KVOS_THREADS"] = str(args.threads)
    export_program_options(args)
    logs.configure(args.log_level, args.log_format)
    try:
        config = config_from_args(args)
        for who, key in config.generated_keys.items():      # shown once, here, never in the log
            print(f"kvosd: {who} key: {key}", file=sys.stderr, flush=True)
        if args.replicas is None:
            if args.router is not None or args.address is not None:
                raise KvosError(EINVAL, "--router and --address go with --replicas N")
            return serve(config, host=args.host, port=args.port, log_level=args.log_level)
        from userspace.cluster import gateway
        return gateway.serve(config, args.replicas, router=args.router or "cache_aware", address=args.address,
                             host=args.host, port=args.port, log_level=args.log_level)
    except KvosError as err:
        print(f"kvosd: {err}", file=sys.stderr)
        return err.code
    except OSError as err:               # the port is taken, the address is not ours
        print(f"kvosd: cannot listen on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return 1
