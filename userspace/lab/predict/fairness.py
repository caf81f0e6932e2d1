"""A question on fair share: who gets the running slots, and the tokens served, by weight."""
from __future__ import annotations

import kernel
from userspace.lab.predict import Question
from userspace.lab.predict.common import GPU, prompt, step


def fair_share(r, seed) -> Question:
    weight, k, steps = r.randint(2, 5), r.randint(2, 6), r.randint(10, 40)
    slots = (weight + 1) * k
    text = (f"Two tenants share a kernel under policy=\"fair\": light (weight 1) and heavy (weight {weight}). Each "
            f"spawns {2 * slots} long processes with 1-token prompts, all at once; at most max_running={slots} "
            f"run, and the token budget (256) serves every running process each step.\n"
            f"  a) How many of the {slots} running slots does each tenant hold once the first step has admitted "
            f"them?\n"
            f"  b) How many tokens does each tenant get over the {steps} steps after that one?")
    explain = (f"a) admission follows the counters: each admitted prompt charges its tenant 1 token / weight, and "
               f"the smaller counter goes next, so heavy is admitted {weight} times for each of light's: light "
               f"{k}, heavy {weight * k}. b) every running process decodes a token a step: light {k} x {steps} = "
               f"{k * steps}, heavy {weight * k} x {steps} = {weight * k * steps}. (Under fcfs, with the two "
               f"spawning in turn, the slots would split {slots // 2} : {slots - slots // 2}.)")

    def measure() -> dict:
        root = kernel.boot(device=GPU, policy="fair", token_budget=256, max_running=slots).syscalls()
        tids = {"light": root.spawn_tenant("llama-2-7b", name="light", weight=1, max_procs=1 << 16),
                "heavy": root.spawn_tenant("llama-2-7b", name="heavy", weight=weight, max_procs=1 << 16)}
        names = {tid: name for name, tid in tids.items()}
        for i in range(2 * slots):
            for name, tid in tids.items():
                root.spawn(tid, prompt(2 * i + (name == "heavy"), 1), max_tokens=1000, ignore_eos=True)
        step(root)
        running = dict.fromkeys(tids, 0)
        for p in root.ps():
            running[names[p.tid]] += p.state == "running"
        served = dict.fromkeys(tids, 0)
        for _ in range(steps):
            for w in step(root).works:
                served[names[w.tid]] += w.count
        return {"light_slots": running["light"], "heavy_slots": running["heavy"], "light_tokens": served["light"],
                "heavy_tokens": served["heavy"]}
    return Question("fair", seed, text, {"light_slots": k, "heavy_slots": weight * k, "light_tokens": k * steps,
                                          "heavy_tokens": weight * k * steps}, explain, measure)
