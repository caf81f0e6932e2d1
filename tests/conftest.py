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
