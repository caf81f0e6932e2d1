"""`kvos demo` and `kvos top`: boot a kernel too small for its workload, run it, show it.

Memory is sized in frames of the model's own pages (SmolLM2 in fp32 keeps
46,080 bytes per token, 720 KiB per 16-token frame), so the workload cannot
fit at once and preemption, swap and reclaim happen for real. The kernel runs
on a loop thread; clients run in theirs; the screen is the TUI on a terminal,
plain progress lines otherwise; the summary comes from meminfo and schedstat.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from rich.console import Console

from kernel.errors import EINVAL, KvosError
from userspace.shell.loop import KernelLoop
from userspace.shell.options import (
    DEMO_FRAMES,
    DEMO_SWAP_FRAMES,
    QUICK_FRAMES,
    QUICK_SWAP_FRAMES,
    boot_kernel,
    load_program,
    spawn_tenant,
)
from userspace.shell.report import Sampler, progress_line, render_summary, summarize
from userspace.shell.workload import Workload, WorkloadPlan, default_plan


@dataclass
class Session:
    kernel: object
    loop: KernelLoop
    workload: Workload
    sampler: Sampler
    program: object               # held so both tenants share the one loaded copy


def start_session(args, plan: WorkloadPlan) -> Session:
    """Load the model, size memory from its pages, boot, create the tenants, start loop and clients."""
    program = load_program(args.model, args.device)
    frame_bytes = args.page_size * program.kv_shape.bytes_per_token
    frames = args.frames or (QUICK_FRAMES if args.quick else DEMO_FRAMES)
    swap_frames = args.swap_frames if args.swap_frames is not None else \
        (QUICK_SWAP_FRAMES if args.quick else DEMO_SWAP_FRAMES)
    memory = args.memory or frames * frame_bytes
    swap = args.swap if args.swap is not None else swap_frames * frame_bytes
    k = boot_kernel(args, memory=memory, swap=swap)
    workload = Workload(k, plan, args.model)
    workload.create_tenants(spawn_tenant)
    sampler = Sampler(k)
    loop = KernelLoop(k)
    loop.on_step.append(sampler)
    loop.start()
    workload.start()
    return Session(k, loop, workload, sampler, program)


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
    from userspace.tui.source import LocalSource
    KvosTop(LocalSource(session.kernel, session.loop), status=workload_status(session.workload),
            start_paused=paused).run()


STALL_SECONDS = 30      # the kernel idle this long while clients still wait: a bug, reported, not a hang


class DemoStalled(RuntimeError):
    pass


def run_plain(session: Session, every: float, out) -> None:
    """Progress lines every `every` seconds until the clients are done; a ps table now and then."""
    from userspace.shell.format import ps_table, render
    sys_root = session.kernel.syscalls()
    last = 0.0
    lines = 0
    while not session.workload.done:
        if session.loop.error is not None:
            raise session.loop.error
        now = time.monotonic()
        idle = session.loop.idle_since
        if idle is not None and now - idle > STALL_SECONDS:
            raise DemoStalled(f"the kernel has had nothing to run for {now - idle:.0f} s but "
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
    """The summary (of what ran, if the TUI was quit early), then the session ends."""
    if session.loop.error is not None:
        raise session.loop.error
    session.loop.pause()
    root = session.kernel.syscalls()
    summary = summarize(root, session.workload, session.sampler, model=model, finished=session.workload.done)
    close(session)
    return summary


def close(session: Session) -> None:
    """Clients still waiting are cancelled while the loop runs (so none is left stepping the kernel
    from its own thread), then the loop stops."""
    if not session.workload.done:
        session.loop.resume()
        session.workload.cancel()
    session.loop.stop()


def run_demo(args, out=None, tui: bool = False) -> tuple[dict, Session]:
    """Run the demo to its end (or until the TUI is quit): (summary, session). out takes the progress lines."""
    session = start_session(args, plan_from_args(args))
    try:
        if tui:
            run_tui(session)
        else:
            run_plain(session, args.every, out or sys.stdout)
    except BaseException:
        close(session)
        raise
    return finish(session, args.model), session


def demo_main(args) -> int:
    tui = sys.stdout.isatty() and not args.json and not args.no_tui
    summary, _ = run_demo(args, out=sys.stderr if args.json else sys.stdout, tui=tui)
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
        from userspace.tui.source import RemoteSource
        KvosTop(RemoteSource(daemon(args))).run()
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
