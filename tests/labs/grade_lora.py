"""Grader of lab lora: shared text, LoRA adapters over one base model (docs/labs/lora.md).

The adapters are made here by Hugging Face PEFT over transformers' own tiny-llama (B not zero, so an
adapter that adds nothing shows), and PEFT is the reference: an adapter's logits, and the greedy
tokens of the base and of each adapter, computed outside the kernel under test. In the kernel the
base's processes and two adapters' run together, prompts prefilled in chunks beside decodes, with
fsck after every step and every frame back; a step must run them in one forward; and with global
prefix sharing no program may map another's pages.
"""
import os

import pytest
import torch

import kernel
from tests.helpers.hf_reference import hf_model, rel_error
from tests.helpers.paged_runner import PagedRunner
from tests.kernel_helpers import TINY, frames
from tests.labs.grading import all_memory_back, jobs, points, rng, run_checked
from userspace.programs import tiny
from userspace.programs.loader import load_program

# The lab's code (LoraLinear.mm, mixed) is the Python layer loop's: with the C loop a step adds the deltas
# in csrc/cpu/layers.c (lora.with_c_loop) and never calls it. Read when a program loads: set before any does.
os.environ["KVOS_LAYER_LOOP"] = "python"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make(folder, seed, **options):
    from peft import LoraConfig, get_peft_model
    model = hf_model(tiny.TINY_CONFIG, tiny.tiny_weights(tiny.TINY_CONFIG, seed=0))
    torch.manual_seed(seed)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ALL, "init_lora_weights": False, **options})
    peft_model = get_peft_model(model, config).eval()
    peft_model.save_pretrained(str(folder))
    return f"{TINY}+lora:{folder}", peft_model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two adapters: (spec, PEFT model) each; the second on q and v only, rank 2, rsLoRA."""
    root = tmp_path_factory.mktemp("adapters")
    return [make(root / "a", 1), make(root / "b", 2, target_modules=["q_proj", "v_proj"], r=2, use_rslora=True)]


def greedy(model, prompt: list, n: int) -> list:
    """n greedy tokens after prompt, by PEFT (or by the base, inside disable_adapter)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def base_greedy(model, prompt: list, n: int) -> list:
    with model.disable_adapter():
        return greedy(model, prompt, n)


@points(3)
def test_an_adapter_computes_what_peft_computes(adapters):
    r = rng("logits")
    for spec, reference in adapters:
        program = load_program(spec)
        prompt = [r.randrange(3, 512) for _ in range(40)]
        runner = PagedRunner(program)
        seq = runner.new_seq()
        ours = torch.cat([runner.prefill(seq, prompt[:-3], chunk=9)] + [runner.step([(seq, [t])]) for t in prompt[-3:]])
        with torch.no_grad():
            want = reference(torch.tensor([prompt])).logits[0]
        assert rel_error(ours, want) < 1e-4, f"{spec}: the logits are not PEFT's"


def run_three(adapters, work, **boot):
    """The base's processes and both adapters' in one kernel, spawned at once; per program, its outputs."""
    k = kernel.boot(memory=frames(192), threads=1, **boot)
    sys = k.syscalls()
    tids = [sys.spawn_tenant(spec) for spec in [TINY] + [spec for spec, _ in adapters]]
    pids = [[sys.spawn(tid, prompt, max_tokens=n, ignore_eos=True, temperature=0) for prompt, n in work]
            for tid in tids]
    run_checked(k)
    out = [[sys.wait(pid).tokens for pid in row] for row in pids]
    all_memory_back(k)
    return out, k


@points(3)
def test_a_mixed_batch_gives_every_process_its_own_program_s_tokens(adapters):
    """Prompts of many lengths, prefilled in chunks of 24 tokens a step beside the others' decodes."""
    work = jobs(rng("mixed"), 3, prompt=(3, 60), output=(4, 12))
    got, _ = run_three(adapters, work, token_budget=24)
    reference = adapters[0][1]
    assert got[0] == [base_greedy(reference, p, n) for p, n in work], "the base's processes drew other tokens"
    for (spec, model), outputs in zip(adapters, got[1:]):
        assert outputs == [greedy(model, p, n) for p, n in work], f"{spec}'s processes drew other tokens than PEFT"


@points(2)
def test_a_step_runs_the_base_and_its_adapters_in_one_forward(adapters, monkeypatch):
    k = kernel.boot(memory=frames(192), threads=1)
    calls = []
    real = k.device.forward
    monkeypatch.setattr(k.device, "forward", lambda program, batch, kv: calls.append(k.stats.steps) or
                        real(program, batch, kv))
    sys = k.syscalls()
    tids = [sys.spawn_tenant(spec) for spec in [TINY] + [spec for spec, _ in adapters]]
    pids = [sys.spawn(tid, [5, 6, 7, 8, 9], max_tokens=6, ignore_eos=True, temperature=0) for tid in tids]
    run_checked(k)
    for pid in pids:
        sys.wait(pid)
    per_step = {step: calls.count(step) for step in calls}
    assert per_step and max(per_step.values()) == 1, \
        f"forwards a step: {sorted(per_step.values())[-1]} (the base's weights read once per program)"
    all_memory_back(k)


@points(2)
def test_pages_are_named_by_the_program_that_computed_them(adapters):
    """Global prefix sharing: the base's prompt pages, published first, must not serve an adapter."""
    spec, model = adapters[0]
    k = kernel.boot(memory=frames(128), threads=1)
    sys = k.syscalls()
    base, tuned = sys.spawn_tenant(TINY, prefix_sharing="global"), sys.spawn_tenant(spec, prefix_sharing="global")
    prompt = [r for r in range(40, 88)]
    sys.spawn(base, prompt, max_tokens=4, ignore_eos=True, temperature=0)
    run_checked(k)
    pid = sys.spawn(tuned, prompt, max_tokens=8, ignore_eos=True, temperature=0)
    run_checked(k)
    assert sys.wait(pid).tokens == greedy(model, prompt, 8), "the adapter ran on pages the base computed"
    assert sys.schedstat().cached_tokens == 0
    again = sys.spawn(tuned, prompt, max_tokens=8, ignore_eos=True, temperature=0)
    run_checked(k)
    assert sys.wait(again).tokens == greedy(model, prompt, 8) and sys.schedstat().cached_tokens > 0, \
        "an adapter's own pages should serve its next process"
    for p in sys.ps():
        sys.wait(p.pid)
    all_memory_back(k)
