"""Fair share when a tenant becomes active late: it is lifted to the others' virtual time (VTC), so
it gets its share from then on, not everything until its counter catches up with theirs."""
import kernel
from tests.kernel_helpers import TINY, frames


def test_a_late_tenant_is_lifted_to_the_others_virtual_time():
    k = kernel.boot(memory=frames(512), policy="fair", token_budget=64, max_running=8)
    sys = k.syscalls()
    early = sys.spawn_tenant(TINY, name="early")
    late = sys.spawn_tenant(TINY, name="late")
    for i in range(100):
        sys.spawn(early, [5 + i % 50, 6, 7, 8], max_tokens=10, ignore_eos=True, temperature=0)
    since = 0
    for _ in range(60):                                   # early alone: its counter runs ahead
        since = sys.trace(since=since, timeout=5.0)[-1].step
    for i in range(100):
        sys.spawn(late, [9 + i % 50, 6, 7, 8], max_tokens=10, ignore_eos=True, temperature=0)
    served = {early: 0, late: 0}
    for _ in range(40):
        record = sys.trace(since=since, timeout=5.0)[-1]
        since = record.step
        for w in record.works:
            served[w.tid] += w.count
    share = served[early] / (served[early] + served[late])
    # Equal weights: half each. Unlifted, the late tenant (counter 0) took about 70% of these steps.
    assert 0.42 <= share <= 0.58, served
