"""The kernel's loop thread for in-process sessions (demo, top): it alone calls k.step().

Client threads (libc calls, the TUI's workers) make syscalls on the same
kernel; theirs wait on k.changed because k.loop_thread names this thread. The
loop can be paused, stepped one slice at a time, and told to stop. After each
step it calls the `on_step` hooks under the kernel lock (the demo samples
meminfo there), then sleeps a moment without the lock so other threads get it.
"""
from __future__ import annotations

import threading
import time


class KernelLoop:
    def __init__(self, kernel, idle_sleep: float = 0.01, yield_sleep: float = 0.0005):
        self.kernel = kernel
        self.idle_sleep = idle_sleep          # nothing runnable: poll for new work this often
        self.yield_sleep = yield_sleep        # between steps, so lock waiters get their turn
        self.on_step: list = []               # callables(kernel) run under the lock after each step
        self.error: BaseException | None = None
        self.idle_since: float | None = None   # when step() last began finding nothing to run
        self._paused = False
        self._pending_steps = 0               # single steps requested while paused
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kvos-loop", daemon=True)

    # -- control (any thread) ----------------------------------------------------------
    def start(self) -> KernelLoop:
        self.kernel.loop_thread = self._thread
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self.kernel.loop_thread is self._thread:
            self.kernel.loop_thread = None

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._pending_steps = 0
            self._cond.notify_all()

    def step_once(self) -> None:
        """While paused: run one time slice (one kernel step)."""
        with self._cond:
            self._pending_steps += 1
            self._cond.notify_all()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # -- the thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._paused and not self._pending_steps and not self._stop:
                        self._cond.wait(0.1)
                    if self._stop:
                        return
                    if self._paused:
                        self._pending_steps -= 1
                progressed = self._step()
                if progressed:
                    self.idle_since = None
                elif self.idle_since is None:
                    self.idle_since = time.monotonic()
                time.sleep(self.yield_sleep if progressed else self.idle_sleep)
        except BaseException as exc:          # a kernel panic ends the session; the caller reports it
            self.error = exc
            with self.kernel.lock:
                self.kernel.changed.notify_all()

    def _step(self) -> bool:
        k = self.kernel
        with k.lock:
            progressed = k.step()
            if progressed:
                for hook in self.on_step:
                    hook(k)
        return progressed
