"""Options shared by the commands that boot a kernel, and the boot itself.

add_boot_options() puts --model, --device, --memory, --page-size, --policy,
--token-budget, --chunk, --swap, --threads, --tp, --speculate and --speculate-batch on
a subcommand; boot_kernel() turns them into a booted kernel. Models are loaded (and pulled on first use)
under a progress display on stderr, so stdout carries only the command's output.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

DEFAULT_MODEL = "smollm2-135m"
POLICIES = ("fcfs", "priority", "fair", "static")
DEMO_FRAMES, DEMO_SWAP_FRAMES = 40, 16       # a pool smaller than the workload; swap smaller than the excess
QUICK_FRAMES, QUICK_SWAP_FRAMES = 20, 8


def add_boot_options(parser: argparse.ArgumentParser, *, policy: str = "fcfs", memory: str | None = None,
                     memory_default: str = "the device's default", token_budget: int = 256,
                     chunk: int | None = None, swap: str | None = "1GiB", model: bool = True,
                     sim: bool = False) -> None:
    """model=False leaves --model to the command (kvos serve gives it its own meaning); sim=True
    offers the simulated GPU, which runs token ids only (commands that run text refuse it)."""
    g = parser.add_argument_group("kernel options")
    if model:
        add_model_options(g)
    if sim:
        g.add_argument("--device", default="cpu", help="cpu, cuda[:N] or sim:<gpu> (token-id prompts only; "
                                                       "default cpu)")
    else:
        g.add_argument("--device", default="cpu", type=text_device, help="cpu or cuda[:N] (default cpu)")
    g.add_argument("--memory", default=memory,
                   help="KV memory, e.g. 256MiB (default: " + (memory or memory_default) + ")")
    g.add_argument("--page-size", type=int, default=16, metavar="TOKENS", help="tokens per page (default 16)")
    g.add_argument("--policy", choices=POLICIES, default=policy, help=f"scheduling policy (default {policy})")
    g.add_argument("--token-budget", type=int, default=token_budget, metavar="TOKENS",
                   help=f"tokens computed per step at most (default {token_budget})")
    g.add_argument("--chunk", type=int, default=chunk, metavar="TOKENS",
                   help="tokens of one process per step at most: chunked prefill (default: the token budget)")
    g.add_argument("--swap", default=swap, help="host swap area, e.g. 64MiB or 0 (default " +
                   (swap or "--swap-frames frames") + ")")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch and the C kernels (default $KVOS_THREADS or torch's)")
    g.add_argument("--tp", type=int, default=None, metavar="N",
                   help="tensor parallel: split every layer over N processes on the cpu (gloo); the "
                        "model's query heads, KV heads and MLP width must divide by N; --memory and "
                        "--threads are per rank (default 1: one process, docs/cluster-tp.md)")
    g.add_argument("--speculate", type=int, default=None, metavar="K",
                   help="speculative decoding by prompt lookup: a decoding process whose last tokens occurred "
                        "earlier in its prompt or output computes up to K of the tokens that followed them in the "
                        "same step and keeps those its draws match (the same tokens; fewer steps where text "
                        "repeats its context), while at most --speculate-batch processes decode (default 0: off)")
    g.add_argument("--speculate-batch", type=int, default=None, metavar="N",
                   help="with --speculate: steps where more than N processes decode draft for none (default 8, "
                        "this project's CPU measure; a GPU's is larger, docs/simulator.md)")
    g.add_argument("--matmul", choices=("float32", "bfloat16"), default=None,
                   help="dtype of the linear layers on the CPU: bfloat16 is 1.1 to 2x faster per step "
                        "where the CPU has AMX, float32 matches Hugging Face token for token "
                        "(default $KVOS_MATMUL or float32)")
    g.add_argument("--weights", choices=("float32", "gguf"), default=None,
                   help="what the linear layers hold: gguf runs a GGUF file's own quantized blocks (Q4_0, Q4_1, "
                        "Q4_K, Q8_0; a quarter of the memory, bf16 GEMMs), float32 widens them and matches Hugging "
                        "Face token for token (default $KVOS_WEIGHTS or float32)")
    g.add_argument("--kv-dtype", choices=("float32", "bfloat16", "int8"), default=None,
                   help="dtype of the KV cache on the CPU: bfloat16 halves the bytes per token (twice the "
                        "tokens in the same memory); int8 stores each row as int8 codes and a float32 scale "
                        "(0.27x the bytes); float32 matches Hugging Face token for token (default $KVOS_KV "
                        "or float32)")


def text_device(name: str) -> str:
    """--device of a command that runs text: the simulated GPU has no weights and no tokenizer."""
    if name.startswith("sim"):
        raise argparse.ArgumentTypeError(
            f"{name}: the simulated GPU prices steps but holds no weights and no tokenizer, so it cannot run "
            f"text; use `kvos sim` (docs/simulator.md), or `kvos serve --device {name}` with token-id prompts")
    return name


def add_model_options(group, default: str = DEFAULT_MODEL, help_prefix: str = "model program") -> None:
    group.add_argument("--model", default=default,
                       help=f"{help_prefix}: a name (smollm2-135m, tiny-llama), a path (a .gguf file or a Hugging "
                            f"Face folder) or a Hugging Face hub id, ORG/NAME[@REVISION] or ORG/NAME:FILE.gguf, "
                            f"from the hub cache or downloaded (default {default})")
    group.add_argument("--gguf-file", default=None, metavar="FILE.gguf",
                       help="with a hub id: the GGUF file of that repository to load (the same as ORG/NAME:FILE.gguf)")


def boot_options(args, **overrides) -> dict:
    """kernel.boot() keyword arguments from parsed options (overrides win); options not given are
    left to boot()'s defaults."""
    options = dict(device=args.device, memory=args.memory, page_size=args.page_size, policy=args.policy,
                   token_budget=args.token_budget, swap=args.swap, chunk=args.chunk, threads=args.threads,
                   tp=getattr(args, "tp", None), speculate=getattr(args, "speculate", None),
                   speculate_batch=getattr(args, "speculate_batch", None))
    options.update(overrides)
    return {key: value for key, value in options.items() if value is not None}


def export_program_options(args) -> None:
    """Options the program loader reads from the environment as each tenant loads (--matmul, --kv-dtype, --weights)."""
    if getattr(args, "matmul", None):
        os.environ["KVOS_MATMUL"] = args.matmul
    if getattr(args, "kv_dtype", None):
        os.environ["KVOS_KV"] = args.kv_dtype
    if getattr(args, "weights", None):
        os.environ["KVOS_WEIGHTS"] = args.weights


def boot_kernel(args, **overrides):
    """A booted kernel for these options (imports torch: only commands that run a model pay for it)."""
    import kernel
    export_program_options(args)
    if getattr(args, "model", None):      # a model that cannot be had fails before anything boots
        pull_if_needed(args.model)
    with status("booting the kernel"):
        return kernel.boot(**boot_options(args, **overrides))


def pull_if_needed(model: str) -> None:
    """Download a named model not yet cached, or a hub id's files, with progress bars (the loader
    would fetch it silently while the first tenant starts). A hub id is found in its cache once per
    process, so the loader does not ask the hub again."""
    from userspace.programs import fetch, hub
    if model in fetch.MODELS and not fetch.cached_path(model).is_file():
        fetch.pull(model, progress=sys.stderr.isatty())
    elif hub.parse(model) is not None:
        hub.resolve(model)


def spawn_tenant(sys_handle, model: str, **kwargs) -> int:
    """spawn_tenant() under a progress display: the first tenant of a model loads it."""
    name = kwargs.get("name")
    pull_if_needed(model)                 # a download shows its own progress bars, not under the spinner
    with status(f"starting tenant {name} ({model})" if name else f"loading {model}"):
        return sys_handle.spawn_tenant(model, **kwargs)


@contextmanager
def status(message: str):
    """A spinner on a terminal's stderr, else one line saying what is happening."""
    if sys.stderr.isatty():
        from rich.console import Console
        with Console(file=sys.stderr).status(message + " ..."):
            yield
    else:
        print(f"kvos: {message} ...", file=sys.stderr, flush=True)
        yield


def add_sampling_options(parser, max_tokens: int) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N",
                   help=f"tokens to generate at most (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    g.add_argument("--bad-word", action="append", default=[], metavar="WORD",
                   help="never write this word (repeatable; as the model spells it alone and after a space)")
    g.add_argument("--system", default=None, metavar="TEXT", help="a system prompt for the chat template")
    g.add_argument("--raw", action="store_true", help="send prompts as plain text, without the chat template")
    g = parser.add_argument_group("structured output (at most one; every reply is valid under it, docs/shell.md)")
    g.add_argument("--json-schema", default=None, metavar="SCHEMA", help="a JSON Schema: its JSON text, or @FILE")
    g.add_argument("--regex", default=None, metavar="REGEX", help="the whole reply matches this regular expression")
    g.add_argument("--choice", action="append", default=None, metavar="TEXT",
                   help="the reply is one of these texts (repeatable)")
    g.add_argument("--grammar", default=None, metavar="GRAMMAR",
                   help="a Lark grammar (or a GBNF one, root ::= ...): its text, or @FILE")


def add_inspect_options(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the syscall's result as JSON")
    g = parser.add_argument_group("--local: a fresh kernel booted here instead of a running kvosd")
    g.add_argument("--local", action="store_true",
                   help="boot a kernel in this process, run a short built-in workload into it, and show that "
                        "(said so on stderr, and marked in --json output)")
    g.add_argument("prompts", nargs="*", help="with --local: prompts for the workload (default: a few built-in "
                                              "questions)")
    g.add_argument("--steps", type=int, default=6, help="with --local: kernel steps to run before looking "
                                                        "(default 6)")
    g.add_argument("--max-tokens", type=int, default=32, metavar="N",
                   help="with --local: max tokens of each request (default 32)")


def add_demo_options(parser, *, top: bool = False) -> None:
    add_boot_options(parser, policy="fair", token_budget=128, swap=None, memory_default="--frames frames")
    g = parser.add_argument_group("workload options")
    g.add_argument("--frames", type=int, default=None,
                   help=f"KV memory in frames of the model's pages, when --memory is not given "
                        f"(default {DEMO_FRAMES}; {QUICK_FRAMES} with --quick)")
    g.add_argument("--swap-frames", type=int, default=None,
                   help=f"swap area in frames, when --swap is not given (default {DEMO_SWAP_FRAMES}; "
                        f"{QUICK_SWAP_FRAMES} with --quick)")
    g.add_argument("--quick", action="store_true", help="a smaller, shorter workload (tests, tiny-llama)")
    g.add_argument("--chat-tokens", type=int, default=None, metavar="N", help="max tokens of each chat reply")
    g.add_argument("--batch-tokens", type=int, default=None, metavar="N", help="max tokens of each batch task")
    if top:
        parser.add_argument("--local", action="store_true",
                            help="watch a fresh kernel booted here, running the demo's workload (or the prompts "
                                 "given), instead of a running kvosd")
        parser.add_argument("prompts", nargs="*", help="with --local: prompts to run instead of the built-in "
                                                       "workload")
        parser.add_argument("--paused", action="store_true", help="with --local: start paused (space runs, "
                                                                  "s steps one slice)")
    else:
        out = parser.add_argument_group("output")
        out.add_argument("--json", action="store_true",
                         help="print the summary as one JSON object on stdout (no TUI; progress on stderr)")
        out.add_argument("--no-tui", action="store_true", help="plain progress lines even on a terminal")
        out.add_argument("--every", type=float, default=10.0, metavar="SECONDS",
                         help="seconds between progress lines when not on a terminal (default 10)")
