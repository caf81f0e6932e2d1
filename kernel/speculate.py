"""Speculative decoding by prompt lookup: guess a process's next tokens from its own token file.

A decoding process whose last few tokens (an n-gram, 4 down to 2 tokens) occurred earlier in its
file is given, as drafts, the tokens that followed that earlier occurrence (the most recent one).
The scheduler plans its last token and the drafts as one work (kernel/sched/scheduler.py), the
forward returns the logits of every row, and the step draws from them in order exactly as plain
decoding would (kernel/step.py, commit_draft): the draw at row j is kept, and the next row looked
at, only while it equals draft j. A draw never depends on the draft, so the tokens (seeded
sampling, penalties, grammars and logprobs included) are those of the same process run without
speculation; the drafts only decide how many of them one step yields. The K/V of rejected drafts
is forgotten (MemoryManager.truncate) before anything names their pages.

A caller that knows roughly what the output will be (an edit of a text it sends, a regenerated
answer) may give it as the spawn's prediction: its tokens are drafted first, wherever the output
follows them (propose_predicted), and the output is still the model's own.

It pays where the forward's cost barely grows with the rows it is given (a small batch on the CPU:
docs/performance.md section 18) and the text repeats its context (editing, extraction, code, a
quote); a process with no earlier occurrence of its n-gram costs a few searches and nothing else,
and one whose drafts keep missing drafts less and less often (note_outcome), unless its drafts
usually pay, when a miss is chance (a draft model's, the simulator's independent drafter).
"""
from array import array

NGRAM_MAX, NGRAM_MIN = 4, 2          # the suffix lengths looked up, longest first
MAX_DRAFT = 16                       # the most drafts one work may carry (boot's speculate=k is at most this)
MAX_DECODES = 8                      # boot's speculate_batch by default: steps with more decoding processes
                                     # than this speculate for none (this CPU's measure, docs/performance.md 18)
MAX_BACKOFF = 64                     # the most steps a process waits to draft again after drafts it missed
KEPT_WEIGHT = 0.25                   # the weight of the latest draft in a process's average share kept
KEEPS_ENOUGH = 0.1                   # an average share kept from which a draft that kept nothing is chance
                                     # (about where four drafts stop paying on the CPU: docs/simulator.md)


def may_draft(proc, step: int) -> bool:
    """Whether the process drafts in this step: not while it backs off after missed drafts."""
    return step >= proc.drafts_resume


def note_outcome(proc, taken: int, drafted: int, step: int) -> None:
    """After a draft of `drafted` tokens of which `taken` were kept: a process whose drafts keep
    missing (text that does not repeat its context) waits 2, 4, ... up to MAX_BACKOFF steps before
    the next one, so that it stops paying for rows nobody keeps; one taken resets it. A process whose
    moving average of the share kept (KEPT_WEIGHT on the latest) is KEEPS_ENOUGH or more does not
    wait: its drafts pay, and this miss was chance. The average starts at KEEPS_ENOUGH (Process), so
    a first draft that keeps nothing still backs off."""
    proc.drafts_kept += KEPT_WEIGHT * (taken / drafted - proc.drafts_kept)
    if taken:
        proc.draft_misses = 0
        return
    if proc.drafts_kept >= KEEPS_ENOUGH:
        return
    proc.draft_misses += 1
    proc.drafts_resume = step + min(2 ** proc.draft_misses, MAX_BACKOFF)


def propose_any(proc, k: int) -> tuple:
    """A real device's drafter: from the caller's prediction when the output follows it, else by
    prompt lookup in the process's own file. Notes which (commit_draft counts a prediction's drafts)."""
    draft = propose_predicted(proc, k)
    proc.predicted_draft = bool(draft)
    return draft or propose(proc, k)


def propose_predicted(proc, k: int) -> tuple:
    """At most k tokens that follow, in the process's prediction (spawn's prediction=...: what the
    caller expects it to write, OpenAI's predicted outputs), the last n tokens of its turn, n from
    NGRAM_MAX down to 1 (never reaching back into the prompt, which the prediction does not hold).
    The first occurrence from where the last such draft began is taken, then the first anywhere: a
    prediction is read in order, and an edit that leaves it resumes it further on. () when none."""
    prediction = proc.prediction
    if not prediction:
        return ()
    if proc.prediction_hay is None:
        proc.prediction_hay = array("i", prediction).tobytes()
    hay, tokens = proc.prediction_hay, proc.tokens
    for n in range(min(NGRAM_MAX, proc.turn_generated), 0, -1):
        pattern = array("i", tokens[-n:]).tobytes()
        resume = max(0, proc.prediction_at - n)
        for lo in (resume, 0) if resume else (0,):
            at = _find_token(hay, pattern, 4 * lo)
            if at >= 0 and at + n < len(prediction):
                proc.prediction_at = at + n
                return tuple(prediction[at + n:at + n + k])
    return ()


def _find_token(hay: bytes, pattern: bytes, start: int) -> int:
    """The first token index at which pattern (token ids as 4-byte ints) occurs in hay from byte
    `start`, on a token boundary; -1 when it does not."""
    while True:
        at = hay.find(pattern, start)
        if at < 0 or at % 4 == 0:
            return at // 4 if at >= 0 else -1
        start = at + 1


def propose_filler(proc, k: int) -> tuple:
    """The simulated device's drafter: k tokens every time (the shape of a draft model's or EAGLE's
    proposals; the n-gram lookup over a simulated file of filler tokens would model nothing). Which
    of them are drawn is the device's draft_acceptance (kernel/step.py, simulated_draws)."""
    return (getattr(proc.tenant.program, "filler_token", 0),) * k


def file_bytes(proc) -> bytearray:
    """The process's token file as bytes, 4 a token, kept on the process (ngram_hay) and extended with
    what was appended since the last call: searching it with rfind finds an n-gram at C speed."""
    hay = proc.ngram_hay
    if hay is None:
        hay = proc.ngram_hay = bytearray()
    have = len(hay) // 4
    if have < len(proc.tokens):
        hay += array("i", proc.tokens[have:]).tobytes()
    return hay


def propose(proc, k: int) -> tuple:
    """At most k tokens that followed the latest earlier occurrence of the process's last n tokens
    (n from NGRAM_MAX down to NGRAM_MIN), or () when none occurred. The file is searched as bytes
    (4 per token, file_bytes), so one lookup is a C-speed scan."""
    # LAB(speculate): BEGIN -> return ()
    tokens, hay = proc.tokens, file_bytes(proc)
    total = len(tokens)
    for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
        if total <= n:
            continue
        pattern = bytes(hay[-4 * n:])
        end = 4 * (total - 1)            # an occurrence must end before the last token: something follows it
        while True:
            at = hay.rfind(pattern, 0, end)
            if at < 0:
                break
            if at % 4 == 0:              # on a token boundary (a match across two tokens' bytes is not one)
                start = at // 4 + n
                return tuple(tokens[start:start + k])
            end = at + 4 * n - 1         # look before this one
    return ()
    # LAB(speculate): END
