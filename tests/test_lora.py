"""LoRA adapters (`BASE+lora:ADAPTER`, userspace/programs/lora.py) against Hugging Face PEFT on the
same weights: the logits and the greedy tokens of tiny-llama with an adapter that PEFT made and
saved; the base shared, never copied; base and adapter tenants side by side without mixing their
pages; what an adapter holds that kvos does not compute refused."""
import json

import pytest
import torch

import kernel
from kernel import ops
from kernel.errors import KvosError
from kernel.ops import hugepages
from tests.helpers.hf_reference import hf_model, rel_error
from tests.helpers.paged_runner import PagedRunner
from tests.kernel_helpers import assert_all_memory_back, frames, run_to_end
from userspace.programs import tiny
from userspace.programs.loader import load_program

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 1e-4


def peft_adapter(folder, seed=0, **options):
    """PEFT's LoRA over transformers' tiny-llama, B not zero (PEFT's default init would add nothing),
    saved to folder. -> the PEFT model (eval)."""
    from peft import LoraConfig, get_peft_model
    model = hf_model(tiny.TINY_CONFIG, tiny.tiny_weights(tiny.TINY_CONFIG, seed=0))
    torch.manual_seed(seed)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ALL, "init_lora_weights": False, **options})
    peft_model = get_peft_model(model, config).eval()
    peft_model.save_pretrained(str(folder))
    return peft_model


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    return folder, peft_adapter(folder)


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("options", [{}, {"target_modules": ["q_proj", "v_proj"], "use_rslora": True},
                                     {"target_modules": ["k_proj", "down_proj", "up_proj"], "r": 8,
                                      "rank_pattern": {"down_proj": 2}, "layers_to_transform": [1]}])
def test_an_adapter_computes_what_peft_computes(tmp_path, options):
    reference = peft_adapter(tmp_path, seed=3, **options)
    program = load_program(f"tiny-llama+lora:{tmp_path}")
    base = load_program("tiny-llama")
    ids = base.encode("kvos is an operating system for LLM inference. The page table maps virtual pages")
    runner = PagedRunner(program)
    seq = runner.new_seq()
    ours = runner.prefill(seq, ids[:-4], chunk=7)
    decoded = torch.stack([runner.step([(seq, [t])])[0] for t in ids[-4:]])
    want = logits(reference, ids)
    assert rel_error(ours, want[:-4]) < TOL and rel_error(decoded, want[-4:]) < TOL
    with reference.disable_adapter():
        assert rel_error(want, logits(reference, ids)) > 0.01        # the adapter changes the model
    if hugepages.available():            # its panels in one huge-page arena (kernel/ops/hugepages.py)
        from tests.test_hugepages import thp_eligible
        held = [t for slots in program.lora_weights.values() for w in slots.values() for t in w.tensors().values()]
        assert held and all(thp_eligible(t.data_ptr()) for t in held)


def test_the_base_is_shared_and_its_pages_are_not(adapter):
    """Two adapters' tenants and the base's run side by side: each draws PEFT's greedy tokens (or
    the base's), the adapters hold only their A and B, and with global prefix sharing no tenant maps
    another's prompt pages (their identities differ)."""
    folder, reference = adapter
    other = folder.parent / "other"
    other_reference = peft_adapter(other, seed=9)
    k = kernel.boot(memory=frames(96), threads=1)
    sys = k.syscalls()
    spec = f"tiny-llama+lora:{folder}"
    tids = [sys.spawn_tenant(s, prefix_sharing="global") for s in ("tiny-llama", spec, f"tiny-llama+lora:{other}")]
    base, mine, theirs = (k.tenants[t].program for t in tids)
    assert mine.layers[0].qkv_t.base is base.layers[0].qkv_t and mine.embed is base.embed
    assert mine.identity not in (base.identity, theirs.identity)
    assert 0 < mine.adapter_bytes < base.cost.weight_bytes / 2      # A and B only (in panels of 64 columns)
    assert load_program(spec) is mine                                  # one copy of the adapter too
    prompt = base.encode("The page table maps virtual pages to frames of the device")
    greedy = dict(max_tokens=12, temperature=0, ignore_eos=True)
    got = [sys.wait(sys.spawn(tids[0], prompt, **greedy)).tokens]       # the base's pages published first
    pids = [sys.spawn(tid, prompt, **greedy) for tid in tids[1:]]       # the two adapters in one batch
    got += [sys.wait(pid).tokens for pid in pids]
    assert sys.schedstat().cached_tokens == 0                           # nobody mapped another's prompt
    with torch.no_grad():
        want = [list(m.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):]) for m in (reference, other_reference)]
        with reference.disable_adapter():
            want.insert(0, list(reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):]))
    assert got == [[int(t) for t in w] for w in want]
    assert len({tuple(g) for g in got}) == 3
    again = sys.wait(sys.spawn(tids[1], prompt, **greedy))
    assert again.tokens == got[1] and sys.schedstat().cached_tokens > 0    # its own pages, mapped from the cache
    k.fsck()
    for tid in tids:
        sys.kill_tenant(tid)
    assert_all_memory_back(k)


def test_what_kvos_does_not_compute_is_refused(adapter, tmp_path):
    folder, _ = adapter
    config = json.loads((folder / "adapter_config.json").read_text())

    def variant(name, **changes):
        out = tmp_path / name
        out.mkdir()
        (out / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        (out / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
        return f"tiny-llama+lora:{out}"

    cases = [(variant("dora", use_dora=True), "EINVAL", "use_dora is not supported"),
             (variant("bias", bias="all"), "EINVAL", "bias is not supported"),
             (variant("saved", modules_to_save=["lm_head"]), "EINVAL", "modules_to_save is not supported"),
             (variant("alpha", lora_alpha=0), "EINVAL", "lora_alpha must be a positive number"),
             (variant("prefix", peft_type="PREFIX_TUNING"), "EINVAL", "not a LoRA adapter"),
             (f"tiny-llama+lora:{tmp_path / 'nowhere'}", "ENOENT", "no LoRA adapter here"),
             ("tiny-llama+lora:", "EINVAL", "a LoRA spec is BASE\\+lora:ADAPTER")]
    from safetensors.torch import load_file, save_file
    tensors = load_file(folder / "adapter_model.safetensors")
    for name, change, reason in (
            ("wide", lambda t: {k: torch.cat([v, v], 1) if "lora_A" in k else v for k, v in t.items()},
             "do not fit the base model"),
            ("embed", lambda t: {**t, "base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(4, 64)},
             "is not a LoRA A or B of a LLaMA layer's projection"),
            ("half", lambda t: {k: v for k, v in t.items() if "layers.0.mlp.up_proj.lora_B" not in k},
             "layer 0 up_proj needs lora_A and lora_B")):
        out = tmp_path / name
        out.mkdir()
        (out / "adapter_config.json").write_text(json.dumps(config))
        save_file(change(dict(tensors)), out / "adapter_model.safetensors")
        cases.append((f"tiny-llama+lora:{out}", "EINVAL", reason))
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "adapter_config.json").write_text(json.dumps(config))
    (torn / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    cases.append((f"tiny-llama+lora:{torn}", "EIO", "corrupt safetensors"))
    k = kernel.boot(memory=frames(16), threads=1)
    sys = k.syscalls()
    for spec, errno, reason in cases:
        with pytest.raises(KvosError, match=f"^{errno}: .*{reason}"):
            sys.spawn_tenant(spec)
    assert not k.tenants


@pytest.mark.slow
def test_smollm2_with_an_adapter_draws_peft_s_greedy_tokens(tmp_path):
    """SmolLM2-135M-Instruct with a PEFT adapter over all seven projections: 32 greedy tokens equal
    PEFT's; on the GGUF's own blocks (--weights gguf) the adapter runs too (no exact agreement), its
    deltas in the C layer loop as in the Python loop."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from userspace.programs import fetch
    path = fetch.model_file("smollm2-135m")[0]
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=ALL, init_lora_weights=False)
    peft_model = get_peft_model(model, config).eval()
    with torch.no_grad():                     # PEFT's random B is large: a small adapter keeps the text sane
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    peft_model.save_pretrained(str(tmp_path))
    program = load_program(f"smollm2-135m+lora:{tmp_path}")
    ids = program.apply_chat_template([{"role": "user", "content": "Explain how virtual memory works."}])
    with torch.no_grad():
        want = peft_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        with peft_model.disable_adapter():
            plain = peft_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    assert want != plain
    k = kernel.boot(memory="64MiB", threads=2)
    sys = k.syscalls()
    tid = sys.spawn_tenant(f"smollm2-135m+lora:{tmp_path}")
    assert sys.wait(sys.spawn(tid, ids, max_tokens=32, temperature=0, ignore_eos=True)).tokens == want
    quantized = load_program(f"smollm2-135m+lora:{tmp_path}", weights="gguf")
    runner = PagedRunner(quantized)
    first = runner.prefill(runner.new_seq(), ids)
    assert int(first[-1].argmax()) == want[0]
    # its deltas in the C layer loop after qmm's GEMMs: the Python loop's logits to the bit
    from tests.test_step_ops import _prefill_then_decode, _python_loop
    assert quantized.layer_weights is not None and quantized.layer_weights.lora is not None
    assert torch.equal(_prefill_then_decode(quantized, quantized.forward),
                       _prefill_then_decode(quantized, _python_loop(quantized).forward))


def test_an_adapter_s_rows_do_not_depend_on_their_batch(adapter):
    """Speculation verifies drafts in rows of 5 where plain decoding computes 1: an adapted row must
    come out the same either way (the deltas are per row too), so the draws are equal to the bit."""
    from tests.test_speculate import run
    folder, _ = adapter
    loop = [int(t) for t in load_program("tiny-llama").encode("the page table maps pages to frames " * 4)]
    jobs = [(loop, dict(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2)),
            (loop[3:], dict(max_tokens=40, temperature=0.8, seed=3, ignore_eos=True, logprobs=2))]
    plain, _ = run(0, jobs, tenant=f"tiny-llama+lora:{folder}")
    spec, k4 = run(4, jobs, tenant=f"tiny-llama+lora:{folder}")
    assert spec == plain and k4.stats.accepted_tokens > 0


def test_adapters_and_their_base_share_a_batch(adapter, monkeypatch):
    """A base's processes and two adapters' run in one forward a step (base.mixed), each row with
    its own adapter's delta: every process's logprobs equal, to the bit, the same process run alone."""
    from userspace.programs import lora
    folder, _ = adapter
    other = folder.parent / "third"
    peft_adapter(other, seed=4, target_modules=["v_proj", "up_proj"], r=2)
    mixes = []
    real = lora.mixed
    monkeypatch.setattr(lora, "mixed", lambda base, segments: mixes.append(len(segments)) or real(base, segments))
    specs = ["tiny-llama", f"tiny-llama+lora:{folder}", f"tiny-llama+lora:{other}"]
    prompt = load_program("tiny-llama").encode("Pages of the process map to frames")
    jobs = [dict(max_tokens=10, temperature=0, logprobs=3, ignore_eos=True),
            dict(max_tokens=10, temperature=0.9, seed=2, logprobs=3, ignore_eos=True)]

    def run(spec_jobs):
        k = kernel.boot(memory=frames(96), threads=1)
        sys = k.syscalls()
        tids = {spec: sys.spawn_tenant(spec) for spec in dict.fromkeys(s for s, _ in spec_jobs)}
        pids = [sys.spawn(tids[spec], prompt[j:], **jobs[j]) for spec, j in spec_jobs]
        run_to_end(k)
        out = []
        for pid in pids:
            entries = sys.read(pid, timeout=30).logprobs
            out.append((sys.wait(pid).tokens, [(e.token, e.logprob, e.top) for e in entries]))
        assert_all_memory_back(k)
        return out

    together = run([(spec, j) for j in range(2) for spec in specs])          # 6 processes, 3 programs
    assert mixes and max(mixes) == 4                                            # the 4 adapter processes' rows
    mixes.clear()
    for j in range(2):
        for s, spec in enumerate(specs):
            alone = run([(spec, j)])
            assert alone[0] == together[j * 3 + s], (spec, j)
    assert not mixes


def test_kvosd_serves_an_adapter_as_a_tenant(adapter):
    """What works in process works over HTTP: an adapter named in kvosd's tenants answers the OpenAI
    API with the kernel's tokens, beside its base."""
    import openai

    from userspace.daemon.config import DaemonConfig, TenantSpec
    from userspace.daemon.listen import ServerThread
    folder, _ = adapter
    spec = f"tiny-llama+lora:{folder}"
    k = kernel.boot(memory=frames(32), threads=1)
    sys = k.syscalls()
    want = sys.wait(sys.spawn(sys.spawn_tenant(spec), "Hello", max_tokens=8, temperature=0, ignore_eos=True))
    srv = ServerThread(DaemonConfig(boot=dict(device="cpu", memory="8MiB", threads=1), root_key="lora-root",
                                    tenants=[TenantSpec("base", "tiny-llama", "lora-base-key"),
                                             TenantSpec("tuned", spec, "lora-tuned-key")]))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="lora-tuned-key", max_retries=0)
        reply = client.completions.create(model="tuned", prompt="Hello", max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
        assert reply.choices[0].model_extra["token_ids"] == want.tokens
        cards = client.models.list().data
        assert [m.id for m in cards] == ["tuned"] and cards[0].model_extra["parent"] == "tiny-llama"
        client.close()
    finally:
        report = srv.stop()
    assert report["fsck"] == "clean" and report["frames_mapped"] == 0


def test_kvosd_loads_and_unloads_adapters_at_run_time(adapter):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: root's key makes an adapter a tenant
    that requests name as their model, and unloading kills it; the errors are vLLM's statuses."""
    from tests.test_daemon_conventions import call
    from userspace.daemon.config import DaemonConfig, TenantSpec
    from userspace.daemon.listen import ServerThread
    folder, _ = adapter
    k = kernel.boot(memory=frames(32), threads=1)
    sys = k.syscalls()
    want = sys.wait(sys.spawn(sys.spawn_tenant(f"tiny-llama+lora:{folder}"), "Hello", max_tokens=8, temperature=0,
                              ignore_eos=True))
    srv = ServerThread(DaemonConfig(boot=dict(device="cpu", memory="8MiB", threads=1), root_key="lora-root-key",
                                    tenants=[TenantSpec("base", "tiny-llama", "lora-base-key")]))
    root = "lora-root-key"
    try:
        load = {"lora_name": "tuned", "lora_path": str(folder)}
        status, _, text = call(srv.url, "POST", "/v1/load_lora_adapter", load, root)
        assert status == 200 and text == "Success: LoRA adapter 'tuned' added successfully."
        body = {"model": "tuned", "prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        reply = call(srv.url, "POST", "/v1/completions", body, root)[2]
        assert reply["choices"][0]["token_ids"] == want.tokens
        cards = {m["id"]: m["parent"] for m in call(srv.url, "GET", "/v1/models", key=root)[2]["data"]}
        assert cards == {"base": None, "tuned": "tiny-llama"}
        for bad, want_status, reason in (
                (load, 400, "a tenant named 'tuned' exists"),
                ({**load, "lora_name": "x", "lora_path": "/nowhere"}, 404, "no LoRA adapter here"),
                ({**load, "lora_name": "x", "base_model": "nobody"}, 404, "no tenant serves a base model"),
                ({**load, "lora_name": "x", "load_inplace": True}, 400, "load_inplace is not supported")):
            status, _, error = call(srv.url, "POST", "/v1/load_lora_adapter", bad, root)
            assert status == want_status and reason in error["error"]["message"], error
        assert call(srv.url, "POST", "/v1/load_lora_adapter", {**load, "lora_name": "y"}, "lora-base-key")[0] == 403
        status, _, error = call(srv.url, "POST", "/v1/unload_lora_adapter", {"lora_name": "base"}, root)
        assert status == 400 and "not a LoRA adapter" in error["error"]["message"]
        status, _, text = call(srv.url, "POST", "/v1/unload_lora_adapter", {"lora_name": "tuned", "lora_int_id": 1},
                               root)
        assert status == 200 and text == "Success: LoRA adapter 'tuned' removed successfully."
        assert call(srv.url, "POST", "/v1/completions", body, root)[0] == 404
        assert call(srv.url, "POST", "/v1/unload_lora_adapter", {"lora_name": "tuned"}, root)[0] == 404
    finally:
        report = srv.stop()
    assert report["fsck"] == "clean" and report["frames_mapped"] == 0


def test_an_unloaded_adapter_is_freed(tmp_path):
    """Killing an adapter's last tenant lets its program go (its A and B matrices) once the kernel has
    stepped on (the last step's shares name the tenants it saw), while the base runs on."""
    import gc
    import weakref
    folder = tmp_path / "own"                # its own adapter: no other test's tenant shares the program
    peft_adapter(folder, seed=11)
    k = kernel.boot(memory=frames(32), threads=1)
    sys = k.syscalls()
    base = sys.spawn_tenant("tiny-llama")
    tid = sys.spawn_tenant(f"tiny-llama+lora:{folder}", name="short-lived")
    for t in (base, tid):
        sys.wait(sys.spawn(t, "Hello", max_tokens=3, ignore_eos=True))
    program = weakref.ref(k.tenants[tid].program)
    sys.kill_tenant(tid)
    assert sys.wait(sys.spawn(base, "Hello", max_tokens=3, ignore_eos=True)).reason == "length"   # a step on
    gc.collect()
    assert program() is None
    assert_all_memory_back(k)


def raw_adapter(folder, seed: int, r: int = 4, targets=("q_proj", "v_proj", "down_proj")) -> str:
    """A LoRA adapter in PEFT's files, written without PEFT (the GPU machine has none): random A and B
    for tiny-llama. -> its spec."""
    from safetensors.torch import save_file
    c = tiny.TINY_CONFIG
    shapes = {"q_proj": (c.hidden_size, c.q_size), "k_proj": (c.hidden_size, c.kv_size),
              "v_proj": (c.hidden_size, c.kv_size), "o_proj": (c.q_size, c.hidden_size),
              "gate_proj": (c.hidden_size, c.intermediate_size), "up_proj": (c.hidden_size, c.intermediate_size),
              "down_proj": (c.intermediate_size, c.hidden_size)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(c.num_hidden_layers):
        for target in targets:
            block = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{block}.{target}"
            fan_in, fan_out = shapes[target]
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) / fan_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) / r ** 0.5
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                            "target_modules": list(targets), "bias": "none"}))
    return f"tiny-llama+lora:{folder}"


def greedy_tokens(device: str, specs: list, prompt: list) -> list:
    """Each spec's greedy 10 tokens, all its processes in one kernel on device (a mixed batch)."""
    k = kernel.boot(device=device, memory="8MiB", **({"threads": 1} if device == "cpu" else {}))
    sys = k.syscalls()
    pids = [sys.spawn(sys.spawn_tenant(spec), prompt, max_tokens=10, temperature=0, ignore_eos=True) for spec in specs]
    out = [sys.wait(pid).tokens for pid in pids]
    k.fsck()
    return out


def test_a_hand_written_adapter_runs_as_peft_s_do(tmp_path):
    """The files raw_adapter writes are what PEFT saves (the CUDA check below depends on them)."""
    spec = raw_adapter(tmp_path / "raw", seed=5)
    program = load_program(spec)
    assert sorted(program.lora_weights[0]) == ["down_t", "qkv_t"]
    specs = ["tiny-llama", spec]
    together = greedy_tokens("cpu", specs, [5, 6, 7, 8])
    assert together[0] != together[1] and together == [greedy_tokens("cpu", [s], [5, 6, 7, 8])[0] for s in specs]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_adapter_on_cuda_computes_what_the_cpu_does(tmp_path, monkeypatch):
    """The deltas on CUDA are torch GEMMs (the CPU's are panels): float32 logits within 1e-4 of the
    CPU's, and greedy tokens of the base and two adapters in one batch equal the CPU kernel's."""
    monkeypatch.setenv("KVOS_DTYPE", "float32")          # CUDA programs are bf16 by default
    specs = ["tiny-llama", raw_adapter(tmp_path / "a", seed=1), raw_adapter(tmp_path / "b", seed=2, r=2,
                                                                             targets=("k_proj", "gate_proj"))]
    prompt = load_program("tiny-llama").encode("The page table maps virtual pages to frames of the device")
    for spec in specs[1:]:
        outs = []
        for device in ("cpu", "cuda"):
            runner = PagedRunner(load_program(spec, device, dtype=torch.float32), device=device)
            outs.append(runner.prefill(runner.new_seq(), prompt, chunk=7).float().cpu())
        assert rel_error(outs[1], outs[0]) < 1e-4, spec
    assert greedy_tokens("cuda", specs, prompt) == greedy_tokens("cpu", specs, prompt)


def test_the_c_layer_loop_adds_the_deltas_the_python_loop_adds(adapter, tmp_path):
    """An adapted step runs csrc/cpu/layers.c with the adapters' deltas (LayerWeights.with_deltas): an
    adapter's own program, and a batch of the base's rows and two adapters' (base.mixed), give the
    Python loop's logits (LoraLinear.mm) to the bit, prompts in chunks beside decodes."""
    from tests.test_step_ops import _prefill_then_decode, _python_loop
    from userspace.programs import lora
    folder, _ = adapter
    other = tmp_path / "other"
    peft_adapter(other, seed=5, target_modules=["q_proj", "v_proj", "down_proj"], r=2)
    base = load_program("tiny-llama")
    one, two = load_program(f"tiny-llama+lora:{folder}"), load_program(f"tiny-llama+lora:{other}")
    assert one.layer_weights is not None and one.layer_weights.lora is not None   # the C loop, with deltas
    assert torch.equal(_prefill_then_decode(one, one.forward), _prefill_then_decode(one, _python_loop(one).forward))

    def batch_of_four(make):
        """Rows of four sequences (base, one, base, two): a prefill chunk each, then two decode steps."""
        def forward(batch, kv):
            starts = batch.query_start.tolist()
            return make([(starts[1], starts[2], one), (starts[3], starts[4], two)]).forward(batch, kv)
        runner = PagedRunner(base, num_frames=64, page_size=16, seed=4)
        runner.program = type("P", (), {"forward": lambda self, b, kv: forward(b, kv)})()
        seqs = [runner.new_seq() for _ in range(4)]
        out = [runner.step([(s, list(range(10 + 7 * i, 19 + 12 * i))) for i, s in enumerate(seqs)], sample_all=True)]
        for t in range(2):
            out.append(runner.step([(s, [100 + 10 * i + t]) for i, s in enumerate(seqs)]))
        return torch.cat(out)
    c_loop = batch_of_four(base.mixed)
    assert base.mixed([(0, 1, one)]).layer_weights.lora is not None
    assert torch.equal(c_loop, batch_of_four(lambda segments: lora.mixed(base, segments)))
    assert not torch.equal(c_loop, batch_of_four(lambda segments: base))          # the deltas are there


def test_the_c_loop_refuses_deltas_and_rows_that_do_not_fit(adapter):
    """What the C loop would read past: a delta's panels of another shape, rows outside the step,
    overlapping or for another number of adapters; each EINVAL before anything runs."""
    from tests.test_step_ops import _step
    folder, _ = adapter
    one = load_program(f"tiny-llama+lora:{folder}")
    base = one.base_program
    a, b, r = one.lora_weights[0]["qkv_t"].c_delta
    for bad, match in (({(0, "qkv"): (b, a, r)}, "does not fit"), ({(0, "o"): (a, b, r)}, "does not fit"),
                       ({(9, "qkv"): (a, b, r)}, "layers"), ({(0, "qkv"): (a, b, r + 1)}, "needs float32 panels"),
                       ({(0, "qkv"): (a.double(), b, r)}, "float32"),
                       ({(0, "qkv"): (ops.panel_pack(ops.panel_unpack(a, r)), b, r)}, "16 wide")):
        with pytest.raises(KvosError, match=match):
            base.layer_weights.with_deltas([bad])
    runner = PagedRunner(one, num_frames=4)
    pool = runner.device.pool.clone()
    for rows, match in (([[(0, 3)]], "inside the step's 2 rows"), ([[(0, 2), (1, 2)]], "ascending"),
                        ([None, None], "rows of 1 adapters"), (None, "rows of 1 adapters")):
        step = _step(one, runner)
        x = torch.randn(2, one.config.hidden_size)
        step.rms_norm(x, 0)
        with pytest.raises(KvosError, match=match):
            step.layers(one.layer_weights, x, rows)
    assert torch.equal(runner.device.pool, pool)
    step = _step(base, runner)
    x = torch.randn(2, base.config.hidden_size)
    step.rms_norm(x, 0)
    with pytest.raises(KvosError, match="without LoRA deltas"):
        step.layers(base.layer_weights, x, [None])
