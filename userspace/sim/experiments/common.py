"""What every experiment shares: booting a sim kernel, stepping it, running a workload, tables and plots.

Experiments hold a root syscall handle, never the Kernel: boot() keeps only k.syscalls().
"""
from __future__ import annotations

import kernel
from userspace.sim.driver import STEP_TIMEOUT, Driver

DEFAULTS = {"gpu": "a100-80g", "model": "llama-2-7b", "seed": 0}


def boot(gpu: str, model: str, **options):
    """A sim kernel in manual mode (no loop thread) and one tenant running `model`.
    gpu: a preset with optional overrides, "a100" or "a100,step_overhead=0". -> (root handle, tid)"""
    root = kernel.boot(device=f"sim:{gpu}", **options).syscalls()
    tid = root.spawn_tenant(model, max_procs=1 << 20)
    return root, tid


def step(root, since: int):
    """Run the next step and return its record (in manual mode trace with a timeout runs it)."""
    records = root.trace(since=since, timeout=STEP_TIMEOUT)
    if not records:
        raise RuntimeError(f"no step after step {since}: nothing is runnable")
    return records[-1]


def run(requests, gpu: str, model: str, *, seed: int = 0, share: bool = True, record_gaps: bool = False,
        sample_interval: float = 0.5, **options) -> tuple:
    """Boot, run `requests` to the end, check every process ran its length and the kernel's invariants.
    -> (summary, RunResult, root handle)"""
    root, tid = boot(gpu, model, **options)
    result = Driver(root, tid, requests, share=share, record_gaps=record_gaps, seed=seed,
                    sample_interval=sample_interval).run()
    if result.errors:
        raise RuntimeError(f"{len(result.errors)} request(s) went wrong, first: {result.errors[0]}")
    root.fsck()
    return result.summary(), result, root


def pick(summary: dict, *keys) -> dict:
    return {key: summary[key] for key in keys}


def ratio(a, b):
    """a / b, or None when either is unmeasured (None) or b is 0."""
    return a / b if a is not None and b else None


# -- presentation ------------------------------------------------------------------------------
def table(title: str, columns: list, rows: list, caption: str | None = None, text: bool = False):
    """A rich Table; numbers are formatted with fmt(). text: every column left-aligned."""
    from rich.table import Table
    t = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 or text else "right")
    for row in rows:
        t.add_row(*[fmt(v) for v in row])
    return t


def fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == float("inf"):
            return "inf"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def figure(ncols: int = 1, width: float = 5.2, height: float = 3.4):
    """A matplotlib figure drawn off-screen, small enough to commit."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save(fig, path) -> str:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)
