"""Screenshots of kvos top for the docs: python -m userspace.shell.screenshot [--out docs/img].

Runs the demo's workload headless for a while, pauses the kernel mid-run, selects
the process with the most shared pages, and saves the whole TUI and its memory
map as SVG (Textual's and rich's own export), then as PNG when rsvg-convert is
installed (dev tools only, not dependencies: librsvg2-bin on Debian; Pillow, if
present, makes the PNG small).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import shutil
import subprocess
import time
from pathlib import Path

from rich.console import Console
from rich.panel import Panel

from userspace.shell.demo import close, plan_from_args, start_session, workload_status
from userspace.shell.options import add_demo_options
from userspace.tui import views
from userspace.tui.app import KvosTop
from userspace.tui.source import Source, frame_map


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m userspace.shell.screenshot", description=__doc__)
    parser.add_argument("--out", default="docs/img", help="folder for tui.svg/png and tui-memory.svg/png")
    parser.add_argument("--steps", type=int, default=20,
                        help="kernel steps to run at least; then it waits (up to 10x as many) for a moment with "
                             "shared frames, which show more (default 20)")
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=48)
    add_demo_options(parser)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    session = start_session(args, plan_from_args(args))
    try:
        while not session.workload.done and not _worth_a_picture(session.root, args.steps):
            time.sleep(0.01)
        session.root.loopctl("pause")
        asyncio.run(_shoot(session, out, args.width, args.height))
    finally:
        close(session)
    for name in ("tui", "tui-memory"):
        _to_png(out / f"{name}.svg")
    return 0


def _worth_a_picture(root, min_steps: int) -> bool:
    steps = root.schedstat().steps
    return steps >= 10 * min_steps or (steps >= min_steps and frame_map(root.meminfo(frames=True)).count("shared"))


async def _shoot(session, out: Path, width: int, height: int) -> None:
    app = KvosTop(Source(session.root), status=workload_status(session.workload))
    async with app.run_test(size=(width, height)) as pilot:
        await app.workers.wait_for_complete()
        procs = app.snapshot.procs
        if procs:
            app.selected_pid = max(procs, key=lambda p: (p.shared_pages, p.pages)).pid
        app.sync_refresh()
        await pilot.pause(0.3)
        app.sync_refresh()
        await pilot.pause()
        app.save_screenshot("tui.svg", path=str(out))
        snap = app.snapshot
        frames = snap.frames
        console = Console(record=True, width=72, force_terminal=True, color_system="truecolor", file=io.StringIO())
        console.print(Panel(views.memory_map(frames, 68, selected_pid=app.selected_pid,
                                             tenants=[t.name for t in snap.schedstat.tenants]),
                            title=f"memory map at step {snap.schedstat.steps}", border_style="blue"))
        console.save_svg(str(out / "tui-memory.svg"), title="kvos top: memory map")


def _to_png(svg: Path) -> None:
    """PNG beside the SVG, in a palette of 256 colours (a terminal has few) when Pillow is there: small files."""
    if not shutil.which("rsvg-convert"):
        return
    png = svg.with_suffix(".png")
    subprocess.run(["rsvg-convert", "-z", "1.0", str(svg), "-o", str(png)], check=True)
    try:
        from PIL import Image
    except ImportError:
        return
    Image.open(png).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(png, optimize=True)


if __name__ == "__main__":
    raise SystemExit(main())
