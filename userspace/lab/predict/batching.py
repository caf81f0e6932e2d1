"""Questions on batching: padded against ragged batches, chunked prefill, static batching's convoy."""
from __future__ import annotations

from userspace.lab.predict import Question
from userspace.lab.predict.common import boot, prompt, step


def padding(r, seed) -> Question:
    decoders, length = r.randint(2, 12), r.randint(20, 300)
    pad = length * (decoders + 1) - (decoders + length)
    text = (f"{decoders} processes are decoding (one token each per step) when a {length}-token prompt joins "
            f"them; the step computes the decodes and the whole prompt together.\n"
            f"  a) With batch=\"padded\" (every sequence padded to the longest), how many padding tokens does "
            f"that step compute?\n"
            f"  b) And with batch=\"ragged\" (packed back to back)?")
    explain = (f"a) {decoders + 1} sequences padded to {length}: {length} x {decoders + 1} slots for "
               f"{decoders} + {length} real tokens, {pad} of padding (the article's (n - 1)(B - 1) = "
               f"{(length - 1) * decoders}, the same count). b) 0: a ragged batch has no rectangle to fill.")

    def measure() -> dict:
        out = {}
        for batch in ("padded", "ragged"):
            root, tid = boot(batch=batch, token_budget=4096)
            for i in range(decoders):
                root.spawn(tid, prompt(i, 8), max_tokens=16, ignore_eos=True)
            step(root)                                        # their prompts (equal: no padding)
            step(root)                                        # a decode step
            root.spawn(tid, prompt(decoders, length), max_tokens=1, ignore_eos=True)
            out[batch] = step(root).padding_tokens
        return out
    return Question("padding", seed, text, {"padded": pad, "ragged": 0}, explain, measure)


def chunking(r, seed) -> Question:
    decoders, length, chunk, budget = r.randint(1, 6), r.randint(100, 600), r.choice([32, 64, 128]), 256
    per_step = min(chunk, budget - decoders)
    steps = -(-length // per_step)
    whole = -(-length // (budget - decoders))
    text = (f"{decoders} process(es) are decoding when a {length}-token prompt arrives. The token budget is "
            f"{budget} a step; running decodes go first, and a process computes at most chunk={chunk} tokens a "
            f"step.\n"
            f"  a) In how many steps is the prompt read (its first token comes with the last of them)?\n"
            f"  b) How many tokens does the busiest of those steps compute?\n"
            f"  c) In how many steps would it be read with chunk={budget} (no chunking)?")
    explain = (f"a) each step leaves {budget} - {decoders} tokens after the decodes, and the prompt takes at most "
               f"{chunk} of them: {per_step} a step, ceil({length} / {per_step}) = {steps}. b) {decoders} + "
               f"{min(per_step, length)} = {decoders + min(per_step, length)}: the decodes never wait for more. "
               f"c) ceil({length} / {budget - decoders}) = {whole}: fewer steps, each of them longer for the "
               f"decoders.")

    def measure() -> dict:
        out = {}
        for c in (chunk, budget):
            root, tid = boot(token_budget=budget, chunk=c)
            for i in range(decoders):
                root.spawn(tid, prompt(i, 4), max_tokens=2000, ignore_eos=True)
            step(root)
            step(root)
            pid = root.spawn(tid, prompt(decoders, length), max_tokens=1, ignore_eos=True)
            records = []
            while not any(w.pid == pid and w.token is not None for w in (records[-1].works if records else [])):
                records.append(step(root))
            out[c] = (len(records), max(rec.prefill_tokens + rec.decode_tokens for rec in records))
        return {"steps": out[chunk][0], "busiest": out[chunk][1], "steps_unchunked": out[budget][0]}
    return Question("chunk", seed, text, {"steps": steps, "busiest": decoders + min(per_step, length),
                                           "steps_unchunked": whole}, explain, measure)


def convoy(r, seed) -> Question:
    lengths = [r.randint(2, 60) for _ in range(r.randint(3, 6))]
    text = (f"{len(lengths)} processes arrive together and generate {', '.join(map(str, lengths))} tokens "
            f"(their prompts take one step, which also samples their first token). Right after step 1 a new "
            f"process X arrives.\n"
            f"  a) With policy=\"static\" (a batch runs until its last member ends), in which step is X admitted?\n"
            f"  b) And with policy=\"fcfs\" (continuous batching)?")
    last = max(lengths)
    explain = (f"a) a process generating m tokens gets its m-th in step m and exits there; the batch ends with the "
               f"longest, in step {last}, so X comes in at step {last + 1}: it waited {last} steps behind "
               f"processes it did not need. b) step 2: a slot is there at the next step.")

    def measure() -> dict:
        out = {}
        for policy in ("static", "fcfs"):
            root, tid = boot(policy=policy)
            for i, n in enumerate(lengths):
                root.spawn(tid, prompt(i, 8), max_tokens=n, ignore_eos=True)
            step(root)
            x = root.spawn(tid, prompt(len(lengths), 8), max_tokens=1, ignore_eos=True)
            while True:
                record = step(root)
                if x in record.admitted:
                    out[policy] = record.step
                    break
        return out
    return Question("convoy", seed, text, {"static": last + 1, "fcfs": 2}, explain, measure)
