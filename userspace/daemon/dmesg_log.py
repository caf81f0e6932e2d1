"""The kernel's log into kvosd's: a daemon task reads new dmesg lines through the syscall.

Every second it asks root's dmesg(since=last seen) in a worker thread and logs each new
line on "kvosd.kernel": warn and error lines as warnings and errors, the rest (admissions,
exits, ...) at debug. Lines the kernel's ring dropped before they were read are counted.
"""
from __future__ import annotations

import asyncio
import logging

import anyio.to_thread

from kernel.errors import KvosError

log = logging.getLogger("kvosd.kernel")
LEVELS = {"warn": logging.WARNING, "error": logging.ERROR}
POLL_SECONDS = 1.0


async def relay(root, interval: float = POLL_SECONDS) -> None:
    """Until cancelled (or the kernel is gone): the kernel log's new lines into kvosd's log."""
    since = 0
    while True:
        try:
            entries = await anyio.to_thread.run_sync(root.dmesg, since)
        except KvosError:                    # the kernel has shut down
            return
        except Exception as err:             # noqa: BLE001 -- a bug here must not go unseen, nor stop kvosd
            log.error("reading the kernel log failed (%s: %s); kernel lines are no longer logged",
                      type(err).__name__, err)
            return
        if entries and entries[0].seq > since + 1:
            log.warning("%d kernel log lines were dropped from the ring before kvosd read them",
                        entries[0].seq - since - 1)
        for e in entries:
            log.log(LEVELS.get(e.level, logging.DEBUG), "%s: %s", e.event, e.message,
                    extra={"event": e.event, "kernel_step": e.step, "tid": e.tid, "pid": e.pid})
        if entries:
            since = entries[-1].seq
        await asyncio.sleep(interval)
