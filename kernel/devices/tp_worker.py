"""A tensor-parallel worker rank: a process that does what rank 0 tells it, in order.

It holds a frame pool and swap area of the same frame count as rank 0's (its frames hold its
slice of the KV heads), loads programs by name sharded for its rank, and runs the memory
operations and forward passes rank 0 sends over its pipe. Its logits are dropped: only rank 0
samples. It owns no page table and decides nothing.

A worker that fails in any way exits (non-zero): its sockets close, rank 0's next collective
fails at once, and the kernel ends the affected processes with EIO. When rank 0 goes away the
pipe reaches EOF and the worker exits too.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

log = logging.getLogger("kvos.tp")


def main(argv: list) -> None:
    """python -m kernel.devices.tp_worker RANK SIZE PORT KEY FD THREADS TIMEOUT_S (TPDevice starts it)."""
    from multiprocessing.connection import Connection
    rank, size, port, key, fd, threads, timeout_s = argv
    worker_main(int(rank), int(size), int(port), key, Connection(int(fd)), int(threads), float(timeout_s))


def worker_main(rank: int, size: int, port: int, key: str, conn, threads: int, timeout_s: float) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from kernel.devices.base import MemOp
    from kernel.devices.torchdev import TorchDevice
    from kernel.devices.tp import make_group
    from kernel.errors import KvosError

    # Ctrl-C on a terminal reaches every process of the group: rank 0 decides what it means (a
    # graceful shutdown still needs this rank), and tells this one to exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    store = dist.TCPStore("127.0.0.1", port, size, False, timeout=datetime.timedelta(seconds=timeout_s))
    conn.send(("ready",))
    device = TorchDevice("cpu")
    device.tp = make_group(store, rank, size, key, timeout_s)
    programs: dict = {}                     # handle -> (program, KVView)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):         # rank 0 is gone
            os._exit(0)
        what = message[0]
        try:
            if what == "exit":
                break
            if what == "pool":
                device.create_pool(message[1], message[2])
                programs = {h: (p, None) for h, (p, _) in programs.items()}     # views of the old pool go
            elif what == "swap":
                device.create_swap(message[1])
            elif what == "ops":
                device.run([MemOp(kind, src, dst) for kind, src, dst in message[1]])
            elif what == "load":
                _, handle, spec, env = message
                os.environ.update(env)
                from kernel.program import exec_program
                try:
                    program = exec_program(spec, device)
                except KvosError as exc:
                    conn.send(("error", exc.errno, str(exc)))
                    continue
                programs[handle] = (program, None)
                conn.send(("ok", program.identity, program.kv_shape))
            elif what == "forward":
                _, handle, fields, mixed = message
                program, view = programs[handle]
                if view is None:
                    view = device.kv_view(program.kv_shape)
                    programs[handle] = (program, view)
                if mixed is not None:        # rank 0's base.mixed(...), made here from the same programs
                    program = program.mixed([(start, end, programs[h][0]) for start, end, h in mixed])
                program.forward(_batch(fields), view)
            else:
                raise RuntimeError(f"unknown command {what!r}")
        except BaseException as exc:         # noqa: BLE001 - any failure ends this rank, loudly
            # A worker has no handlers of its own: logging's last resort writes this to stderr.
            log.error("kvos tensor-parallel rank %d: %s failed: %s: %s", rank, what, type(exc).__name__, exc)
            os._exit(1)
    conn.close()


def _batch(fields: dict):
    import torch

    from kernel.batch import ForwardBatch
    return ForwardBatch(**{k: torch.from_numpy(v) if hasattr(v, "dtype") else v for k, v in fields.items()})


if __name__ == "__main__":
    main(sys.argv[1:])
