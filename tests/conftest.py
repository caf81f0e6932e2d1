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


def _isa_caps() -> list:
    """The vector paths this CPU can run, best first: "best", "avx2" where the best is AVX-512
    (otherwise best is AVX2 or less already), and "portable" C."""
    from kernel.ops import cpu
    before = cpu.set_isa_cap("best")
    try:
        wider = bool(cpu._load().lib.kvos_cpu_avx512())
    finally:
        cpu.set_isa_cap(before)
    return ["best"] + (["avx2"] if wider and cpu.cpu_has_avx2() else []) + ["portable"]


@pytest.fixture(scope="module", params=_isa_caps())
def each_isa_cap(request):
    """Run the test once under each vector path the CPU can take (kernel.ops.cpu.set_isa_cap):
    modules of C kernels with several paths mark themselves with usefixtures("each_isa_cap")."""
    from kernel.ops import cpu
    before = cpu.set_isa_cap(request.param)
    yield request.param
    cpu.set_isa_cap(before)
