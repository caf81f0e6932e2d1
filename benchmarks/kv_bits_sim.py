"""How many bits K and V need: SmolLM2's accuracy with its K/V rounded to fewer bits (issue 17).

Before a KV format is built, this measures what it would cost. The float32 program runs with the
Python layer loop, and before every attention call the layer's whole float32 cache is rounded in
place to the candidate format (per row, or per group of dims; symmetric: scale = amax / qmax,
codes in [-qmax, qmax]; asymmetric: min and (max - min) / (2^bits - 1)). Rounding is idempotent on
rows already rounded, so every row attention reads is exactly the candidate format's widening.
Keys may instead be grouped per channel (KIVI's layout, a K field like "4pc"): each dim of each KV
head has its own asymmetric range over the tokens of one full page; a page still filling keeps its
keys as the int8 cache's rows (symmetric, 64 dims) until its last token arrives, as a real cache
would have to (its range is not known before), and is then re-rounded from those int8 values.
Symmetric 8-bit rows of 64 reproduce the real int8 cache's numbers (docs/programs.md), which
checks the method. Reports, against the same program with float32 K/V: perplexity on the fixed
text of tests/test_quant_smollm2.py, the logits' relative error (median, max over positions), and
how many of 32 greedy tokens agree before the first difference on six chat prompts.
Run: PYTHONPATH=$PWD python benchmarks/kv_bits_sim.py [--formats 8/8/64/sym,8/4/32/asym,4pc/4/32/asym]
"""
import argparse
import os

os.environ["KVOS_LAYER_LOOP"] = "python"        # attention through CpuStep.attention, one call a layer

import torch  # noqa: E402

from kernel.ops import step_ops  # noqa: E402
from tests.helpers.paged_runner import PagedRunner  # noqa: E402
from tests.test_quant_smollm2 import CHATS, NEW, TEXT  # noqa: E402
from userspace.programs.loader import load_program  # noqa: E402

DEFAULT = ("8/8/64/sym,4/4/64/sym,4/4/32/sym,4/4/64/asym,4/4/32/asym,4/4/16/asym,"
           "8/4/64/sym,8/4/32/asym")


def rounded_asym(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """x rounded to `bits` with an asymmetric range (min, max) along `dim`."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    qmax = 2 ** bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-30)
    return ((x - lo) / scale).round().clamp(0, qmax) * scale + lo


def rounded(x: torch.Tensor, bits: int, group: int, asym: bool) -> torch.Tensor:
    """x with each group of `group` values along its last dim rounded to `bits`."""
    g = x.reshape(-1, group)
    if asym:
        return rounded_asym(g, bits, 1).reshape(x.shape)
    qmax = 2 ** (bits - 1) - 1
    scale = (g.abs().amax(1, keepdim=True) / qmax).clamp_min(1e-30)
    return ((g / scale).round().clamp(-qmax, qmax) * scale).reshape(x.shape)


def rounded_keys_per_channel(k_cache: torch.Tensor, bits: int, page_table, context_lens) -> None:
    """Round, in place, every sequence's keys per (page, KV head, dim) over the page's tokens (asymmetric);
    the last page while it fills keeps int8 rows. Frames shared by several sequences are rounded once
    (a shared page is full, and its rounding is idempotent)."""
    page_size = k_cache.shape[1]
    full, filling = set(), set()
    for row, length in zip(page_table.tolist(), context_lens.tolist()):
        full.update(row[:length // page_size])
        if length % page_size:
            filling.add(row[length // page_size])
    if full:
        frames = torch.tensor(sorted(full))
        k_cache[frames] = rounded_asym(k_cache[frames], bits, 1)   # (pages, tokens, heads, dim): over tokens
    if filling:
        frames = torch.tensor(sorted(filling))
        k_cache[frames] = rounded(k_cache[frames], 8, k_cache.shape[-1], False)


def parse(spec: str):
    k_bits, v_bits, group, kind = spec.split("/")
    if kind not in ("sym", "asym"):
        raise SystemExit(f"{spec}: the fourth field is sym or asym")
    per_channel = k_bits.endswith("pc")
    return int(k_bits.removesuffix("pc")), int(v_bits), int(group), kind == "asym", per_channel


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=DEFAULT, help="K bits/V bits/group/sym|asym, comma-separated")
    args = parser.parse_args(argv)
    fmt = [None]                                 # the format attention sees now (None: float32)
    attention = step_ops.CpuStep.attention

    def rounding_attention(self, layer):
        if fmt[0] is not None:
            k_bits, v_bits, group, asym, per_channel = fmt[0]
            k_cache, v_cache = self.kv.layer(layer)
            if per_channel:
                rounded_keys_per_channel(k_cache, k_bits, self.page_table, self.context_lens)
            else:
                k_cache.copy_(rounded(k_cache, k_bits, group, asym))
            v_cache.copy_(rounded(v_cache, v_bits, group, asym))
        return attention(self, layer)

    step_ops.CpuStep.attention = rounding_attention
    program = load_program("smollm2-135m", "cpu")
    ids = program.encode(TEXT)
    prompts = [program.apply_chat_template([{"role": "user", "content": c}]) for c in CHATS]

    def measure():
        runner = PagedRunner(program)
        logits = runner.prefill(runner.new_seq(), ids)
        ppl = torch.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))).item()
        greedy, _ = PagedRunner(program).greedy(prompts, NEW)
        return logits, ppl, greedy

    base, base_ppl, base_greedy = measure()
    print(f"float32 K/V: perplexity {base_ppl:.3f}")
    for spec in args.formats.split(","):
        fmt[0] = parse(spec)
        logits, ppl, greedy = measure()
        err = (base - logits).norm(dim=1) / base.norm(dim=1)
        agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(base_greedy, greedy)]
        keys = f"K{fmt[0][0]} per channel over a page" if fmt[0][4] else f"K{fmt[0][0]}"
        print(f"{keys} V{fmt[0][1]} groups of {fmt[0][2]} {'asym' if fmt[0][3] else 'sym'}: perplexity "
              f"{ppl:.3f} ({(ppl - base_ppl) / base_ppl:+.2%}), logits error median {err.median():.4f} max "
              f"{err.max():.4f}, greedy agreement {agree}", flush=True)


if __name__ == "__main__":
    main()
