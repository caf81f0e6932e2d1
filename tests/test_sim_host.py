"""The host term of the cost model held against kvos's own measured decode steps (docs/simulator.md, The host).

The reference: a SmolLM2-135M-shaped program in bf16 on an H200, kvos's eager forward
(docs/kernels.md, GPU measurements): 11.8 ms per decode step at batch 1, 12.4 at 64 and 18.0 at 256,
context about 512, with 45 ms of host time in torch calls against 12.6 ms of GPU time over five
batch-64 steps (2,300 launches: about 15 per layer). host=eager must give those steps within the
band and call them host-bound; host=graphs must not, and the calibrated default (host=engine)
prices a step as it did before the host term existed.
"""
import pytest

from kernel.devices import costmodel
from kernel.errors import EINVAL, KvosError
from tests import test_sim_calibration as calibration
from userspace.sim.experiments.common import run
from userspace.sim.workloads import generate

MEASURED_MS = {1: 11.8, 64: 12.4, 256: 18.0}     # kvos eager, SmolLM2 shape, bf16, H200, context ~512
BAND = 0.2


def decode_cost(gpu: str, batch: int, context: int = 512) -> dict:
    return calibration.decode_cost(gpu, batch, context, model="smollm2-135m")


@pytest.mark.parametrize("batch", sorted(MEASURED_MS))
def test_eager_host_prices_kvos_measured_decode_steps(batch):
    cost = decode_cost("h200,host=eager", batch)
    assert abs(cost["total"] / (MEASURED_MS[batch] / 1e3) - 1) < BAND
    assert cost["host_bound"] == 1 and cost["host_wait"] > 0
    assert cost["issue"] == pytest.approx(30 * 15 * 20e-6)          # 30 layers x 15 launches x 20 us


def test_graphs_take_the_host_off_the_decode_step_and_the_default_is_unchanged():
    eager, graphs, engine = (decode_cost(f"h200,host={h}", 64) for h in ("eager", "graphs", "engine"))
    assert graphs["host_bound"] == 0 and graphs["host_wait"] == 0 and graphs["issue"] == pytest.approx(50e-6)
    assert graphs["total"] < 0.5 * eager["total"]
    assert graphs["forward"] == eager["forward"]                     # the GPU's work is the same
    default = decode_cost("h200", 64)
    assert default == engine and default["issue"] == 0 and default["host_wait"] == 0
    assert default["total"] == pytest.approx(default["forward"] + default["overhead"])


def test_prefill_passes_stay_eager_under_graphs():
    spec = costmodel.gpu_spec("h200,host=graphs")
    small_prefill = costmodel.PassWork(0, 0, 0, 0, tokens=8, sequences=1, layers=30)
    decode = costmodel.PassWork(0, 0, 0, 0, tokens=8, sequences=8, layers=30)
    assert costmodel.issue_seconds(spec, small_prefill) == pytest.approx(30 * 15 * 20e-6)
    assert costmodel.issue_seconds(spec, decode) == spec.graph_launch


def test_host_overrides_are_checked():
    for name in ("h200,host=turbo", "h200,graphs=2", "h200,launch_host=-1"):
        with pytest.raises(KvosError) as e:
            costmodel.gpu_spec(name)
        assert e.value.errno == EINVAL
    assert costmodel.gpu_spec("h200,host=eager,launch_host=5e-6").launch_host == 5e-6   # a field beats the profile


def test_a_run_reports_its_host_bound_steps():
    requests = generate("alpaca", 8, rate=50.0, seed=0)
    eager, _, _ = run(requests, "h200,host=eager", "smollm2-135m")
    graphs, _, _ = run(requests, "h200,host=graphs", "smollm2-135m")
    assert eager["host_bound_steps"] > 0.9 * eager["steps"] and eager["host_wait_share"] > 0.4
    # what stays host-bound under graphs: steps with a prefill chunk in them, which run eagerly
    assert graphs["host_bound_steps"] < 0.5 * eager["host_bound_steps"]
    assert graphs["host_wait_share"] < 0.6 * eager["host_wait_share"]
