"""The one-shot commands: pull, run, chat, and the /proc views (ps, pagemap, meminfo, dmesg).

Each takes parsed arguments and returns an exit status. The /proc views print
what a syscall handle returns; connect() gives them one: the client of a running
kvosd (--url, $KVOS_URL, or the one daemon running on this machine, found through
its runtime file), or, only when asked with --local, a kernel booted here with a
short workload run into it, labelled as such. Both have the same methods (ps,
pagemap, meminfo, schedstat, dmesg), so the views never know.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

from rich.console import Console
from rich.markup import escape

from kernel.errors import EINVAL, KvosError
from userspace.shell import format as fmt
from userspace.shell import prompts
from userspace.shell.options import boot_kernel, spawn_tenant, status


def _json(obj) -> str:
    return json.dumps(asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj, default=str)


def _sampling(args) -> dict:
    params = dict(max_tokens=args.max_tokens, temperature=args.temperature)
    for key in ("top_p", "top_k", "seed"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    if args.stop:
        params["stop"] = args.stop
    from userspace.libc.structured import spawn_keys
    spec = {"json": _text_or_file(args.json_schema, "--json-schema"), "regex": args.regex, "choice": args.choice,
            "grammar": _text_or_file(args.grammar, "--grammar")}
    given = [_OPTION.get(kind, f"--{kind}") for kind, value in spec.items() if value is not None]
    if len(given) > 1:
        raise KvosError(EINVAL, f"give at most one of --json-schema, --regex, --choice, --grammar; "
                                f"got {', '.join(given)}")
    if given:
        params.update(spawn_keys(spec, name=lambda kind: _OPTION.get(kind, f"--{kind}")))
    return params


_OPTION = {"json": "--json-schema"}


def _spelled(args, sys, tid) -> dict:
    """The options that need the tenant's tokenizer, as spawn keys (after the kernel boots)."""
    if not args.bad_word:
        return {}
    from userspace.libc.bad_words import bad_words_ids
    return {"bad_words_ids": bad_words_ids(sys, tid, args.bad_word, "--bad-word")}


def _text_or_file(value, option: str):
    """The option's text, or the contents of the file it names as @FILE."""
    if value is None or not value.startswith("@"):
        return value
    try:
        with open(value[1:], encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        raise KvosError(EINVAL, f"{option} {value}: {err.strerror}") from None


def _prompt(text: str, args):
    if args.raw:
        return text
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return messages + [{"role": "user", "content": text}]


# -- pull -----------------------------------------------------------------------------------
def pull_main(args) -> int:
    from userspace.programs import fetch, hub
    if args.model == "tiny-llama":
        print("tiny-llama is built in (random weights); there is nothing to pull")
        return 0
    if hub.parse(args.model) is not None:           # into the Hugging Face hub cache
        print(hub.resolve(args.model))
        return 0
    path = fetch.pull(args.model, progress=sys.stderr.isatty())
    print(path)
    return 0


# -- run --------------------------------------------------------------------------------------
def read_prompts(args) -> list:
    """Prompts from the arguments, else from -f FILE ('-': stdin), else from stdin when it is not a
    terminal: one prompt per non-empty line."""
    found = list(args.prompts)
    if args.file == "-":
        found += sys.stdin.read().splitlines()
    elif args.file:
        with open(args.file, encoding="utf-8") as f:
            found += f.read().splitlines()
    elif not found and not sys.stdin.isatty():
        found = sys.stdin.read().splitlines()
    found = [line.strip() for line in found if line.strip()]
    if not found:
        raise KvosError(EINVAL, "no prompts: give them as arguments, with -f FILE, or on stdin")
    return found


def run_main(args) -> int:
    texts = read_prompts(args)
    params = _sampling(args)                        # bad options are refused before anything boots
    if args.prediction is not None:
        params["prediction"] = _text_or_file(args.prediction, "--prediction")
    k = boot_kernel(args)
    root = k.syscalls()
    tid = spawn_tenant(root, args.model)
    params.update(_spelled(args, root, tid))
    pids = [root.spawn(tid, _prompt(text, args), **params) for text in texts]
    _run_with_progress(root, len(pids) * args.max_tokens)
    console = Console(highlight=False, soft_wrap=True)
    failed = 0
    for pid, text in zip(pids, texts):
        st = root.wait(pid)
        failed += st.reason == "error"
        if args.json:
            print(json.dumps({"pid": pid, "prompt": text, "text": st.text, "token_ids": list(st.tokens),
                              "prompt_tokens": st.prompt_tokens, "finish_reason": st.reason, "error": st.error,
                              "timings": {"ttft": st.time_to_first_token, "elapsed": st.elapsed},
                              "prediction": {"accepted": st.accepted_prediction_tokens,
                                             "rejected": st.rejected_prediction_tokens}
                              if args.prediction is not None else None}), flush=True)
        else:
            ttft = f"first token after {st.time_to_first_token:.2f} s, " if st.time_to_first_token else ""
            console.print(f"[bold]\\[pid {pid}][/bold] {escape(text)}", markup=True)
            console.print(st.text, markup=False)
            console.print(f"[dim]({st.reason}{': ' + st.error if st.error else ''}, {len(st.tokens)} tokens, "
                          f"{ttft}{st.elapsed:.2f} s in all)[/dim]\n")
    return 1 if failed else 0


def _run_with_progress(root, total_tokens: int) -> None:
    """Step the kernel to the end here, with a progress bar on a terminal. No loop thread runs, so
    each trace() with a timeout runs the next step and returns its record; [] once nothing is left."""
    def steps():
        last = 0
        while records := root.trace(since=last, timeout=60):
            last = records[-1].step
            yield records
    if not sys.stderr.isatty():
        for _ in steps():
            pass
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    generated: dict = {}                      # pid -> tokens generated so far, from the step records
    with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                  TimeElapsedColumn(), console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task("run", total=total_tokens)
        for records in steps():
            generated.update((w.pid, w.generated) for r in records for w in r.works)
            bar.update(task, completed=min(sum(generated.values()), total_tokens))


# -- chat ------------------------------------------------------------------------------------------
CHAT_COMMANDS = {"/reset": "forget the conversation and start over (the process ends; its pages stay cached)",
                 "/exit": "end the chat (as /quit, an empty line or end of input do)",
                 "/help": "list these commands"}


def chat_main(args) -> int:
    from userspace.libc import Chat
    params = _sampling(args)
    k = boot_kernel(args)
    root = k.syscalls()
    tid = spawn_tenant(root, args.model)
    params.update(_spelled(args, root, tid))
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"kvos chat with {args.model}: /reset starts over, /exit, an empty line or Ctrl-D ends it "
              f"(/help).", file=sys.stderr)
    chat = Chat(root, tid, system=args.system, **params)
    try:
        while True:
            if interactive:
                print("you> ", end="", flush=True, file=sys.stderr)
            line = sys.stdin.readline().strip()
            if not line or line in ("/exit", "/quit"):    # only a whole line is a command: "/usr is" is text
                break
            if line == "/reset":
                chat.close()
                chat = Chat(root, tid, system=args.system, **params)
                print("kvos chat: the conversation starts over", file=sys.stderr, flush=True)
                continue
            if line == "/help":
                for name, what in CHAT_COMMANDS.items():
                    print(f"  {name:7s} {what}", file=sys.stderr)
                continue
            for piece in chat.send(line, stream=True):
                print(piece, end="", flush=True)
            print(flush=True)
    finally:
        chat.close()
    return 0


# -- /proc views --------------------------------------------------------------------------------------
@dataclass
class Connection:
    """A syscall handle to look at, and how to show a process's tokens as text."""
    sys: object
    decode: object                # decode(pid, token ids) -> str, or None


def daemon(args):
    """The client of the kvosd to ask: --url, $KVOS_URL, or the one running on this machine
    (userspace.daemon.discovery.find_daemon); with none, one line saying how to start or name one."""
    from userspace.daemon.discovery import connect as connect_daemon
    return connect_daemon(getattr(args, "url", None), getattr(args, "key", None))


LOCAL_NOTE = ("not a running kvosd: a fresh kernel booted by this command, running a short built-in workload "
              "for {steps} steps")


def local_marked(args, result):
    """A --json result, marked as the in-process kernel's when --local made one."""
    if not getattr(args, "local", False):
        return result
    return {"local": True, "note": LOCAL_NOTE.format(steps=args.steps), "result": result}


def connect(args) -> Connection:
    """A kernel to inspect: the running kvosd (see daemon()); only with --local, one booted here
    running a short workload (a shared system prompt in shm, a few chat requests, one fork) for
    --steps steps, so there is something to see, and said so on stderr."""
    if not getattr(args, "local", False):
        client = daemon(args)

        def remote_decode(pid, tokens):
            return None
        return Connection(client, remote_decode)
    if getattr(args, "url", None):
        raise KvosError(EINVAL, "--local inspects a kernel booted here: it takes no --url")
    print(f"kvos: --local: {LOCAL_NOTE.format(steps=args.steps)}", file=sys.stderr, flush=True)
    from userspace.shell.workload import split_system_prompt
    k = boot_kernel(args)
    root = k.syscalls()
    tid = spawn_tenant(root, args.model)
    questions = args.prompts or prompts.SMALL_WORKLOAD
    prefix, _ = split_system_prompt(root, tid, prompts.SYSTEM_PROMPT, "?")
    shmid = root.shmget(tid, prefix) if prefix else None
    pids = []
    for q in questions:
        head, rest = split_system_prompt(root, tid, prompts.SYSTEM_PROMPT, q)
        pids.append(root.spawn(tid, rest if shmid else head + rest, shm=shmid, max_tokens=args.max_tokens,
                               temperature=0))
    root.fork(pids[0], 1)
    with status(f"running {args.steps} steps of a short workload"):
        # No loop thread: each trace() with a timeout runs one step (shmget may have run some already).
        first = last = root.schedstat().steps
        while last - first < args.steps and (records := root.trace(since=last, timeout=60)):
            last = records[-1].step

    def decode(pid, tokens):                  # every process here is tid's
        return root.detokenize(tid, tokens)
    return Connection(root, decode)


def _print(renderable) -> None:
    """Tables at the terminal's width; 160 columns into a file or pipe rather than rich's 80."""
    Console(highlight=False, width=None if sys.stdout.isatty() else 160).print(renderable)


def ps_main(args) -> int:
    procs = connect(args).sys.ps()
    if args.json:
        print(json.dumps(local_marked(args, [asdict(p) for p in procs])))
    else:
        _print(fmt.ps_table(procs))
    return 0


def pagemap_main(args) -> int:
    conn = connect(args)
    pm = conn.sys.pagemap(args.pid, text=True)
    if args.json:
        print(_json(local_marked(args, asdict(pm))))
    else:
        _print(fmt.pagemap_table(pm, title=f"pagemap of pid {args.pid}"))
    return 0


def kill_main(args) -> int:
    daemon(args).kill(args.pid)
    return 0


def nice_main(args) -> int:
    print(daemon(args).nice(args.pid, args.inc))
    return 0


def meminfo_main(args) -> int:
    info = connect(args).sys.meminfo()
    if args.json:
        print(_json(local_marked(args, asdict(info))))
    else:
        _print(fmt.meminfo_table(info))
    return 0


def dmesg_main(args) -> int:
    entries = connect(args).sys.dmesg()
    if args.json:
        print(json.dumps(local_marked(args, [asdict(e) for e in entries])))
    else:
        for line in fmt.dmesg_lines(entries):
            print(line)
    return 0
