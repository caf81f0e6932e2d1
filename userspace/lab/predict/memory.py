"""Questions on KV memory: how much a pool holds, what reserving for max_tokens wastes, what fork shares."""
from __future__ import annotations

from userspace.lab.predict import Question
from userspace.lab.predict.common import boot, prompt, step

# (layers, K/V heads, head dim, bytes per element) of the simulated device's model presets
SHAPES = {"llama-2-7b": (32, 32, 128, 2), "llama-2-13b": (40, 40, 128, 2), "llama-3-8b": (32, 8, 128, 2),
          "smollm2-135m": (30, 3, 64, 2)}


def kv_budget(r, seed) -> Question:
    model = r.choice(sorted(SHAPES))
    layers, heads, dim, size = SHAPES[model]
    gib = r.randint(1, 16)
    per_token = 2 * layers * heads * dim * size
    frames = gib * 2**30 // (16 * per_token)
    text = (f"{model} has {layers} layers, {heads} K/V heads of {dim} dimensions, stored in {size}-byte floats. "
            f"A kernel is booted with memory=\"{gib}GiB\" of KV cache and 16-token pages (sim:a100-80g).\n"
            f"  a) How many bytes of K/V does one token take?\n"
            f"  b) How many frames (16-token pages) does the pool hold?\n"
            f"  c) How many processes with 2,048-token contexts fit in it at once?")
    explain = (f"a) K and V, per layer and head: 2 x {layers} x {heads} x {dim} x {size} = {per_token:,} bytes. "
               f"b) a frame is 16 x {per_token:,} = {16 * per_token:,} bytes; {gib} GiB / that = {frames:,} "
               f"(rounded down). c) a 2,048-token context is 128 pages: {frames:,} // 128 = {frames // 128}.")

    def measure() -> dict:
        root, tid = boot(model, memory=f"{gib}GiB")
        total = root.meminfo().total
        return {"bytes_per_token": root.tenantinfo(tid).kv_bytes_per_token, "frames": total,
                "contexts": total // (2048 // root.tenantinfo(tid).page_size)}
    return Question("kvbudget", seed, text, {"bytes_per_token": per_token, "frames": frames,
                                               "contexts": frames // 128}, explain, measure)


def reservation(r, seed) -> Question:
    lengths = [r.randint(10, 200) for _ in range(r.randint(3, 8))]
    budget = r.choice([128, 256, 512])
    paged = sum(-(-p // 16) for p in lengths)
    reserved = sum(-(-(p + budget) // 16) for p in lengths)
    text = (f"{len(lengths)} processes arrive at once with prompts of {', '.join(map(str, lengths))} tokens, each "
            f"with max_tokens={budget}; pages hold 16 tokens and the first step computes every prompt.\n"
            f"  a) How many frames are mapped after the first step with alloc=\"paged\" (on demand)?\n"
            f"  b) And with alloc=\"prealloc\" (a reservation for prompt + max_tokens at admission)?\n"
            f"  c) Of the slots of those reserved frames, how many hold no token yet?")
    explain = (f"a) each prompt's pages: sum of ceil(p / 16) = {paged}. b) sum of ceil((p + {budget}) / 16) = "
               f"{reserved}. c) {reserved} x 16 slots - {sum(lengths)} prompt tokens = {reserved * 16 - sum(lengths)}: "
               f"memory a paged kernel would give to other processes.")

    def measure() -> dict:
        out = {}
        for alloc in ("paged", "prealloc"):
            root, tid = boot(alloc=alloc, token_budget=4096)
            for i, p in enumerate(lengths):
                root.spawn(tid, prompt(i, p), max_tokens=budget, ignore_eos=True)
            step(root)
            out[alloc] = root.meminfo()
        return {"paged_frames": out["paged"].mapped, "prealloc_frames": out["prealloc"].mapped,
                "empty_slots": out["prealloc"].token_capacity - out["prealloc"].tokens_stored}
    return Question("prealloc", seed, text, {"paged_frames": paged, "prealloc_frames": reserved,
                                              "empty_slots": reserved * 16 - sum(lengths)}, explain, measure)


def copy_on_write(r, seed) -> Question:
    length = 16 * r.randint(1, 12) + (0 if r.random() < 0.25 else r.randint(1, 15))
    n = r.randint(1, 4)
    partial = length % 16
    text = (f"A process computes its {length}-token prompt (16-token pages) in one step and samples its first "
            f"token; then it is forked {n} time(s) (fork(pid, {n})), and in the next step the parent and every "
            f"child compute that token.\n"
            f"  a) How many frames are mapped right after the fork?\n"
            f"  b) How many copy-on-write faults does the next step take?\n"
            f"  c) How many frames are mapped after it?")
    faults = n if partial else 0
    why = (f"the last page holds {partial} tokens and is shared by {n + 1}: each writer but the last finds it "
           f"shared and copies it" if partial else "the prompt fills its pages: the new token opens a new page for "
                                                    "each, and nothing shared is written")
    explain = (f"a) fork shares every page: ceil({length} / 16) = {-(-length // 16)}. b) {faults}: {why}. "
               f"c) the {length // 16} full page(s) stay shared, and each of the {n + 1} has a private last page: "
               f"{length // 16} + {n + 1} = {length // 16 + n + 1}.")

    def measure() -> dict:
        root, tid = boot()
        pid = root.spawn(tid, prompt(0, length), max_tokens=4, ignore_eos=True)
        step(root)
        root.fork(pid, n)
        after_fork = root.meminfo().mapped
        record = step(root)
        return {"mapped_after_fork": after_fork, "faults": len(record.cow_faults),
                "mapped_after_write": root.meminfo().mapped}
    return Question("cow", seed, text, {"mapped_after_fork": -(-length // 16), "faults": faults,
                                         "mapped_after_write": length // 16 + n + 1}, explain, measure)
