"""A tensor-parallel device: one kernel, t ranks, each holding a slice of every layer.

The kernel (scheduler, memory manager, page tables) stays one, in this process, which is rank 0.
TPDevice spawns t-1 worker processes (kernel/devices/tp_worker.py) and drives them over one pipe
each: every command rank 0 runs on its own pool (create the pool and swap, a run of memory
operations, a forward pass, loading a program) is first sent to every worker, in the same order,
so every rank moves the same logical frames. A frame number means the same page on every rank;
each rank's frame holds that page's K/V for its own slice of the KV heads.

The forward pass itself talks over torch.distributed (gloo on the CPU): a ProcessGroupGloo built
on a TCPStore of our own, not the process-wide default group, so several tensor-parallel kernels
can live in one process. Every collective has a timeout; a worker that dies closes its sockets
and rank 0's next collective fails at once. Either way the device is lost: forward raises
DeviceLost from then on (the kernel ends the batch's processes with EIO) and memory operations
run on rank 0 alone, so the kernel's own bookkeeping stays whole.
"""
from __future__ import annotations

import datetime
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection

import torch

from kernel.devices.base import DeviceLost
from kernel.devices.torchdev import TorchDevice
from kernel.errors import EINVAL, EIO, KvosError

TIMEOUT_S = 30.0            # a collective or a worker's answer that takes longer means the group is gone
                            # ($KVOS_TP_TIMEOUT overrides it: tests, slow machines)
STARTUP_S = 120.0           # a worker's interpreter and torch import, before it joins the group
PROGRAM_ENV = ("KVOS_DTYPE", "KVOS_MATMUL", "KVOS_KV")     # what the loader reads from the environment
_group_ids = itertools.count(1)


class TPGroup:
    """This rank's handle on its tensor-parallel group: what a model program's forward calls.

    all_reduce sums in place across ranks; all_gather returns every rank's tensor concatenated on
    the last dimension (equal shapes). Both count calls, bytes and seconds (rank 0's cost report),
    and turn any failure of the transport into DeviceLost."""

    def __init__(self, pg, rank: int, size: int, key: str):
        self.pg, self.rank, self.size, self.key = pg, rank, size, key
        self.calls = self.bytes = 0
        self.seconds = 0.0

    def _run(self, start, what: str, nbytes: int) -> None:
        """Start a collective (the call itself can take as long as the wait) and wait for it."""
        started = time.perf_counter()
        try:
            start().wait()
        except RuntimeError as exc:
            raise DeviceLost(f"tensor-parallel {what} failed on rank {self.rank}: {str(exc).splitlines()[0]}") \
                from None
        self.seconds += time.perf_counter() - started
        self.calls += 1
        self.bytes += nbytes

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self._run(lambda: self.pg.allreduce([tensor]), "all_reduce", tensor.numel() * tensor.element_size())
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        self._run(lambda: self.pg.allgather([parts], [tensor]), "all_gather", tensor.numel() * tensor.element_size())
        return torch.cat(parts, dim=-1)


def make_group(store, rank: int, size: int, key: str, timeout_s: float) -> TPGroup:
    import torch.distributed as dist
    prefixed = dist.PrefixStore(key, store)
    pg = dist.ProcessGroupGloo(prefixed, rank, size, datetime.timedelta(seconds=timeout_s))
    return TPGroup(pg, rank, size, key)


class TPDevice(TorchDevice):
    """`cpu` split over `size` processes. Rank 0 is this one; ranks 1..size-1 are its workers."""

    def __init__(self, name: str, size: int, threads: int | None = None, timeout_s: float | None = None):
        if not isinstance(size, int) or isinstance(size, bool) or not 2 <= size <= 64:
            raise KvosError(EINVAL, f"tp must be an integer in [1, 64], got {size!r}")
        if name != "cpu":
            raise KvosError(EINVAL, f"tensor parallelism runs on the cpu (gloo) in this kvos, not on {name!r}: "
                                    f"the NCCL path for GPUs is not built yet")
        if timeout_s is None:
            try:
                timeout_s = float(os.environ.get("KVOS_TP_TIMEOUT", TIMEOUT_S))
            except ValueError:
                raise KvosError(EINVAL, f"KVOS_TP_TIMEOUT={os.environ['KVOS_TP_TIMEOUT']!r} is not a number "
                                        f"of seconds") from None
        super().__init__(name)
        import torch.distributed as dist
        self.name = f"{name} (tensor parallel {size})"
        self.size, self.timeout_s = size, timeout_s
        self.lost: str | None = None                       # why the group is gone, once it is
        self._lock = threading.Lock()                      # one command in flight on the pipes at a time
        self._handles: dict = {}                           # id(program) -> handle the workers know it by
        key = f"kvos-tp-{os.getpid()}-{next(_group_ids)}"
        store = dist.TCPStore("127.0.0.1", 0, size, True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        worker_threads = threads or max(1, torch.get_num_threads() // size)
        self.procs, self.conns = [], []
        for rank in range(1, size):
            # A fresh interpreter per rank (not multiprocessing's spawn, which re-runs the caller's
            # __main__), its commands on one end of a socket pair handed down as a file descriptor.
            ours, theirs = socket.socketpair()
            proc = subprocess.Popen(
                [sys.executable, "-m", "kernel.devices.tp_worker", str(rank), str(size), str(store.port), key,
                 str(theirs.fileno()), str(worker_threads), str(timeout_s)],
                pass_fds=(theirs.fileno(),), env=_worker_env())
            theirs.close()
            self.procs.append(proc)
            self.conns.append(Connection(ours.detach()))
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns)
        self._wait_ready()
        try:
            self.tp = make_group(store, 0, size, key, timeout_s)      # waits for every worker to join
        except RuntimeError as exc:
            self.close()
            raise KvosError(EIO, f"tensor parallel {size}: the workers did not join: {exc}") from None
        self._store = store                                # the store lives as long as the group

    def _wait_ready(self) -> None:
        """Each worker says "ready" once it has imported torch (seconds on a busy machine) and reached
        the store; a worker that dies first fails the boot with EIO instead of a join timeout."""
        deadline = time.monotonic() + STARTUP_S
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs), start=1):
            while not conn.poll(0.2):
                if proc.poll() is not None or time.monotonic() > deadline:
                    why = (f"exited with code {proc.returncode}" if proc.poll() is not None
                           else f"not ready after {STARTUP_S:.0f} s")
                    self.close()
                    raise KvosError(EIO, f"tensor parallel {self.size}: worker rank {rank} {why}")
            conn.recv()

    # -- the command channel ------------------------------------------------------------------
    def _send(self, message) -> None:
        """Send one command to every worker (under self._lock); a broken pipe loses the device."""
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send(message)
            except (OSError, ValueError) as exc:
                self._lose(f"rank {rank} is gone ({type(exc).__name__})")
                raise DeviceLost(self.lost) from None

    def _answers(self) -> list:
        out = []
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs), start=1):
            if not conn.poll(self.timeout_s):
                self._lose(f"rank {rank} did not answer in {self.timeout_s:.0f} s")
                raise DeviceLost(self.lost)
            try:
                out.append(conn.recv())
            except (EOFError, OSError):
                self._lose(f"rank {rank} died (exit code {proc.poll()})")
                raise DeviceLost(self.lost) from None
        return out

    def _lose(self, why: str) -> None:
        """The group is gone: say why once, and end every worker now (one that hangs in a collective
        would otherwise wait out its own timeout)."""
        if self.lost is None:
            self.lost = f"tensor-parallel group lost: {why}"
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()

    def check_alive(self) -> None:
        if self.lost is None:
            for rank, proc in enumerate(self.procs, start=1):
                if proc.poll() is not None:
                    self._lose(f"rank {rank} died (exit code {proc.returncode})")
        if self.lost is not None:
            raise DeviceLost(self.lost)

    # -- memory: every rank creates and moves the same frames ------------------------------------
    def create_pool(self, num_frames: int, frame_bytes: int) -> None:
        super().create_pool(num_frames, frame_bytes)
        self._broadcast(("pool", num_frames, frame_bytes))

    def create_swap(self, num_slots: int) -> None:
        super().create_swap(num_slots)
        self._broadcast(("swap", num_slots))

    def run(self, ops: list) -> None:
        if ops:
            self._broadcast(("ops", [(op.kind, op.src, op.dst) for op in ops]))
        super().run(ops)

    def _broadcast(self, message) -> None:
        """Memory commands need no answer; a lost group skips them (rank 0 still moves its own bytes,
        so the kernel's tables and rank 0's pool stay in step)."""
        with self._lock:
            if self.lost is None:
                try:
                    self._send(message)
                except DeviceLost:
                    pass

    # -- programs and forward passes ------------------------------------------------------------
    def attach_program(self, spec, program) -> None:
        """Have every worker load `spec` as rank 0 loaded `program` (exec_program calls this)."""
        with self._lock:
            if id(program) in self._handles:
                return
            if not isinstance(spec, str):
                raise KvosError(EINVAL, f"a tensor-parallel kernel loads its programs by name on every rank; "
                                        f"{getattr(program, 'name', program)!r} was loaded elsewhere")
            if getattr(getattr(program, "tp", None), "key", None) != self.tp.key:
                raise KvosError(EINVAL, f"{program.name} is not sharded for this tensor-parallel group")
            self.check_alive()
            handle = len(self._handles) + 1
            env = {k: os.environ[k] for k in PROGRAM_ENV if k in os.environ}
            self._send(("load", handle, spec, env))
            for rank, answer in enumerate(self._answers(), start=1):
                if answer[0] == "error":
                    raise KvosError(answer[1], f"rank {rank}: {answer[2]}")
                if answer[1:] != (program.identity, program.kv_shape):
                    raise KvosError(EIO, f"rank {rank} loaded {spec!r} differently from rank 0")
            self._handles[id(program)] = (handle, program)

    def forward(self, program, batch, kv):
        with self._lock:
            self.check_alive()
            # A step's mixed program (a base and its LoRA adapters' rows: base.mixed) is made anew each
            # step: the workers make theirs from the same base and adapters, by handle.
            base, segments = getattr(program, "mixed_from", (program, None))
            entry = self._handles.get(id(base))
            mixed = None if segments is None else [(start, end, self._handles.get(id(p))) for start, end, p in segments]
            if entry is None or (mixed is not None and any(h is None for *_, h in mixed)):
                raise DeviceLost(f"{program.name} was never loaded on the tensor-parallel workers")
            fields = {name: getattr(batch, name) for name in batch.__dataclass_fields__}
            self._send(("forward", entry[0], {k: v.numpy() if isinstance(v, torch.Tensor) else v
                                              for k, v in fields.items()},
                        None if mixed is None else [(start, end, h[0]) for start, end, h in mixed]))
            try:
                return program.forward(batch, kv)
            except Exception as exc:       # half a collective done: the ranks no longer agree on the step
                self._lose(f"rank 0's forward failed ({type(exc).__name__}: {exc})")
                raise DeviceLost(self.lost) from None

    def close(self) -> None:
        """Stop the workers (shutdown; also when this device is collected)."""
        with self._lock:
            self.lost = self.lost or "tensor-parallel group closed"
            self._finalizer()


def _stop(procs, conns) -> None:
    for conn in conns:
        try:
            conn.send(("exit",))
        except (OSError, ValueError):
            pass
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    for conn in conns:
        conn.close()


def _worker_env() -> dict:
    """The workers import this kvos, whatever directory or path made it importable here."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
