"""Fixtures shared by the test modules."""
import os

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's kernels: kvosd tests share 2 cores between the server's loop,
    its clients and the test. Restores $KVOS_THREADS and torch's threads afterwards."""
    from kernel.ops import set_num_threads
    before, threads = os.environ.get("KVOS_THREADS"), torch.get_num_threads()
    os.environ["KVOS_THREADS"] = "1"
    yield
    if before is None:
        os.environ.pop("KVOS_THREADS")
    else:
        os.environ["KVOS_THREADS"] = before
    set_num_threads(threads)


@pytest.fixture(autouse=True)
def kvos_loggers_as_they_were():
    """`kvos serve` run in-process configures kvos's loggers (userspace/daemon/logs.py); put them back,
    so a later test's output is not another command's log."""
    import logging
    names = ("kvosd", "kvos", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate)
             for n in names}
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = handlers, propagate
        logger.setLevel(level)                   # (not .level =: setLevel clears the loggers' caches)
