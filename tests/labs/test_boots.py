"""The system boots: what every lab's skeleton must still do (`kvos lab grade` runs it beside the lab's
tests, and so does the main suite). Nothing here steps the kernel."""
import kernel
from tests.kernel_helpers import TINY, frames


def test_boots_spawns_and_answers_syscalls():
    k = kernel.boot(memory=frames(32))
    sys = k.syscalls()
    tid = sys.spawn_tenant(TINY)
    assert sys.uname().policy == "fcfs" and sys.tenantinfo(tid).page_size == 16
    ids = sys.tokenize(tid, "kvos boots", add_generation_prompt=False)
    assert sys.detokenize(tid, ids) == "kvos boots"
    pid = sys.spawn(tid, [5, 6, 7], max_tokens=2)
    assert [p.pid for p in sys.ps()] == [pid] and sys.ps()[0].state == "new"
    assert sys.meminfo().total == 32 and sys.schedstat().steps == 0
    sys.kill(pid)
    assert sys.wait(pid).reason == "killed"
    sys.fsck()
