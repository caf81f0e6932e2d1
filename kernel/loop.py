"""The kernel's loop in a thread of its own (the daemon), and graceful shutdown.

start_loop() runs Kernel.step() until stop_loop(); while it runs, calls that wait
sleep on kernel.changed instead of stepping, and calls that add work notify it.
shutdown() stops admitting, finishes or kills every process, frees everything,
runs fsck and checks that every frame came back.
"""
import threading
import time

from kernel.errors import KernelPanic
from kernel.proc import State


def start_loop(kernel, idle_wait: float = 0.05) -> threading.Thread:
    """Run step() in a thread until stop_loop(). Calls that wait then sleep on `changed`
    instead of stepping; calls that add work notify it."""
    with kernel.lock:
        if kernel.loop_thread is not None and kernel.loop_thread.is_alive():
            return kernel.loop_thread
        kernel._loop_stop = threading.Event()
        kernel.loop_thread = threading.Thread(target=_run, args=(kernel, idle_wait), name="kvos-loop", daemon=True)
        kernel.loop_thread.start()
        return kernel.loop_thread


def _run(kernel, idle_wait: float) -> None:
    while not kernel._loop_stop.is_set():
        try:
            worked = kernel.step()
        except Exception as exc:               # a kernel bug: log it, keep the last state for fsck
            kernel.log("panic", f"loop stopped: {type(exc).__name__}: {exc}", level="error")
            kernel.loop_error = exc
            raise
        if not worked:
            with kernel.lock:
                kernel.changed.wait(idle_wait)


def stop_loop(kernel) -> None:
    thread = kernel.loop_thread
    if thread is None:
        return
    kernel._loop_stop.set()
    with kernel.lock:
        kernel.changed.notify_all()
    if thread is not threading.current_thread():
        thread.join()
    kernel.loop_thread = None


def shutdown(kernel, kill: bool = False, timeout: float | None = None) -> None:
    """Stop admitting new work, finish (or kill) every process, free everything, fsck.
    Raises KernelPanic if memory is not all back."""
    with kernel.lock:
        kernel.accepting = False
        kernel.log("shutdown", f"shutting down ({'killing' if kill else 'finishing'} processes)")
        if kill:
            for proc in list(kernel.procs.values()):
                if proc.alive and proc.builds_segment is None:
                    kernel.exit_process(proc, "killed")
        for proc in list(kernel.procs.values()):
            if proc.state == State.SLEEPING:
                kernel.exit_process(proc, getattr(proc, "last_reason", "stop"))
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with kernel.lock:
            busy = not kernel.sched.idle
            if busy and kernel.loop_thread is None:
                busy = kernel.step()
        if not busy:
            break
        if deadline is not None and time.monotonic() > deadline:
            with kernel.lock:
                for proc in list(kernel.procs.values()):
                    if proc.alive:
                        kernel.exit_process(proc, "killed")
            break
        if kernel.loop_thread is not None:
            with kernel.lock:
                kernel.changed.wait(0.05)
    stop_loop(kernel)
    with kernel.lock:
        for tid in list(kernel.tenants):
            kernel.remove_tenant(kernel.tenants[tid])
        kernel.fsck()
        if kernel.mm is not None:
            info = kernel.mm.meminfo()
            if info.free + info.cached + (1 if kernel.null_frame is not None else 0) != info.total \
                    or info.swap_used:
                raise KernelPanic(f"shutdown: memory not all back: {info}")
        kernel.log("shutdown", "all memory back; kernel stopped")
