"""Questions on speculative decoding: steps saved when every draft is kept, drafts wasted under the
back-off when none is (kernel/speculate.py), on the simulated device, whose drafter proposes k tokens
at every chance and keeps each with probability draft_acceptance."""
from __future__ import annotations

from userspace.lab.predict import Question
from userspace.lab.predict.common import GPU, boot, prompt

MAX_BACKOFF = 64      # kernel/speculate.py's: the longest wait, in steps, after drafts that kept nothing


def drafting(r, seed) -> Question:
    length, n, k = r.randint(20, 300), r.randint(12, 140), r.randint(1, 6)
    decode = n - 1                                   # the prefill step draws the first token
    kept_steps = 1 + -(-decode // (k + 1))
    kept_drafts = decode - (kept_steps - 1)
    wasted, waits, t, misses = 0, [], 2, 0           # step t draws token t; the first decode step drafts
    while t < n:                                     # at step n nothing is left to guess
        wasted += min(k, n - t)                      # tokens after this one the turn may still hold
        misses += 1
        wait = min(2 ** misses, MAX_BACKOFF)
        waits.append(wait)
        t += wait
    text = (f"A process with a {length}-token prompt and max_tokens={n} runs alone on a kernel booted with "
            f"speculate={k}. Its prompt is computed in one step, which draws its first token; from then on, "
            f"every step it may carry up to {k} drafts (no more than its turn has tokens left after the next), "
            f"and the simulated drafter always proposes that many.\n"
            f"  a) With draft_acceptance=1 (every draft is drawn), how many steps from spawn to exit?\n"
            f"  b) ... and how many tokens are computed as drafts in all?\n"
            f"  c) With draft_acceptance=0 (none is), a process whose draft kept nothing waits 2, then 4, 8, "
            f"... (at most {MAX_BACKOFF}) steps before it drafts again. How many tokens are drafted (and "
            f"thrown away) in all?")
    explain = (f"a) 1 prefill step, then {decode} tokens at {k + 1} a step (the last step takes fewer): 1 + "
               f"ceil({decode} / {k + 1}) = {kept_steps}, against {n} without speculation. b) every decode step "
               f"but its token is drafts: {decode} - {kept_steps - 1} = {kept_drafts}. c) one token a step; it "
               f"drafts at step 2 and then after waits of {', '.join(map(str, waits[:-1])) or 'none'}"
               f"{' (the next would come after the turn)' if waits else ''}, each time min({k}, tokens left "
               f"after the next): {wasted}.")

    def measure() -> dict:
        out = {}
        for a in (1, 0):
            root, tid = boot(device=f"{GPU},draft_acceptance={a}", speculate=k, token_budget=max(512, length),
                             chunk=max(512, length))
            root.wait(root.spawn(tid, prompt(0, length), max_tokens=n, ignore_eos=True))
            out[a] = root.schedstat()
        return {"steps_kept": out[1].steps, "drafts_kept": out[1].draft_tokens, "drafts_wasted": out[0].draft_tokens}
    return Question("speculate", seed, text, {"steps_kept": kept_steps, "drafts_kept": kept_drafts,
                                              "drafts_wasted": wasted}, explain, measure)
