"""The kernel's loop in a thread of its own, its controls, and graceful shutdown.

start_loop() runs Kernel.step() until stop_loop(); while it runs, calls that wait
sleep until their process changes instead of stepping, and calls that add work
notify it. The loop can be paused, stepped one time slice at a time and resumed
(loopctl, for the TUI and for students); it remembers since when it has found
nothing to run and what stopped it. Without a loop thread, waiting calls step the
kernel themselves, and loopctl("step") runs one step. shutdown() stops admitting,
finishes or kills every process, frees everything, runs fsck and checks that
every frame came back.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from kernel.errors import EBUSY, EINVAL, KernelPanic, KvosError
from kernel.proc import State
from kernel.results import LoopStatus


@dataclass
class LoopState:
    """What the controls set and the loop thread reads (under the kernel lock)."""
    paused: bool = False
    pending_steps: int = 0          # single steps asked for while paused
    idle_since: float | None = None  # when step() began finding nothing to run (monotonic)
    stop: threading.Event | None = None


def start_loop(kernel, idle_wait: float = 0.05) -> threading.Thread:
    """Run step() in a thread until stop_loop(). Calls that wait then sleep instead of stepping."""
    with kernel.lock:
        if kernel.loop_thread is not None and kernel.loop_thread.is_alive():
            return kernel.loop_thread
        kernel.loop_state.stop = threading.Event()
        kernel.loop_error = None
        kernel.loop_thread = threading.Thread(target=_run, args=(kernel, idle_wait), name="kvos-loop", daemon=True)
        kernel.loop_thread.start()
        return kernel.loop_thread


def _run(kernel, idle_wait: float) -> None:
    state = kernel.loop_state
    stop = state.stop
    while not stop.is_set():
        with kernel.lock:
            if state.paused and not state.pending_steps:
                kernel.changed.wait(idle_wait)
                continue
            if state.pending_steps:
                state.pending_steps -= 1
        try:
            worked = kernel.step()
        except Exception as exc:               # a kernel bug: log it, keep the last state for fsck
            kernel.log("panic", f"loop stopped: {type(exc).__name__}: {exc}", level="error")
            kernel.loop_error = exc
            with kernel.lock:
                kernel.changed.notify_all()
            raise
        if worked:
            state.idle_since = None
        else:
            with kernel.lock:
                if state.idle_since is None:
                    state.idle_since = time.monotonic()
                kernel.changed.wait(idle_wait)


def stop_loop(kernel) -> None:
    thread = kernel.loop_thread
    if thread is None:
        return
    kernel.loop_state.stop.set()
    with kernel.lock:
        kernel.changed.notify_all()
    if thread is not threading.current_thread():
        thread.join()
    kernel.loop_thread = None


def _running(kernel) -> bool:
    thread = kernel.loop_thread
    return thread is not None and thread.is_alive()


def pause(kernel) -> None:
    with kernel.lock:
        kernel.loop_state.paused = True


def resume(kernel) -> None:
    with kernel.lock:
        kernel.loop_state.paused = False
        kernel.loop_state.pending_steps = 0
        kernel.changed.notify_all()


def step_once(kernel, timeout: float = 60.0) -> None:
    """One time slice: the paused loop runs it (this waits for it), or it runs here without a loop."""
    with kernel.lock:
        if not _running(kernel):
            kernel.step()
            return
        state = kernel.loop_state
        if not state.paused:
            raise KvosError(EBUSY, "the loop is running: pause it before stepping it one slice at a time")
        target = kernel.stats.steps + 1
        state.pending_steps += 1
        kernel.changed.notify_all()
        deadline = time.monotonic() + timeout
        while kernel.stats.steps < target and state.pending_steps and time.monotonic() < deadline:
            kernel.changed.wait(0.1)


def idle_until(kernel, until: float) -> None:
    """Let the simulated device's virtual clock pass to `until` (seconds since boot) with nothing
    runnable: a tickless idle, for drivers that replay arrivals in virtual time."""
    with kernel.lock:
        if kernel.device.has_tensors:
            raise KvosError(EINVAL, f"{kernel.device.name} keeps wall time: it passes by itself (sleep in the caller)")
        if not kernel.sched.idle:
            raise KvosError(EBUSY, "processes are runnable: the clock advances by stepping them")
        kernel.device.advance_to(kernel.dmesg.boot_time + until)


def status(kernel) -> LoopStatus:
    with kernel.lock:
        state = kernel.loop_state
        idle = None if state.idle_since is None or not _running(kernel) else time.monotonic() - state.idle_since
        error = kernel.loop_error
        return LoopStatus(_running(kernel), state.paused, kernel.stats.steps, idle,
                          None if error is None else f"{type(error).__name__}: {error}")


def shutdown(kernel, kill: bool = False, timeout: float | None = None) -> None:
    """Stop admitting new work, finish (or kill) every process, free everything, fsck.
    Raises KernelPanic if memory is not all back."""
    with kernel.lock:
        kernel.accepting = False
        kernel.loop_state.paused = False
        kernel.log("shutdown", f"shutting down ({'killing' if kill else 'finishing'} processes)")
        if kill:
            for proc in list(kernel.procs.values()):
                if proc.alive and proc.builds_segment is None:
                    kernel.exit_process(proc, "killed")
        for proc in list(kernel.procs.values()):
            if proc.state == State.SLEEPING:
                kernel.exit_process(proc, proc.last_reason or "stop")
        kernel.changed.notify_all()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with kernel.lock:
            busy = not kernel.sched.idle
            if busy and not _running(kernel):
                busy = kernel.step()
        if not busy:
            break
        if deadline is not None and time.monotonic() > deadline:
            with kernel.lock:
                for proc in list(kernel.procs.values()):
                    if proc.alive:
                        kernel.exit_process(proc, "killed")
            break
        if _running(kernel):
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
        kernel.device.close()                    # tensor-parallel workers exit
        kernel.log("shutdown", "all memory back; kernel stopped")
