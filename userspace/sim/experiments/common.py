"""What every experiment shares: booting a sim kernel, running a workload, tables and plots."""
from __future__ import annotations

import kernel
from kernel.devices.sim import SimDevice
from userspace.sim.driver import Driver

DEFAULTS = {"gpu": "a100-80g", "model": "llama-2-7b", "seed": 0}


def boot(gpu: str, model: str, **options):
    """A sim kernel and one tenant running `model`. -> (kernel, tid)"""
    device = gpu if isinstance(gpu, SimDevice) else SimDevice(gpu)
    k = kernel.boot(device=device, **options)
    tid = k.syscalls().spawn_tenant(model, max_procs=1 << 20)
    return k, tid


def run(requests, gpu: str, model: str, *, seed: int = 0, share: bool = True, record_gaps: bool = False,
        sample_interval: float = 0.5, **options) -> tuple:
    """Boot, run `requests` to the end, check every process ran its length. -> (summary, RunResult, kernel)"""
    k, tid = boot(gpu, model, **options)
    result = Driver(k, tid, requests, share=share, record_gaps=record_gaps, seed=seed,
                    sample_interval=sample_interval).run()
    if result.errors:
        raise RuntimeError(f"{len(result.errors)} request(s) went wrong, first: {result.errors[0]}")
    k.fsck()
    return result.summary(), result, k


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
