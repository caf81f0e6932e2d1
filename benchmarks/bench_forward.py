"""Where a decode step of the fp32 program goes, against its roofline, and A/B of forward variants.

`python benchmarks/bench_forward.py [--threads 1] [--rounds 5] [--batches 1,8,32]` boots kvos on the
CPU (manual mode), runs decode steps at batch B (B requests of 128 prompt tokens, 24 generated each)
and, in the same process and interleaved round by round (A B, B A, ...), times:

  step      this process's CPU time per decode step (and the kernel's step timer, wall),
            for each forward variant (LlamaProgram.forward swapped between rounds; the tokens of variants with
            the same rounding must agree)
  gemm      the step's matmuls alone on the program's own weights (30 x QKV, O, gate/up, down + LM head);
            with the mkl variant also on MKL's layout (the same values unpacked to (in, out) tensors)
  roofline  max(FLOPs / measured GEMM rate, bytes / measured read rate) for that step shape

Times are CPU time (time.process_time), meant for --threads 1: a busy neighbour then takes turns
instead of stalling barriers, and CPU time holds (the shared memory bus still does not). Medians over
rounds; the variants alternate within one run and only same-run ratios mean anything. The variant
`mkl` is the forward before kernel.ops.panel_mm (torch.mm / addmm_ / F.linear on unpacked copies of
the weights); its tokens may differ in the last bits' ties, and the script counts how many do. --calls counts
the Python-level calls and the aten ops of one decode step (cProfile, torch.profiler) of each variant.
`base` is LlamaProgram.forward (on the CPU in float32: the fused C ops, kernel/ops/step_ops.py),
`torch` the forward in torch ops (LlamaProgram.forward_torch). KVOS_WEIGHTS=gguf runs the GGUF's
quantized program instead of the float32 one. --matmul bfloat16 runs the bf16-matmul program
(kvos-bf16: bf16 panels) instead; its `mkl` variant is then the bf16 forward before the panels, torch.mm
on bf16 (in, out) tensors (oneDNN) and F.linear on a bf16 head, and the roofline prices FLOPs at the
faster of the bf16 panel kernel and oneDNN's bf16 GEMM.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

PROMPT, GENERATE = 128, 24
CLOCK = time.process_time     # this process's CPU time: with one thread, a busy neighbour does not count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--variants", default="base,torch", help="comma-separated from: " + ", ".join(VARIANTS))
    p.add_argument("--calls", action="store_true", help="count Python-level calls of one decode step")
    p.add_argument("--matmul", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "KVOS_THREADS"):
        os.environ[name] = str(args.threads)
    os.environ["KVOS_MATMUL"] = args.matmul     # the kernel's program and this script's are one

    import torch

    import kernel
    from userspace.programs.llama import LlamaProgram
    from userspace.programs.loader import load_program

    k = kernel.boot(device="cpu", memory="1GiB", threads=args.threads)
    root = k.syscalls()
    tid = root.spawn_tenant("smollm2-135m")
    program = load_program("smollm2-135m")             # the kernel's own copy (the loader shares it)
    base = LlamaProgram.forward
    variants = {name: VARIANTS[name](base) for name in args.variants.split(",")}
    mkl = mkl_weights(torch, program) if "mkl" in variants else None
    if mkl is not None:
        variants["mkl"] = mkl_variant(base, program, *mkl)
    rates = measure_rates(torch, program.matmul_dtype)
    print(f"threads {args.threads}; {args.matmul} GEMM {rates['flops'] / 1e9:.0f} GFLOP/s (512x576x3072: "
          f"torch {rates['mkl_flops'] / 1e9:.0f}, panel_mm {rates['panel_flops'] / 1e9:.0f}), "
          f"read {rates['read'] / 1e9:.1f} GB/s (sum over 512 MiB); weights {program.cost.weight_bytes / 1e6:.0f} MB")
    if args.calls:
        for name, fn in variants.items():
            LlamaProgram.forward = fn
            try:
                print(f"[{name}]", end=" ")
                count_calls(root, tid, program)
            finally:
                LlamaProgram.forward = base
    for batch in [int(b) for b in args.batches.split(",")]:
        steps = {name: [] for name in variants}
        cpus = {name: [] for name in variants}
        tokens = {}
        gemm, gemm_mkl = [], []
        order = list(variants)
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                LlamaProgram.forward = variants[name]
                try:
                    s, c, toks = run_batch(root, tid, batch, r)
                finally:
                    LlamaProgram.forward = base
                steps[name].append(statistics.median(s))
                cpus[name].append(statistics.median(c))
                if tokens.setdefault((name, r), toks) != toks:
                    raise AssertionError("a variant's tokens changed between rounds")
            gemm.append(time_gemms(torch, program, batch))
            if mkl is not None:
                gemm_mkl.append(time_gemms(torch, program, batch, mkl[0], mkl[1]))
        for r in range(args.rounds):
            outs = [tokens[(name, r)] for name in variants if name not in OTHER_ROUNDING]
            if any(o != outs[0] for o in outs):
                raise AssertionError(f"batch {batch}: the variants' tokens differ (round {r})")
        for other in OTHER_ROUNDING & set(variants) - {order[0]}:   # report how many greedy tokens change
            ref = [tokens[(order[0], r)] for r in range(args.rounds)]
            got = [tokens[(other, r)] for r in range(args.rounds)]
            pairs = [(a, b) for rr, gg in zip(ref, got) for ra, rb in zip(rr, gg) for a, b in zip(ra, rb)]
            print(f"batch {batch:3d}: {other}'s greedy tokens equal {order[0]}'s at "
                  f"{sum(a == b for a, b in pairs)} of {len(pairs)} positions")
        roof = roofline(program, batch, rates)
        g = statistics.median(gemm)
        print(f"batch {batch:3d}: roofline {roof * 1e3:6.1f} ms; GEMMs alone {g * 1e3:6.1f} ms CPU "
              f"({program.cost.weight_bytes / g / 1e9:.1f} GB/s of weights)"
              + (f"; on MKL's layout {statistics.median(gemm_mkl) * 1e3:6.1f} ms" if gemm_mkl else ""))
        first = order[0]
        for name in order:
            st, cp = statistics.median(steps[name]), statistics.median(cpus[name])
            print(f"    {name:9s} step CPU {cp * 1e3:6.1f} ms (wall {st * 1e3:6.1f})  {roof / cp:5.1%} of roofline  "
                  f"x{statistics.median(cpus[first]) / cp:.3f} vs {first}  "
                  f"[CPU by round: {', '.join(f'{x * 1e3:.1f}' for x in cpus[name])}]")
    k.shutdown()
    return 0


def run_batch(root, tid, batch: int, round_: int):
    """B requests of PROMPT tokens, GENERATE each; (decode step seconds, CPU seconds per step, tokens).
    Prompts differ by round so nothing comes from the page cache."""
    pids = []
    for i in range(batch):
        prompt = [1000 + (round_ * 131 + i * 17 + j * 7) % 40000 for j in range(PROMPT)]
        pids.append(root.spawn(tid, prompt, max_tokens=GENERATE, temperature=0, ignore_eos=True))
    since = root.schedstat().steps
    seconds, cpu = [], []
    while True:
        c0 = time.process_time()
        steps = root.trace(since=since, timeout=600)
        c1 = time.process_time()
        if not steps:
            break
        since = steps[-1].step
        for s in steps:
            if not s.prefill_tokens and s.batch_size == batch:
                seconds.append(s.seconds)
                cpu.append((c1 - c0) / len(steps))
    return seconds, cpu, [list(root.wait(pid).tokens) for pid in pids]


def measure_rates(torch, dtype=None) -> dict:
    """The GEMM rate is the better of torch's F.linear (MKL; oneDNN in bf16) and ops.panel_mm on
    512 x 576 x 3072 in the matmul dtype: the roofline prices FLOPs at the fastest GEMM this process
    has (float32 panel_mm is 2.4x MKL's on AMD Zen)."""
    from userspace.programs import qlinear
    dtype = dtype or torch.float32
    x, w = torch.randn(512, 576), torch.randn(3072, 576)
    panel = qlinear.PanelLinear.from_float(w, dtype)
    buf = torch.ones((512 << 20) // 4)
    flops = 2 * 512 * 576 * 3072
    xd, wd = x.to(dtype), w.to(dtype)
    mkl = flops / best(lambda: torch.nn.functional.linear(xd, wd), 20)
    panels = flops / best(lambda: panel.mm(x), 20)
    return {"flops": max(mkl, panels), "mkl_flops": mkl, "panel_flops": panels, "read": (512 << 20) / best(buf.sum, 5)}


def best(fn, n):
    fn()
    out = float("inf")
    for _ in range(n):
        t = CLOCK()
        fn()
        out = min(out, CLOCK() - t)
    return out


def time_gemms(torch, program, m: int, layers=None, head=None) -> float:
    """The decode step's matmuls on the program's weights, in layer order (weights stream from memory),
    through qlinear's calls as the forward makes them; layers / head: another set of the same weights
    (mkl_weights) timed the same way."""
    from userspace.programs import qlinear
    c = program.config
    x = torch.randn(m, c.hidden_size)
    a = torch.randn(m, c.q_size)
    act = torch.randn(m, c.intermediate_size)
    md = program.matmul_dtype
    t = CLOCK()
    for layer in layers or program.layers:
        qlinear.mm(x.to(md), layer.qkv_t)             # as the forward casts (a no-op in float32)
        qlinear.add_mm(x, a, layer.o_t)
        qlinear.mm(x.to(md), layer.gate_up_t)
        qlinear.add_mm(x, act, layer.down_t)
    qlinear.head(x, program.lm_head if head is None else head, program.matmul_dtype)
    return CLOCK() - t


def mkl_weights(torch, program):
    """The program's weights as they were before ops.panel_mm: (in, out) tensors in the matmul dtype for
    torch.mm / addmm_ and the (vocab, hidden) head for F.linear (unpacked from the panels: the same
    values; a tied embedding stays float32, holding the panels' values)."""
    from types import SimpleNamespace

    from userspace.programs import qlinear
    md = program.matmul_dtype

    def plain(w, dtype):
        return w.dequantize().to(dtype) if isinstance(w, qlinear.PanelLinear) else w
    layers = [SimpleNamespace(**{n: getattr(layer, n) for n in layer.__slots__}) for layer in program.layers]
    for layer in layers:
        for n in ("qkv_t", "o_t", "gate_up_t", "down_t"):
            w = getattr(layer, n)
            if isinstance(w, qlinear.PanelLinear):
                setattr(layer, n, w.dequantize().t().to(md).contiguous())
    return layers, plain(program.lm_head, md), plain(program.embed, torch.float32)


def roofline(program, batch: int, rates: dict) -> float:
    """One decode step of `batch` sequences at mid-generation context: max(compute, read)."""
    cost = program.cost
    context = PROMPT + GENERATE // 2
    flops = 2 * cost.num_params * batch + cost.attention_flops(1, context) * batch
    nbytes = cost.weight_bytes + batch * context * program.kv_shape.bytes_per_token
    return max(flops / rates["flops"], nbytes / rates["read"])


def count_calls(root, tid, program) -> None:
    pid = root.spawn(tid, list(range(1000, 1000 + PROMPT)), max_tokens=3, temperature=0, ignore_eos=True)
    since = root.schedstat().steps
    root.trace(since=since, timeout=600)                    # the prefill
    prof = cProfile.Profile()
    prof.enable()
    root.trace(since=since + 1, timeout=600)                # one decode step
    prof.disable()
    root.wait(pid)
    stats = pstats.Stats(prof)
    total = sum(v[1] for v in stats.stats.values())
    fwd = [v for (f, _, fn), v in stats.stats.items() if fn == "forward" and f.endswith("llama.py")]
    print(f"one decode step: {total} Python-level calls, {total / program.config.num_hidden_layers:.0f} per layer; "
          f"forward's own time {fwd[0][2] * 1e3:.2f} ms" if fwd else f"one decode step: {total} calls")
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][1])[:12]
    for (f, _, fn), (_, nc, tt, _, _) in rows:
        print(f"    {nc:6d} calls  {tt * 1e3:7.2f} ms own  {os.path.basename(f)}:{fn}")
    # The aten ops of one decode step (torch.profiler's CPU events: every dispatched op, views included).
    import torch
    pid = root.spawn(tid, list(range(2000, 2000 + PROMPT)), max_tokens=3, temperature=0, ignore_eos=True)
    since = root.schedstat().steps
    root.trace(since=since, timeout=600)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        root.trace(since=since + 1, timeout=600)
    root.wait(pid)
    counts = {}
    for e in prof.events():
        if e.name.startswith("aten::"):
            counts[e.name] = counts.get(e.name, 0) + 1
    total = sum(counts.values())
    print(f"    aten ops (nested included): {total}, {total / program.config.num_hidden_layers:.0f} per layer; "
          + ", ".join(f"{k[6:]} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:10]))


# -- forward variants ------------------------------------------------------------------------------------
def lean(base, unchecked: bool = False):
    """The same arithmetic in the same order, with less Python per layer: names bound once, no no-op
    casts, SiLU in place on the gate half. Exact: every op that touches numbers is the same op.

    unchecked: besides, layers after the first call the C kernels without dispatch's Python checks
    (shapes, dtypes: the same as the first layer's, which were checked). Measurement only: it
    reaches past the program ABI into kernel.ops.cpu."""
    import torch
    import torch.nn.functional as F

    from kernel import ops
    from kernel.ops import cpu
    from userspace.programs import qlinear

    rms_norm, mm, add_mm, silu = F.rms_norm, qlinear.mm, qlinear.add_mm, F.silu
    write_kv, attention = ops.write_kv, ops.paged_attention

    @torch.inference_mode()
    def forward(self, batch, kv):
        if self.matmul_dtype != self.dtype or self.layers[0].qkv_bias is not None or self.layers[0].o_bias is not None:
            return base(self, batch, kv)
        c = self.config
        n = batch.token_ids.shape[0]
        hidden, eps = (c.hidden_size,), c.rms_norm_eps
        nq, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_end, k_end, inter = c.q_size, c.q_size + c.kv_size, c.intermediate_size
        rope, scale = self.rope, self.scale
        cos, sin = rope.lookup(batch.positions)
        slots, table, qstart, ctx = batch.slot_mapping, batch.page_table, batch.query_start, batch.context_lens
        x = qlinear.embedding(batch.token_ids, self.embed)
        for index, layer in enumerate(self.layers):
            qkv = mm(rms_norm(x, hidden, layer.attn_norm, eps), layer.qkv_t)
            qk = rope.apply(qkv[:, :k_end].view(n, nq + nkv, d), cos, sin)
            k_cache, v_cache = kv.layer(index)
            k, v, q = qk[:, nq:], qkv[:, k_end:].view(n, nkv, d), qk[:, :nq]
            if unchecked and index > 0:
                cpu.write_kv(k_cache, v_cache, k, v, slots, False)
                attn = cpu.paged_attention(q, k_cache, v_cache, table, qstart, ctx, scale,
                                           torch.empty(q.shape), False)
            else:
                write_kv(k_cache, v_cache, k, v, slots, check=index == 0)
                attn = attention(q, k_cache, v_cache, table, qstart, ctx, scale, check=index == 0)
            add_mm(x, attn.view(n, q_end), layer.o_t)
            gate_up = mm(rms_norm(x, hidden, layer.mlp_norm, eps), layer.gate_up_t)
            add_mm(x, silu(gate_up[:, :inter], inplace=True).mul_(gate_up[:, inter:]), layer.down_t)
        x = rms_norm(x.index_select(0, batch.sample_indices), hidden, self.norm, eps)
        return qlinear.head(x, self.lm_head, self.matmul_dtype)

    return forward


def mkl_variant(base, program, layers, head, embed):
    """The forward as it was before ops.panel_mm: the same code on (in, out) tensors (torch.mm, addmm_)
    and a plain head (F.linear), swapped into the program for the call."""
    names = ("qkv_t", "o_t", "gate_up_t", "down_t")

    def forward(self, batch, kv):
        saved = ([[getattr(layer, n) for n in names] for layer in self.layers], self.lm_head, self.embed)
        try:
            for layer, plain in zip(self.layers, layers):
                for n in names:
                    setattr(layer, n, getattr(plain, n))
            self.lm_head, self.embed = head, embed
            return base(self, batch, kv)
        finally:
            for layer, ws in zip(self.layers, saved[0]):
                for n, w in zip(names, ws):
                    setattr(layer, n, w)
            self.lm_head, self.embed = saved[1], saved[2]
    return forward


# Variants whose float rounding differs from base's (another summation order, C's exp2 and rsqrt):
# their greedy tokens are counted against base's, not required equal.
OTHER_ROUNDING = {"mkl", "torch", "lean", "unchecked"}


def torch_ops(base):
    """The forward before the fused C ops (LlamaProgram.forward_torch: F.rms_norm, RoPE in torch ops,
    write_kv and attention through dispatch's per-layer checks, F.silu)."""
    import torch

    from userspace.programs.llama import LlamaProgram
    return torch.inference_mode()(LlamaProgram.forward_torch)


VARIANTS = {"base": lambda base: base, "torch": torch_ops, "lean": lean,
            "unchecked": lambda base: lean(base, unchecked=True),
            "mkl": lambda base: base}     # replaced in main() by mkl_variant (it needs the program)

if __name__ == "__main__":
    raise SystemExit(main())
