"""`kvos demo` and `kvos top`: boot a kernel too small for its workload, run it, show it.

Memory is sized in frames of the model's own pages (SmolLM2 in fp32 keeps
46,080 bytes per token, 720 KiB per 16-token frame), so the workload cannot
fit at once and preemption, swap and reclaim happen for real. The kernel runs
on its own loop thread (boot(loop=True), driven through loopctl); clients run
in theirs and a sampler reads the step records in another; the screen is the
TUI on a terminal, plain progress lines otherwise; the summary comes from
meminfo and schedstat.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from rich.console import Console

from kernel.errors import EINVAL, KernelPanic, KvosError
from userspace.shell.options import (
    DEMO_FRAMES,
    DEMO_SWAP_FRAMES,
    QUICK_FRAMES,
    QUICK_SWAP_FRAMES,
    boot_kernel,
    pull_if_needed,
    spawn_tenant,
)
from userspace.shell.report import Sampler, progress_line, render_summary, summarize
from userspace.shell.workload import Workload, WorkloadPlan, default_plan


@dataclass
class Session:
    kernel: object                # the booted Kernel: only for handles and shutdown()
    root: object                  # its root handle
    workload: Workload
    sampler: Sampler


def start_session(args, plan: WorkloadPlan) -> Session:
    """Boot with the loop running and a pool in frames of the model's own pages (the first tenant
    sizes them), create the tenants, start the sampler and the clients."""
    pull_if_needed(args.model)
    sizes = {}
    if args.memory:
        sizes["memory"] = args.memory
    else:
        sizes["frames"] = args.frames or (QUICK_FRAMES if args.quick else DEMO_FRAMES)
    if args.swap is not None:
        sizes["swap"] = args.swap
    else:
        sizes["swap_frames"] = args.swap_frames if args.swap_frames is not None else \
            (QUICK_SWAP_FRAMES if args.quick else DEMO_SWAP_FRAMES)
    k = boot_kernel(args, loop=True, **sizes)
    root = k.syscalls()
    workload = Workload(root, plan, args.model, handle=lambda tid: k.syscalls(as_tenant=tid))
    try:
        workload.create_tenants(spawn_tenant)
        sampler = Sampler(root).start()
        workload.start()
    except BaseException:
        k.shutdown(kill=True)
        raise
    return Session(k, root, workload, sampler)


def plan_from_args(args) -> WorkloadPlan:
    plan = default_plan(args.quick, chat_tokens=args.chat_tokens, batch_tokens=args.batch_tokens)
    if getattr(args, "prompts", None):
        plan = WorkloadPlan(chats=list(args.prompts), chat_tokens=plan.chat_tokens, arrival_every=0)
    return plan


def workload_status(workload: Workload):
    def line() -> str:
        if workload.done:
            return f"workload finished in {workload.wall_seconds:.0f} s: press q"
        return f"workload {len(workload.replies)}/{workload.expected_replies} replies, {workload.wall_seconds:.0f} s"
    return line


def run_tui(session: Session, paused: bool = False) -> None:
    from userspace.tui.app import KvosTop
    from userspace.tui.source import Source
    KvosTop(Source(session.root), status=workload_status(session.workload), start_paused=paused).run()


STALL_SECONDS = 30      # the kernel idle this long while clients still wait: a bug, reported, not a hang


class DemoStalled(RuntimeError):
    pass


def check_loop(root):
    """The loop's status; a loop a kernel bug stopped ends the demo as a kernel panic."""
    status = root.loopctl()
    if status.error is not None:
        raise KernelPanic(f"the kernel's loop stopped: {status.error}")
    return status


def run_plain(session: Session, every: float, out) -> None:
    """Progress lines every `every` seconds until the clients are done; a ps table now and then."""
    from userspace.shell.format import ps_table, render
    sys_root = session.root
    last = 0.0
    lines = 0
    while not session.workload.done:
        idle = check_loop(sys_root).idle_seconds
        now = time.monotonic()
        if idle is not None and idle > STALL_SECONDS:
            raise DemoStalled(f"the kernel has had nothing to run for {idle:.0f} s but "
                              f"{session.workload.clients_left} client(s) still wait: "
                              f"{progress_line(sys_root, session.workload)}")
        if now - last >= every:
            print(progress_line(sys_root, session.workload), file=out, flush=True)
            lines += 1
            if lines % 6 == 0:        # a periodic look at the process table
                print(render(ps_table(sys_root.ps()), width=110), file=out, flush=True)
            last = now
        time.sleep(0.05)
    print(progress_line(sys_root, session.workload), file=out, flush=True)


def finish(session: Session, model: str) -> dict:
    """The summary (of what ran, if the TUI was quit early), read with the loop paused; it stays
    paused, so the kernel can still be asked about what it did, until close()."""
    root = session.root
    check_loop(root)
    root.loopctl("pause")                    # the numbers hold still while they are read
    session.sampler.stop()                   # and it reads the last step records
    return summarize(root, session.workload, session.sampler, model=model, finished=session.workload.done)


def close(session: Session) -> None:
    """Clients still waiting are cancelled while the loop runs (a paused loop would leave their waits
    hanging), then the sampler stops and the kernel shuts down: its loop ends, fsck runs, and every
    frame must come back."""
    if not session.workload.done:
        session.root.loopctl("resume")
        session.workload.cancel()
    session.sampler.stop()
    session.kernel.shutdown(kill=True)


def run_demo(args, out=None, tui: bool = False) -> tuple[dict, Session]:
    """Run the demo to its end (or until the TUI is quit): (summary, session), its loop paused; the caller
    ends it with close(session). out takes the progress lines."""
    session = start_session(args, plan_from_args(args))
    try:
        if tui:
            run_tui(session)
        else:
            run_plain(session, args.every, out or sys.stdout)
    except BaseException:
        close(session)
        raise
    try:
        return finish(session, args.model), session
    except BaseException:
        close(session)
        raise


def demo_main(args) -> int:
    tui = sys.stdout.isatty() and not args.json and not args.no_tui
    summary, session = run_demo(args, out=sys.stderr if args.json else sys.stdout, tui=tui)
    close(session)
    if args.json:
        print(json.dumps(summary))
    else:
        Console(width=None if sys.stdout.isatty() else 100).print(render_summary(summary))
    for err in summary["errors"]:
        print(f"kvos: demo: {err}", file=sys.stderr)
    return 1 if summary["errors"] else 0


def top_main(args) -> int:
    from userspace.shell.commands import daemon
    if not args.local:                         # watch a running kvosd (one line and exit 1 if none)
        from userspace.tui.app import KvosTop
        from userspace.tui.source import Source
        KvosTop(Source(daemon(args))).run()
        return 0
    if args.url:
        raise KvosError(EINVAL, "--local runs a kernel here: it takes no --url")
    print("kvos: --local: not a running kvosd: a fresh kernel booted by this command, running the demo's "
          "workload" + (" on the prompts given" if args.prompts else ""), file=sys.stderr, flush=True)
    session = start_session(args, plan_from_args(args))
    try:
        run_tui(session, paused=args.paused)
    finally:
        close(session)
    return 0
