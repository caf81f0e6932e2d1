"""LlamaProgram.forward_device, the one-rank CUDA forward on the fused kernels (kernel/ops/fused.py),
run here on the CPU: once on the C kernels and once on the CUDA sources themselves in the emulator
(csrc/emu: fused.cu, write_kv and both attention kernels), each against forward_torch on tiny-llama
(a 40-token prefill beside an 11-token one, then decode steps); and which forward a program takes."""
import pytest
import torch

import kernel
from kernel.devices.torchdev import TorchDevice
from kernel.errors import KvosError
from kernel.ops import cpu, cuda_decode, cuda_fused, fused
from kernel.program import exec_program
from tests import test_ops_cuda as base
from tests.helpers.hf_reference import rel_error
from tests.kernel_helpers import TINY, assert_all_memory_back, frames, run_workload, workload
from tests.test_graphs import run_poisoned, spy
from tests.test_step_ops import _prefill_then_decode
from userspace.programs import llama

emulator, emulated = base.emulator, base.emulated   # the fixtures: g++ build of csrc/emu, CuPy stand-in


@pytest.fixture(scope="module")
def program():
    return exec_program("tiny-llama", TorchDevice("cpu"))


def _torch_forward(program):
    return torch.inference_mode()(program.forward_torch)


def test_the_device_forward_matches_the_torch_forward_on_the_c_kernels(program):
    got = _prefill_then_decode(program, torch.inference_mode()(program.forward_device))
    assert rel_error(got, _prefill_then_decode(program, _torch_forward(program))) < 1e-5


@pytest.fixture
def cuda_kernels(emulated, monkeypatch):
    """The CUDA sources in the emulator behind fused.py and the custom ops, for CPU tensors: -> the
    list of the launches made (by op)."""
    calls = []

    def counted(name, launch):
        def run(*args):
            calls.append(name)
            return launch(*args)
        return run

    kernels = type("EmulatedFused", (), {
        "add_rms_norm": staticmethod(counted("add_rms_norm", cuda_fused.add_rms_norm)),
        "silu_mul": staticmethod(counted("silu_mul", cuda_fused.silu_mul)),
        # fused.py hands the CPU's C kernel a check flag the CUDA launcher does not take (it checks first)
        "rope_write_kv": staticmethod(counted("rope_write_kv", lambda *a: cuda_fused.rope_write_kv(*a[:-1])))})
    monkeypatch.setattr(fused, "_backend", lambda device, dtype=None: kernels)
    monkeypatch.setattr(cpu, "rope_write_kv", kernels.rope_write_kv)
    monkeypatch.setattr(cpu, "write_kv", counted("write_kv", emulated.write_kv))
    monkeypatch.setattr(cpu, "paged_attention", counted("paged_attention", emulated.paged_attention))
    monkeypatch.setattr(cuda_decode, "paged_attention", counted("v2", cuda_decode.paged_attention))
    return calls


def test_the_device_forward_on_the_cuda_kernels_in_emulation(program, cuda_kernels, monkeypatch):
    """Every kernel of the step but the GEMMs and the first norm is a CUDA source run by the emulator:
    the fused ops through fused.py's checks, write_kv and attention through the custom ops (v2 for the
    decode steps, v1 for the prefill). What the forward hands the launchers (views, strides, the RoPE
    tables, the residual written in place) is what a GPU would get."""
    calls = cuda_kernels
    got = _prefill_then_decode(program, torch.inference_mode()(program.forward_device))
    layers = program.config.num_hidden_layers
    assert {name: calls.count(name) for name in set(calls)} == {
        "add_rms_norm": 2 * layers * 4, "silu_mul": layers * 4, "rope_write_kv": layers * 4,
        "paged_attention": layers * 4, "v2": layers * 3}   # 4 steps, 3 of decode; write_kv inside rope_write_kv
    monkeypatch.undo()
    assert rel_error(got, _prefill_then_decode(program, _torch_forward(program))) < 1e-5


def test_which_forward_a_program_takes(program, monkeypatch):
    assert program.norms is not None and not program.device_fused    # the CPU: its own fused C forward
    monkeypatch.setenv("KVOS_CUDA_FUSED", "0")
    assert llama.cuda_fused() is False
    monkeypatch.setenv("KVOS_CUDA_FUSED", "yes")
    with pytest.raises(KvosError, match="KVOS_CUDA_FUSED must be 0 or 1"):
        llama.cuda_fused()
    monkeypatch.delenv("KVOS_CUDA_FUSED")
    assert llama.cuda_fused() is True
    # A program on CUDA (one rank) sends forward() to forward_device; here its attributes stand in.
    import copy
    plain = copy.copy(program)
    plain.norms, plain.device_fused = None, True
    monkeypatch.setattr(type(plain), "forward_device", lambda self, b, kv: "device")
    assert plain.forward(None, None) == "device"


def test_decode_graphs_static_batches_on_the_cuda_kernels_in_emulation(cuda_kernels):
    """What a captured decode graph runs, without the capture: padded static batches (padding rows in the
    null frame, a page table as wide as the model's context) through forward_device on the emulated CUDA
    kernels (attention v2 over mostly dead chunks), each against the unpadded eager step on the same
    kernels; the null frame poisoned with NaN before every step; greedy outputs as the CPU kernel's."""
    jobs = workload(n=7, seed=5, output=(4, 12))
    want, _ = run_workload(jobs)
    k = kernel.boot(memory=frames(64), graphs=True)
    s = k.syscalls()
    tid = s.spawn_tenant(TINY)
    program = k.tenants[tid].program
    # An instance attribute, deleted after (monkeypatch would leave the bound method on the cached program,
    # and every program copied from it, an adapter's or a mixed step's, would run it).
    program.forward = torch.inference_mode()(program.forward_device)
    try:
        pids = [s.spawn(tid, prompt, max_tokens=n, ignore_eos=True, temperature=0) for prompt, n in jobs]
        seen = spy(k)
        run_poisoned(k)
    finally:
        del program.forward
    assert k.graphs.stats.static_steps == len(seen) > 3 and any(padding for *_, padding in seen)
    for static, eager, *_ in seen:
        assert torch.isfinite(static).all(), "a real row read the null frame"
        torch.testing.assert_close(static, eager, rtol=1e-4, atol=1e-4)
    assert [s.wait(pid).tokens for pid in pids] == want
    assert cuda_kernels.count("v2") >= len(seen) * k.tenants[tid].program.config.num_hidden_layers
    assert_all_memory_back(k)
